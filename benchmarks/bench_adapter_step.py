"""Training-step time and peak memory: sparse OPD adapter vs peft LoRA r=16 vs peft SHiRA (same mask) vs full FT.

Every configuration runs in its own subprocess on the same tiny Qwen3 (hidden 512, 4 layers, intermediate 1536)
and the same batch (16 x 64 tokens), AdamW, FFN + attention Linears targeted. Reported: median step time of
``--steps`` steps after 2 warm-up steps (forward + backward + optimizer), the peak resident-memory growth during
training over the process's memory right before the first step, and trainable parameters.

Masks: SHiRA needs exactly r * (in + out) coordinates per module, so all sparse masks here have that size, with
r = 3 / 16 / 162 giving overall densities of about 1 %, 5 % and 50 % (r = 16 = LoRA r=16's parameter count).

    python benchmarks/bench_adapter_step.py            # prints the table, writes benchmarks/results/adapter_step.md
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "adapter_step.md"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANKS = {"1%": 3, "5%": 16, "50%": 162}


def build_model():
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=128,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        tie_word_embeddings=False,
    )
    return Qwen3ForCausalLM(cfg)


def mask_for(model, r: int, seed: int = 0) -> dict:
    """Random mask with exactly r * (in + out) coordinates per targeted Linear (SHiRA's sizing rule)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in TARGETS:
            n = r * (mod.in_features + mod.out_features)
            flat = torch.zeros(mod.weight.numel(), dtype=torch.bool)
            flat[torch.randperm(mod.weight.numel(), generator=g)[:n]] = True
            out[name] = flat.view_as(mod.weight)
    return out


def wrap(model, method: str, level: str | None, grad_path: str):
    from peft import LoraConfig, ShiraConfig, get_peft_model

    import sparse_opd_peft  # noqa: F401

    if method == "full":
        return model
    if method == "lora":
        return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    mask = mask_for(model, RANKS[level])
    if method == "shira":
        cfg = ShiraConfig(r=RANKS[level], target_modules=TARGETS)
        lookup = {id(model.get_submodule(n)): m for n, m in mask.items()}
        cfg.mask_fn = lambda base_layer, r, lookup=lookup, **kw: lookup[id(base_layer)].to(base_layer.weight.dtype)
        return get_peft_model(model, cfg)
    return get_peft_model(model, sparse_opd_peft.SparseOPDConfig(mask=mask, grad_path=grad_path))


def run_one(method: str, level: str | None, grad_path: str, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    model = wrap(build_model(), method, level, grad_path)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (16, 64), generator=g)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "step_s": statistics.median(times),
        "peak_growth_mb": (peak - rss0) / 1024,
        "trainable": sum(p.numel() for p in params),
    }


CONFIGS = [("full", None, "auto"), ("lora", None, "auto")]
for _level in RANKS:
    CONFIGS.append(("shira", _level, "auto"))
    CONFIGS.append(("sparse_opd", _level, "dense_rows"))
    CONFIGS.append(("sparse_opd", _level, "sampled"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        method, level, path = json.loads(args.one)
        print(json.dumps(run_one(method, level, path, args.steps, args.threads)))
        return
    rows = []
    for method, level, path in CONFIGS:
        cmd = [sys.executable, __file__, "--steps", str(args.steps), "--threads", str(args.threads)]
        out = subprocess.run([*cmd, "--one", json.dumps([method, level, path])], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{method} {level} failed:\n{out.stderr[-2000:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(
            {"method": method, "density": level or "-", "grad_path": path if method == "sparse_opd" else "-", **res}
        )
        print(rows[-1], flush=True)
    lora = next(r for r in rows if r["method"] == "lora")
    shira = {r["density"]: r for r in rows if r["method"] == "shira"}
    lines = [
        "| method | density | grad path | trainable | step (s) | × LoRA | × SHiRA same mask | peak growth (MB) | "
        "extra bytes / coord vs LoRA |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        vs_shira = f"{r['step_s'] / shira[r['density']]['step_s']:.2f}" if r["density"] in shira else "-"
        extra = (r["peak_growth_mb"] - lora["peak_growth_mb"]) * 2**20 / r["trainable"] if r["method"] != "lora" else 0
        lines.append(
            f"| {r['method']} | {r['density']} | {r['grad_path']} | {r['trainable']:,} | {r['step_s']:.3f} | "
            f"{r['step_s'] / lora['step_s']:.2f} | {vs_shira} | {r['peak_growth_mb']:.0f} | {extra:.1f} |"
        )
    table = "\n".join(lines)
    header = (
        f"Tiny Qwen3 (hidden 512, 4 layers, intermediate 1536), batch 16 x 64 tokens, AdamW, {args.threads} threads, "
        f"median of {args.steps} steps. Generated by `python benchmarks/bench_adapter_step.py`.\n\n"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(header + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
