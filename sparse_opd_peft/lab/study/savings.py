"""Section "savings" (issue 6, item 7): what masked retraining saves, measured side by side on this machine.

For full-parameter OPD, masked retraining (``SparseOPDConfig(mask=...)``, the predictors section's top-20 % mask)
and LoRA with the same number of trainable parameters, on two students:

* ``toy``: the study's student and teacher, real ``OPDTrainer`` steps (rollouts, teacher scoring, backward, AdamW);
* ``qwen``: a bigger random-init Qwen3 (hidden 512, 4 layers, intermediate 1536, as ``bench_adapter_step.py``) for
  OPD-like steps without rollouts (16 × 64 tokens, teacher forward, exact reverse KL on the last 32 positions,
  backward, clipping, AdamW) - the toy student is too small for timing to mean much.

Each configuration runs in its own fresh process (forked from a server process that has only imported the libraries), so
peak memory is that configuration's: the growth of the peak resident set (``VmHWM``, reset at the start) over the
resident set right before the first step. Reported: median wall-clock per step, that peak growth, optimizer-state
bytes (the sum of every optimizer state tensor after the steps) and the size on disk of what ``save_pretrained``
writes (the full model for full OPD, the adapter otherwise). Plus the end-to-end cost of "probe + masked retrain" vs
"full OPD + masked retrain" from the recorded wall-clock of the study's runs.
"""

from __future__ import annotations

import statistics as st
from pathlib import Path
from typing import Any

from ..continual import matched_lora_rank
from . import predictors as P
from .core import RenderInfo, Section, StudyContext, json_roundtrip, mean_std
from .savings_measure import _measure_all  # called through this module (tests replace it here)

METHODS = ("full", "masked", "lora")
QWEN = dict(vocab_size=128, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, head_dim=64, tie_word_embeddings=False)  # fmt: skip
QWEN_TINY = dict(QWEN, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32)  # fmt: skip


def _qwen_mask(qwen: dict[str, Any], density: float, path: Path):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ...masks import mask_from_scores

    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config(**qwen))
    scores = {n: torch.rand(m.weight.shape, generator=g) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and ".layers." in n}  # fmt: skip
    mask = mask_from_scores(scores, density, per_module=True, metadata={"rule": "random_per_module"})
    mask.save(path)
    return mask


def _shapes(mask) -> dict[str, tuple[int, int]]:
    return {n: mask.shape(n) for n in mask}


def bench(ctx: StudyContext) -> dict[str, Any]:
    """Cached measurements: ``{"toy": [row per method], "qwen": [...], "repeats", "steps"}``."""
    tiny = ctx.config.tiny
    steps, warmup, repeats = (2, 1, 1) if tiny else (8, 2, 2)
    qsteps = (2, 1) if tiny else (5, 2)

    def run() -> dict[str, Any]:
        adir = ctx.artifact_dir("savings")
        adir.mkdir(parents=True, exist_ok=True)
        toy_mask = P.final_mask(ctx, ctx.seeds[0], P.DENSITY)
        toy_mask.save(adir / "toy_mask.safetensors")
        qwen = QWEN_TINY if tiny else QWEN
        qmask = _qwen_mask(qwen, P.DENSITY, adir / "qwen_mask.safetensors")
        run_cfg = ctx.base.with_(seed=0, progress_bar=False).to_dict()
        common = {"threads": ctx.config.threads, "world": str(ctx.world.path), "run": run_cfg, "qwen": qwen}
        specs = {"toy": {"mask": str(adir / "toy_mask.safetensors"), "lora_r": matched_lora_rank(toy_mask.nnz(), _shapes(toy_mask)),
                         "steps": steps, "warmup": warmup},
                 "qwen": {"mask": str(adir / "qwen_mask.safetensors"), "lora_r": matched_lora_rank(qmask.nnz(), _shapes(qmask)),
                          "steps": qsteps[0], "warmup": qsteps[1]}}  # fmt: skip
        # interleaved repeats, so that a burst of load on the machine hits every method alike
        order = [(m, k) for _ in range(repeats) for m in specs for k in METHODS]
        results = _measure_all([{**common, **specs[m], "model": m, "method": k} for m, k in order], in_process=tiny)
        runs: dict[str, dict[str, list]] = {m: {k: [] for k in METHODS} for m in specs}
        for (m, k), res in zip(order, results, strict=True):
            runs[m][k].append(res)
        out: dict[str, Any] = {"repeats": repeats, "lora_r": {m: s["lora_r"] for m, s in specs.items()},
                               "qwen_config": qwen, "threads": ctx.config.threads}  # fmt: skip
        for model in specs:
            rows = []
            for method in METHODS:
                rs = runs[model][method]
                row = dict(min(rs, key=lambda r: r["step_s"]))
                row["step_s_repeats"] = [r["step_s"] for r in rs]
                row["peak_growth_mb"] = st.median(r["peak_growth_mb"] for r in rs)
                rows.append(row)
            out[model] = rows
        return out

    return ctx.cached(f"savings_bench_t{ctx.config.threads}", run)


