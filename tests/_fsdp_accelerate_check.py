"""The README's accelerate recipe for sharded training, run for real: ``accelerate launch`` this file.

Run by ``benchmarks/gpu_check.sh`` when a machine has 2 or more GPUs::

    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 \\
      --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --fsdp_transformer_layer_cls_to_wrap Qwen3DecoderLayer \\
      --fsdp_reshard_after_forward true --fsdp_state_dict_type FULL_STATE_DICT --mixed_precision no \\
      tests/_fsdp_accelerate_check.py --out DIR

and without FSDP by ``tests/test_fsdp.py`` (``ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2 ...``:
DDP over gloo; accelerate 1.15 has no CPU FSDP path and its launcher starts CPU processes only through MPI), which
proves the script itself runs.

Every process builds the tiny Qwen3 of ``_fsdp_check.py`` in bfloat16 with a float32 adapter (a GPU-style bf16
base), ``accelerator.prepare(model, optimizer)``, trains ``STEPS`` SGD steps on its slice of the fixed global
batches and saves with :func:`sparse_opd_peft.distributed.save_sharded_adapter`. The main process then trains the
same model unsharded in one process on the whole global batches (the reference), reloads the saved adapter into a
fresh base and writes ``DIR/fsdp_accelerate.json``: the distributed type, the values' placements, the largest
difference of the trained values and of the reloaded model's logits from the reference, and ``ok`` (values within
``--tol`` times the largest reference value; with ``--expect-sharded`` also every value a ``Shard(0)`` DTensor). Exit status 1 when not ok.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _distributed_check import tiny_model  # noqa: E402
from _fsdp_check import GLOBAL_BATCH, STEPS, VOCAB, global_batch, peft_student, placements  # noqa: E402

# SGD, not AdamW: AdamW's first steps move every value by about lr whatever the gradient's size, so a near-zero
# gradient whose sign differs between the sharded and the one-process run (bf16 GEMMs of other shapes on a GPU)
# would move a value by 2 lr; with SGD a difference in the gradient stays a difference of its own size.
SGD_LR = 1.0


def _values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Float32 CPU copies of the adapter values (``sparse_opd_`` parameters) of an unsharded model."""
    return {n: p.detach().float().cpu() for n, p in model.named_parameters() if "sparse_opd_" in n}


def sgd_steps(model: torch.nn.Module, opt, batch: Callable[[int], torch.Tensor], backward=torch.Tensor.backward):
    """``STEPS`` steps of the optimizer ``opt`` on the batches ``batch(step)``, gradients through ``backward(loss)``;
    returns the detached losses."""
    model.train()
    losses = []
    for step in range(STEPS):
        ids = batch(step)
        loss = model(input_ids=ids, labels=ids).loss
        backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return losses


def reference(device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One process, no sharding, the whole global batches: the trained values and the logits of batch 0."""
    model = peft_student(dtype=torch.bfloat16).to(device)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=SGD_LR)
    sgd_steps(model, opt, lambda step: global_batch(step).to(device))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=global_batch(0).to(device)).logits.float().cpu()
    return _values(model), logits


def main(argv: Optional[list[str]] = None) -> int:
    from accelerate import Accelerator
    from peft import PeftModel

    from sparse_opd_peft.distributed import save_sharded_adapter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--tol", type=float, default=1e-2, help="largest allowed |value - reference| / largest |reference value|"
    )
    parser.add_argument("--expect-sharded", action="store_true", help="not ok unless every value is a Shard(0) DTensor")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    acc = Accelerator()
    out = Path(args.out)
    world = acc.num_processes
    if GLOBAL_BATCH % world:
        raise SystemExit(f"{GLOBAL_BATCH} rows per global batch do not split over {world} processes")
    per_rank = GLOBAL_BATCH // world

    model = peft_student(dtype=torch.bfloat16)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=SGD_LR)
    model, opt = acc.prepare(model, opt)
    rows = slice(acc.process_index * per_rank, (acc.process_index + 1) * per_rank)  # this process's slice
    step_losses = sgd_steps(model, opt, lambda step: global_batch(step)[rows].to(acc.device), acc.backward)
    losses = [float(acc.reduce(loss, "mean")) for loss in step_losses]
    unwrapped = acc.unwrap_model(model)
    shards = placements(unwrapped)
    save_sharded_adapter(unwrapped, out / "adapter")
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return 0

    ref_values, ref_logits = reference(acc.device)
    base = tiny_model(0, vocab_size=VOCAB).to(torch.bfloat16)
    loaded = PeftModel.from_pretrained(base, str(out / "adapter")).to(acc.device).eval()
    got = _values(loaded)
    value_diff = max(float((got[n] - ref_values[n]).abs().max()) for n in ref_values)
    with torch.no_grad():
        logits = loaded(input_ids=global_batch(0).to(acc.device)).logits.float().cpu()
    report = {
        "distributed_type": str(acc.distributed_type),
        "num_processes": world,
        "device": str(acc.device),
        "device_name": torch.cuda.get_device_name() if acc.device.type == "cuda" else "cpu",
        "losses": losses,
        "placements": sorted({str(v["placements"]) for v in shards.values()}),
        "same_names": sorted(got) == sorted(ref_values),
        "max_abs_value_diff": value_diff,
        "max_abs_value": max(float(v.abs().max()) for v in ref_values.values()),
        "max_abs_logit_diff": float((logits - ref_logits).abs().max()),
        "tol": args.tol,
    }
    report["ok"] = report["same_names"] and value_diff <= args.tol * report["max_abs_value"]
    if args.expect_sharded:
        report["ok"] = report["ok"] and report["placements"] == [str([["Shard", 0]])]
    (out / "fsdp_accelerate.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
