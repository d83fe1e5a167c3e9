"""Parts (c), (d) and the summary of ``benchmarks/gpu_check.sh`` (issue 15 item 2).

    python benchmarks/gpu_check_extras.py bnb --device cuda --out DIR      # 8-bit / 4-bit bases: train, merge, unmerge
    python benchmarks/gpu_check_extras.py opd --device cuda --steps 20 --out DIR   # OPDTrainer on the shipped toy world
    python benchmarks/gpu_check_extras.py summarize --out DIR              # gpu_check.json + gpu_check.md

Every part writes its own JSON into DIR (``bnb.json``, ``opd.json``); ``summarize`` gathers them with the test and
step-benchmark results and the per-part exit codes that ``gpu_check.sh`` recorded in ``status.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import traceback
from pathlib import Path

import torch

from sparse_opd_peft.atomic import write_json_atomic, write_text_atomic

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_qwen3(hidden: int, layers: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, tie_word_embeddings=False)  # fmt: skip
    return Qwen3ForCausalLM(cfg)


def _random_mask(model, density: float, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(m.weight.shape, generator=g) < density for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in TARGETS}  # fmt: skip


def bnb_one(kind: str, device: str, work: Path) -> dict:
    """Load a tiny Qwen3 quantized (``kind`` 8bit / 4bit) on ``device``, train 4 steps, merge, unmerge."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from sparse_opd_peft import SparseOPDConfig

    hidden = 256 if device == "cuda" else 64  # bitsandbytes' CPU 4-bit kernels need in_features >= 64
    dense = _tiny_qwen3(hidden, 2)
    dense.save_pretrained(work / f"base_{kind}")
    q = (BitsAndBytesConfig(load_in_8bit=True) if kind == "8bit"
         else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))  # fmt: skip
    qmodel = AutoModelForCausalLM.from_pretrained(work / f"base_{kind}", quantization_config=q, device_map=device)
    pm = get_peft_model(qmodel, SparseOPDConfig(mask=_random_mask(dense, 0.3)))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        ref = pm(ids).logits.float()
    losses = []
    for _ in range(4):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    with torch.no_grad():
        out = pm(ids).logits.float()
        pm.merge_adapter()
        merged = pm(ids).logits.float()
        report = pm.base_model.last_merge_report["default"]
        pm.unmerge_adapter()
        restored = pm(ids).logits.float()
    move = float((out - ref).abs().max())
    return {
        "kind": kind, "device": str(next(p for p in pm.parameters() if p.requires_grad).device),
        "losses": losses, "loss_fell": losses[-1] < losses[0], "logit_move_by_training": move,
        "merged_vs_unmerged_max_abs": float((merged - out).abs().max()),
        "merge_error_share_of_move": float((merged - out).abs().max()) / max(move, 1e-30),
        "min_survived_energy_share": min(r["survived_energy_share"] for r in report.values()),
        "unmerge_exact": bool(torch.equal(restored, out)),
    }  # fmt: skip


def run_bnb(device: str, out: Path) -> dict:
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("8bit", "4bit"):
            try:
                res[kind] = bnb_one(kind, device, Path(tmp))
            except Exception as e:  # recorded, the other parts still run
                res[kind] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    write_json_atomic(out / "bnb.json", res)
    return res


def run_opd(device: str, steps: int, out: Path) -> dict:
    """``steps`` OPDTrainer steps of a SparseOPD adapter (random 5 % mask) on the shipped toy world."""
    from peft import get_peft_model

    from sparse_opd_peft import SparseOPDConfig
    from sparse_opd_peft.lab.toy import ToyRunConfig, load_world, opd_run

    world = load_world()
    student = world.load_student()
    pm = get_peft_model(student, SparseOPDConfig(mask=_random_mask(student, 0.05)))
    cfg = ToyRunConfig(task="add").with_(steps=steps, warmup_steps=min(2, steps), eval_every=0, progress_bar=False)
    t0 = time.perf_counter()
    model, hist, secs = opd_run(pm, world, cfg)
    kls = [h["kl"] for h in hist if "kl" in h]
    res = {
        "device_requested": device, "device": str(next(p for p in model.parameters() if p.requires_grad).device),
        "steps": len(hist), "train_seconds": secs, "total_seconds": time.perf_counter() - t0,
        "first_kl": kls[0] if kls else None, "last_kl": kls[-1] if kls else None,
        "finite": all(math.isfinite(v) for v in kls),
    }  # fmt: skip
    write_json_atomic(out / "opd.json", res)
    return res


def _load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def summarize(out: Path) -> dict:
    step = next((_load(p) for p in sorted(out.glob("adapter_step*.json"))), None)
    res = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "status": _load(out / "status.json"),
        "tests_tail": (out / "tests.log").read_text()[-600:] if (out / "tests.log").exists() else None,
        "step": step, "bnb": _load(out / "bnb.json"), "opd": _load(out / "opd.json"),
        "fsdp": _load(out / "fsdp" / "fsdp_accelerate.json"),
    }  # fmt: skip
    write_json_atomic(out / "gpu_check.json", res)
    lines = [f"# gpu_check on {res['device']} (torch {res['torch']})", ""]
    lines += ["| part | exit code |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in (res["status"] or {}).items()]
    lines += ["", "## tests (tail)", "```", (res["tests_tail"] or "").strip(), "```", ""]
    md_step = sorted(out.glob("adapter_step*.md"))
    lines += ["## step benchmark", "", md_step[0].read_text() if md_step else "(missing)", ""]
    for part in ("bnb", "opd", "fsdp"):
        if part == "fsdp" and res[part] is None:
            continue  # one GPU: the 2-GPU recipe did not run
        lines += [f"## {part}", "```json", json.dumps(res[part], indent=1)[:4000], "```", ""]
    write_text_atomic(out / "gpu_check.md", "\n".join(lines))
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["bnb", "opd", "summarize"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part == "bnb":
        res = run_bnb(args.device, out)
    elif args.part == "opd":
        res = run_opd(args.device, args.steps, out)
    else:
        res = summarize(out)
    print(json.dumps(res, indent=1, default=str)[:3000])


if __name__ == "__main__":
    main()