def end_to_end(ctx: StudyContext, bench_rows: list[dict]) -> list[dict[str, Any]]:
    """Recorded wall-clock (mean over seeds) and full-OPD-step equivalents of the routes to a masked model."""
    by = {r["method"]: r for r in bench_rows}
    ratio = by["masked"]["step_s"] / by["full"]["step_s"]  # toy masked step / full step, measured above
    steps = ctx.config.steps
    acc: dict[str, list] = {}
    for seed in ctx.seeds:
        masks = P.predictor_masks(ctx, seed, P.DENSITY)
        full = ctx.full_opd(seed)[0]

        def rec(k: str, masks: dict = masks, seed: int = seed) -> dict[str, Any]:
            return P.retrain(ctx, k, masks[k]["mask"], seed, P.DENSITY)

        routes = [
            ("full OPD", full["train_seconds"], steps, full["acc"]),
            ("full OPD + masked retrain", full["train_seconds"] + rec("final")["train_seconds"],
             steps + ratio * steps, rec("final")["acc"]),
            (f"early probe ({masks['early10']['steps']} steps) + masked retrain", masks["early10"]["seconds"] + rec("early10")["train_seconds"],
             masks["early10"]["steps"] + ratio * steps, rec("early10")["acc"]),
            (f"gradient probe ({masks['g16_sq']['steps']} batches, Σg²) + masked retrain",
             masks["g16_sq"]["seconds"] + rec("g16_sq")["train_seconds"],
             masks["g16_sq"]["steps"] + ratio * steps, rec("g16_sq")["acc"]),
            ("gradient probe's per-module counts, random coordinates + masked retrain",
             masks["alloc_sq"]["seconds"] + rec("alloc_sq")["train_seconds"],
             masks["alloc_sq"]["steps"] + ratio * steps, rec("alloc_sq")["acc"]),
            ("random mask retrain (no probe)", rec("random")["train_seconds"], ratio * steps, rec("random")["acc"]),
        ]  # fmt: skip
        for name, secs, units, a in routes:
            acc.setdefault(name, []).append((secs, units, a))
    return [{"route": k, "seconds": [v[0] for v in vs], "full_step_units": vs[0][1], "acc": [v[2] for v in vs]}
            for k, vs in acc.items()]  # fmt: skip


