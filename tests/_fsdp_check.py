"""FSDP2 training of a SparseOPD adapter on CPU processes over gloo, for the sharded-training test and as an example.

Each of ``--world-size`` processes (``--rank`` given, rendezvous through the file ``--store``; or started by
``torchrun --nproc_per_node 2 tests/_fsdp_check.py --out DIR``) builds the same tiny Qwen3 from a config (no Hub),
wraps it with ``get_peft_model(SparseOPDConfig(mask=...))``, applies ``fully_shard`` per decoder block and to the
root, and trains ``STEPS`` AdamW steps on its slice of a fixed global batch. It writes into ``--out``:

* ``rank{R}.json``: the placements and local / global lengths of every adapter parameter, the global mean loss of
  every step, and the error that plain ``save_adapter`` (peft's ``save_pretrained``) raised on the sharded model;
* ``rank{R}.safetensors``: this rank's local shards of the trained values (``DTensor.to_local()``);
* ``rank{R}bf16.safetensors`` / ``placementsbf16`` / ``lossesbf16``: the same with a bfloat16 base (float32 values);
* ``adapter/``: the adapter saved with :func:`sparse_opd_peft.distributed.save_sharded_adapter` (rank 0 writes).

:func:`train` with ``world_size=1`` on an unsharded model is the single-process reference (same global batch).
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
from _distributed_check import tiny_model
from conftest import random_mask

STEPS, GLOBAL_BATCH, SEQ_LEN, VOCAB, LR = 3, 4, 12, 32, 1e-2


def peft_student(seed: int = 0, dtype: torch.dtype = torch.float32):
    """``get_peft_model(tiny_model(seed, vocab_size=VOCAB) in dtype, SparseOPDConfig(mask=random_mask(base, 0.3)))``:
    a frozen base of ``dtype`` (a 2-layer Qwen3, hidden 32), a random mask over every Linear of the decoder blocks
    (odd nnz in places: uneven shards), trainable float32 values, float32 values on disk."""
    from peft import get_peft_model

    from sparse_opd_peft import SparseOPDConfig

    base = tiny_model(seed, vocab_size=VOCAB).to(dtype)
    return get_peft_model(base, SparseOPDConfig(mask=random_mask(base, 0.3), save_dtype="float32"))


def global_batch(step: int) -> torch.Tensor:
    """The global batch of ``step``: (GLOBAL_BATCH, SEQ_LEN) int64 token ids."""
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(100 + step))


def train(model: torch.nn.Module, rank: int = 0, world_size: int = 1) -> list[float]:
    """``STEPS`` AdamW steps; this rank takes rows ``[rank·B/W, (rank+1)·B/W)`` of each global batch. The loss is
    the mean over the rank's tokens (equal counts on every rank), so FSDP's gradient average over ranks equals the
    single-process gradient of the global mean. Returns the global mean loss of every step."""
    import torch.distributed as dist

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    per_rank = GLOBAL_BATCH // world_size
    losses = []
    model.train()
    for step in range(STEPS):
        ids = global_batch(step)[rank * per_rank : (rank + 1) * per_rank]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(mean)
            mean /= world_size
        losses.append(float(mean))
    return losses


def shard(model: torch.nn.Module) -> None:
    """FSDP2: ``fully_shard`` each decoder block, then the root, over a 1-D CPU mesh of all ranks."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.get_base_model().model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def placements(model: torch.nn.Module) -> dict[str, dict]:
    """``{name: {"type", "placements", "local", "global"}}`` of every adapter parameter; ``placements`` as
    ``[[class name, dim]]`` (``[["Shard", 0]]`` for FSDP2's ``Shard(0)``), ``local`` / ``global`` numels."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if "sparse_opd_" in name:
            local = p.to_local() if isinstance(p, DTensor) else p
            kinds = [[type(x).__name__, getattr(x, "dim", None)] for x in getattr(p, "placements", ())]
            out[name] = {"type": type(p).__name__, "placements": kinds, "local": local.numel(), "global": p.numel()}
    return out


def run(out: Path, rank: int, world_size: int) -> None:
    """Build, shard, train and save (see module docstring)."""
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    from sparse_opd_peft import save_adapter
    from sparse_opd_peft.distributed import save_sharded_adapter

    report = {}
    for tag, dtype in (("bf16", torch.bfloat16), ("", torch.float32)):  # a bf16 base (GPU-style), then float32
        model = peft_student(dtype=dtype)
        shard(model)
        report[f"placements{tag}"] = placements(model)
        report[f"losses{tag}"] = train(model, rank, world_size)
        shards = {n: p.to_local().detach().clone() for n, p in model.named_parameters() if isinstance(p, DTensor)
                  and "sparse_opd_" in n}  # fmt: skip
        save_file(shards, str(out / f"rank{rank}{tag}.safetensors"))
    try:  # the plain save of a sharded model: expected to fail, and the atomic save must leave nothing behind
        save_adapter(model, out / f"plain{rank}")
        report["plain_save_error"] = None
    except Exception as err:  # noqa: BLE001 - recorded for the test
        report["plain_save_error"] = f"{type(err).__name__}: {err}"
    report["plain_dir_left"] = (out / f"plain{rank}").exists()
    report["saved_to"] = str(save_sharded_adapter(model, out / "adapter"))
    report["adapter_on_disk_after_return"] = (out / "adapter" / "adapter_model.safetensors").is_file()
    (out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--rank", type=int, default=None, help="this process's rank (else $RANK, as torchrun sets)")
    parser.add_argument("--world-size", type=int, default=None, help="number of processes (else $WORLD_SIZE)")
    parser.add_argument("--store", default=None, help="rendezvous file (absent or empty); else env:// (torchrun)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a collective may wait")
    args = parser.parse_args(argv)
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = args.rank if args.rank is not None else int(os.environ["RANK"])
    world_size = args.world_size if args.world_size is not None else int(os.environ["WORLD_SIZE"])
    init = f"file://{Path(args.store).resolve()}" if args.store else "env://"
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world_size, timeout=timedelta(seconds=args.timeout)
    )
    try:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        run(out, rank, world_size)
        dist.barrier()
    finally:  # tear gloo down before exit, not in interpreter shutdown
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