def _plot(ctx: StudyContext, data: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    panels = [("step_s", "s per step", 1), ("peak_growth_mb", "peak RSS growth (MB)", 1),
              ("optimizer_state_bytes", "optimizer state (MB)", 2**-20), ("weights_bytes", "weights file (MB)", 2**-20)]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    colours = {"full": "tab:blue", "masked": "tab:orange", "lora": "tab:green"}
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        for j, model in enumerate(("toy", "qwen")):
            for i, r in enumerate(data[model]):
                ax.bar(j * 4 + i, max(r[key] * scale, 1e-6), color=colours[r["method"]],
                       label=r["method"] if j == 0 else None)  # fmt: skip
        q = data["qwen_config"]
        ax.set_xticks([1, 5], ["toy student", f"Qwen3 h{q['hidden_size']}×{q['num_hidden_layers']}"])
        ax.set_yscale("log")
        ax.set_title(label, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle("Full OPD vs masked retraining (20 % mask) vs LoRA (same trainable count), this machine")
    fig.tight_layout()
    path = ctx.plots / "savings.png"
    ctx.plots.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path.relative_to(ctx.out))


def run(ctx: StudyContext) -> Section:
    """Measured step time, memory, optimizer and file bytes, and end-to-end route costs."""
    bench_data = bench(ctx)
    data = json_roundtrip({"bench": bench_data, "end_to_end": end_to_end(ctx, bench_data["toy"])})
    plot = _plot(ctx, bench_data)
    markdown = render(RenderInfo.from_context(ctx), data, [plot])
    return Section("savings", "Savings, measured", markdown, data, [plot])


def render(info: RenderInfo, data: dict[str, Any], plots: list[str]) -> str:
    """The section's markdown from its data (as stored in ``study.json``)."""
    e2e, data = data["end_to_end"], data["bench"]
    mb = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    lines = ["| model | method | trainable | s / step | × full | peak RSS growth (MB) | optimizer state (MB) | "
             "weights file (MB) | all saved files (MB) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    q = data["qwen_config"]
    qname = f"Qwen3 h{q['hidden_size']}×{q['num_hidden_layers']}"
    for model, label in (("toy", "toy student (OPDTrainer step)"), ("qwen", f"{qname} (OPD-like step)")):
        full = next(r for r in data[model] if r["method"] == "full")
        for r in data[model]:
            name = {"full": "full OPD", "masked": "masked (20 % mask)",
                    "lora": f"LoRA r={data['lora_r'][model]}"}[r["method"]]  # fmt: skip
            lines.append(f"| {label} | {name} | {r['trainable']:,} | {r['step_s']:.3f} | "
                         f"{r['step_s'] / full['step_s']:.2f} | {r['peak_growth_mb']:.0f} | "
                         f"{mb(r['optimizer_state_bytes'])} | {mb(r['weights_bytes'])} | {mb(r['file_bytes'])} |")  # fmt: skip
    e2e_lines = ["| route to a model | recorded wall-clock (s) | cost in full-OPD steps | held-out acc % |",
                 "|---|---:|---:|---:|"]  # fmt: skip
    for r in e2e:
        e2e_lines.append(f"| {r['route']} | {mean_std(r['seconds'], 1, 0)} | {r['full_step_units']:.0f} | "
                         f"{mean_std(r['acc'], 100)} |")  # fmt: skip
    toy = {r["method"]: r for r in data["toy"]}
    qw = {r["method"]: r for r in data["qwen"]}
    md = [
        f"Same machine, one study run, {info.config.threads} thread(s), each configuration in a fresh process; step "
        f"time = the fastest of {data['repeats']} interleaved repeats of the median step; memory = growth of the "
        "peak resident set over the resident set before the first step. The masked adapter trains the toy run's "
        "top-20 % |ΔW| mask (toy) or a random 20 % per-module mask (Qwen3); LoRA has the rank giving about the same "
        "trainable count on the same modules.",
        "",
        *lines,
        "",
        f"Optimizer state: masked {toy['masked']['optimizer_state_bytes'] / toy['full']['optimizer_state_bytes']:.1%} "
        f"of full OPD on the toy, {qw['masked']['optimizer_state_bytes'] / qw['full']['optimizer_state_bytes']:.1%} "
        f"on {qname}; weights file {toy['masked']['weights_bytes'] / toy['full']['weights_bytes']:.1%} / "
        f"{qw['masked']['weights_bytes'] / qw['full']['weights_bytes']:.1%}. Step time: masked "
        f"{qw['masked']['step_s'] / qw['full']['step_s']:.2f}× full and "
        f"{qw['masked']['step_s'] / qw['lora']['step_s']:.2f}× LoRA on {qname} "
        f"({toy['masked']['step_s'] / toy['full']['step_s']:.2f}× / "
        f"{toy['masked']['step_s'] / toy['lora']['step_s']:.2f}× on the toy, whose step includes rollouts and "
        "teacher scoring).",
        "",
        "End to end (toy, study budget; recorded wall-clock of the study's runs, mean ± std over seeds, and the same "
        "routes in full-OPD-step units with the masked step costed at its measured ratio to a full step, which "
        "does not depend on machine load):",
        "",
        *e2e_lines,
        "",
        "The recorded wall-clock depends on the load of this shared machine while each run ran (the runs were not "
        "timed together); the step-unit column does not. A masked retrain after a full OPD run only adds cost; "
        "a probe + masked retrain route saves only if it reaches the accuracy wanted (see the predictors section).",
    ]
    md += ["", f"![savings]({plots[0]})"]
    return "\n".join(md)
