"""Study item 3, "Subnetwork recovery" (seed dense-supervision-sparse-updates): retrain from the anchor on a mask
taken from the full OPD run and compare with full OPD, a random mask and a low-magnitude mask of the same per-module
counts, and LoRA with about the same trainable count; equal steps, accuracy per step and final; AdamW vs SGD; and
the search for a regime where one run both learns a lot and leaves a sparse bf16-visible mask.

Masks come from each seed's own shared full OPD run (``ctx.full_opd(seed)``) and are retrained with that seed.
Rows marked primary run at ``config.seeds`` seeds, the others at :data:`SECONDARY_SEEDS` (the markdown says which).
The low-lr / SGD helpers and the plots live in :mod:`.recovery_extra`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from ..continual import matched_lora_rank
from .core import RenderInfo, Section, StudyContext, block_linears, json_roundtrip, mean_std

DENSITIES = (0.05, 0.10, 0.20, 0.45)
PRIMARY_DENSITIES = (0.20, 0.45)  # top-k and random rows at config.seeds; the other densities at SECONDARY_SEEDS
LOWMAG_DENSITIES = (0.20, 0.45)
LORA_MATCH = (0.20, 0.05)  # LoRA ranks matched to the trainable count of these top-k masks (first one primary)
SECONDARY_SEEDS = 1
CURVE_SAMPLES = 300  # held-out prompts of the per-step curves (the finals use config.eval_samples)
TARGETS = (0.5, 0.8)  # accuracy levels for "steps to reach X"
PAPER_MASKED = '≈ full OPD ("nearly the same")'
PAPER_RANDOM = '< masked ("random masks of the same density do not")'


# ---------------------------------------------------------------------------------------------- shared helpers
def pct(d: float) -> int:
    """0.2 -> 20."""
    return int(round(100 * d))


def curve_settings(ctx: StudyContext, steps: Optional[int] = None) -> dict[str, int]:
    """ToyRunConfig changes for a per-step accuracy curve: 10 evaluations on up to :data:`CURVE_SAMPLES` prompts."""
    n = steps or ctx.config.steps
    return {"eval_every": max(n // 10, 1), "eval_samples": min(CURVE_SAMPLES, ctx.config.eval_samples)}


def anchor_curve_acc(ctx: StudyContext) -> float:
    """Anchor accuracy on the curves' prompts (the step-0 point of every curve)."""
    from ..toy import heldout_accuracy

    n = min(CURVE_SAMPLES, ctx.config.eval_samples)
    fn = lambda: {"acc": heldout_accuracy(ctx.world.load_student(), ctx.world, ctx.config.task, n)}  # noqa: E731
    return ctx.cached(f"rec_anchor_curve_n{n}", fn)["acc"]


def anchor_acc(ctx: StudyContext) -> float:
    """Anchor accuracy on the final evaluation's ``config.eval_samples`` prompts."""
    return ctx.cached(
        f"rec_anchor_n{ctx.config.eval_samples}", lambda: {"acc": ctx.accuracy(ctx.world.load_student())}
    )["acc"]


def curve_of(result: dict[str, Any], start: tuple[int, float], offset: int = 0) -> list[list[float]]:
    """``[[step, eval_accuracy], ...]`` of a run's history, ``start`` first, steps shifted by ``offset``."""
    pts = [[float(start[0]), float(start[1])]]
    pts += [[float(h["step"] + offset), float(h["eval_accuracy"])] for h in result["history"] if "eval_accuracy" in h]
    return pts


def mean_curve(curves: Sequence[list[list[float]]]) -> list[list[float]]:
    """Pointwise mean over seeds (curves share their steps)."""
    if not curves:
        return []
    n = min(len(c) for c in curves)
    return [[curves[0][i][0], statistics.mean(c[i][1] for c in curves)] for i in range(n)]


def steps_to(curve: list[list[float]], x: float) -> Optional[float]:
    """First step at which ``curve`` reaches accuracy ``x`` (None when it never does)."""
    return next((s for s, a in curve if a >= x), None)


def fmt_steps(values: Sequence[Optional[float]]) -> str:
    """Mean steps over the seeds that reached the target, with ``(k/n)`` when not all did; ``never`` for none."""
    hit = [v for v in values if v is not None]
    if not hit:
        return "never"
    cell = f"{statistics.mean(hit):.0f}"
    return cell if len(hit) == len(values) else f"{cell} ({len(hit)}/{len(values)})"


def block_only_student(load: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``load()`` with only the block Linear weights trainable (the scope of the SparseOPD and LoRA adapters)."""
    from ...diagnostics.sources import is_block_linear

    model = load()
    for name, p in model.named_parameters():
        p.requires_grad_(is_block_linear(name, tuple(p.shape)))
    return model


def low_magnitude_like(mask: Any, anchor: torch.nn.Module) -> Any:
    """Bottom-|W0| coordinates with exactly ``mask``'s per-module counts (the low-magnitude control)."""
    from ...masks import SparseMask

    mods = dict(anchor.named_modules())
    entries = {}
    for name in mask:
        w = mods[name].weight.detach().float().abs().reshape(-1)
        idx = torch.topk(w, mask.nnz(name), largest=False, sorted=False).indices
        entries[name] = (mask.shape(name), idx.sort().values)
    return SparseMask.from_indices(entries, {"rule": "low_magnitude_like", "like_density": mask.density()})


def lora_student(load: Callable[[], torch.nn.Module], modules: Sequence[str], r: int) -> torch.nn.Module:
    """peft LoRA (rank ``r``, alpha 2r, no dropout) on ``modules`` of ``load()``."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(modules), bias="none")
    return get_peft_model(load(), cfg)


def masked_student(load: Callable[[], torch.nn.Module], mask: Any) -> torch.nn.Module:
    """``get_peft_model(load(), SparseOPDConfig(mask=mask))``."""
    from peft import get_peft_model

    from ...tuner import SparseOPDConfig

    return get_peft_model(load(), SparseOPDConfig(mask=mask))


# ---------------------------------------------------------------------------------------------- the main table
def seed_masks(ctx: StudyContext, seed: int) -> dict[str, Any]:
    """All masks of one seed, from that seed's full OPD run: bf16-visible; top-k, random and low-magnitude."""
    from ...masks import mask_from_checkpoints, random_like

    _, final = ctx.full_opd(seed)
    src, anchor = ctx.student_path(), ctx.world.student  # read only: the magnitudes of the low-magnitude masks
    masks = {"bf16": mask_from_checkpoints(src, final, rule="bf16_visible")}
    for d in DENSITIES:
        top = mask_from_checkpoints(src, final, rule="topk", density=d)
        masks[f"top{pct(d)}"] = top
        masks[f"random{pct(d)}"] = random_like(top, seed=1000 + seed)
        if d in LOWMAG_DENSITIES:
            masks[f"lowmag{pct(d)}"] = low_magnitude_like(top, anchor)
    return masks


def arms(shapes: dict[str, tuple[int, int]], total: int) -> list[dict[str, Any]]:
    """The rows of the main table: key, label, kind, primary, and the mask key / LoRA rank they use."""
    rows: list[dict[str, Any]] = [
        {"key": "full", "label": "full OPD (all parameters)", "kind": "full", "primary": True},
        {"key": "block", "label": "full OPD, block Linears only (the adapters' scope)", "kind": "block",
         "primary": False},
        {"key": "bf16", "label": "bf16-visible mask", "kind": "mask", "primary": False},
    ]  # fmt: skip
    for d in DENSITIES:
        p, prim = pct(d), d in PRIMARY_DENSITIES
        rows.append({"key": f"top{p}", "label": f"top-{p} % \\|ΔW\\| mask", "kind": "mask", "primary": prim})
        rows.append({"key": f"random{p}", "label": f"random, same per-module counts as top-{p} %", "kind": "mask",
                     "primary": prim})  # fmt: skip
        if d in LOWMAG_DENSITIES:
            rows.append({"key": f"lowmag{p}", "label": f"low-magnitude \\|W0\\|, same per-module counts as top-{p} %",
                         "kind": "mask", "primary": d == 0.20})  # fmt: skip
    for i, d in enumerate(LORA_MATCH):
        r = matched_lora_rank(int(round(d * total)), shapes)
        rows.append({"key": f"lora{pct(d)}", "label": f"LoRA r={r} (count ≈ top-{pct(d)} %)", "kind": "lora",
                     "primary": i == 0, "rank": r})  # fmt: skip
    return rows


def run_arm(ctx: StudyContext, arm: dict[str, Any], seed: int, shapes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """One (row, seed) run; masks are built only when the run is not cached."""
    load, curve = ctx.world.load_student, curve_settings(ctx)
    if arm["kind"] == "full":
        return ctx.opd(f"rec_fullcurve_s{seed}", load, seed=seed, **curve)
    if arm["kind"] == "block":
        return ctx.opd(f"rec_block_s{seed}", lambda: block_only_student(load), seed=seed, **curve)
    if arm["kind"] == "lora":
        return ctx.opd(f"rec_lora_r{arm['rank']}_s{seed}", lambda: lora_student(load, list(shapes), arm["rank"]),
                       seed=seed, **curve)  # fmt: skip
    return ctx.opd(f"rec_{arm['key']}_s{seed}", lambda: masked_student(load, seed_masks(ctx, seed)[arm["key"]]),
                   seed=seed, **curve)  # fmt: skip


def main_table(ctx: StudyContext) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run every (row, seed); returns the rows with accuracies, curves, steps-to-target and mask statistics."""
    shapes = block_linears(ctx.world.student)
    total = sum(o * i for o, i in shapes.values())
    start = (0, anchor_curve_acc(ctx))
    stats = {}
    for key, m in seed_masks(ctx, ctx.seeds[0]).items():
        stats[key] = {"nnz": m.nnz(), "density": m.nnz() / total, "ffn_share": m.type_stats()["ffn"]["share_of_nnz"]}
    rows = arms(shapes, total)
    for arm in rows:
        seeds = ctx.seeds if arm["primary"] else ctx.seeds[:SECONDARY_SEEDS]
        results = [run_arm(ctx, arm, s, shapes) for s in seeds]
        arm["seeds"] = list(seeds)
        arm["trainable"] = results[0]["trainable"]
        arm["acc"] = [r["acc"] for r in results]
        if arm["kind"] == "full":
            arm["acc_rerun"] = arm["acc"]
            arm["acc"] = [ctx.full_opd(s)[0]["acc"] for s in seeds]
        arm["curves"] = [curve_of(r, start) for r in results]
        arm["steps_to"] = {str(x): [steps_to(c, x) for c in arm["curves"]] for x in TARGETS}
        arm["train_seconds"] = statistics.mean(r["train_seconds"] for r in results)
        arm.update({k: v for k, v in stats.get(arm["key"], {}).items() if k != "nnz"})
        arm["density"] = arm.get("density", arm["trainable"] / total if arm["kind"] == "lora" else 1.0)
    meta = {"anchor_acc": anchor_acc(ctx), "anchor_curve_acc": start[1], "block_params": total,
            "lora_per_rank": sum(o + i for o, i in shapes.values()), "mask_stats_seed0": stats}  # fmt: skip
    return rows, meta


def table_md(rows: list[dict[str, Any]], n_final: int) -> list[str]:
    """Markdown of the main table."""
    head = [
        f"| run | trainable (share of block Linears) | FFN share | seeds | final acc % ({n_final} prompts) | "
        f"steps to {pct(TARGETS[0])} % | steps to {pct(TARGETS[1])} % | papers |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    paper = {"full": "reference", "bf16": PAPER_MASKED, "random20": PAPER_RANDOM, "top20": PAPER_MASKED}
    for r in rows:
        ffn = f"{100 * r['ffn_share']:.0f} %" if "ffn_share" in r else "–"
        head.append(
            f"| {r['label']} | {r['trainable']:,} ({100 * r['density']:.1f} %) | {ffn} | {len(r['seeds'])} | "
            f"{mean_std(r['acc'], 100)} | {fmt_steps(r['steps_to'][str(TARGETS[0])])} | "
            f"{fmt_steps(r['steps_to'][str(TARGETS[1])])} | {paper.get(r['key'], '')} |"
        )
    head.append(
        f"\nSteps to X: first evaluation step (every 10 % of the run, {CURVE_SAMPLES}-prompt curve) at "
        "which held-out accuracy reached X, mean over the seeds that reached it ((k/n) when not all did)."
    )
    return head


def word_of(diff: float, tol: float) -> str:
    """The study's comparison word for a difference: "≈" when ``|diff| <= tol``, else ">" or "<"."""
    return "≈" if abs(diff) <= tol else (">" if diff > 0 else "<")


def compare(a: Sequence[float], b: Sequence[float]) -> tuple[str, float, float]:
    """``(word, Δ, tol)`` of two accuracy lists (shares) in points: word "≈" when the means differ by at most
    tol = max(2 points, 2 × the larger std), else ">" or "<"."""
    sd = lambda x: 100 * statistics.stdev(x) if len(x) > 1 else 0.0  # noqa: E731
    diff, tol = 100 * statistics.mean(a) - 100 * statistics.mean(b), max(2.0, 2 * max(sd(a), sd(b)))
    return word_of(diff, tol), diff, tol


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """Plain statements: masked ≈ full? random ≈ masked? (differences beyond 2 std of the pair count)."""
    by = {r["key"]: r for r in rows}

    def cmp(a: str, b: str) -> str:
        word, diff, tol = compare(by[a]["acc"], by[b]["acc"])
        ma, mb = (100 * statistics.mean(by[k]["acc"]) for k in (a, b))
        return f"{ma:.1f} {word} {mb:.1f} (Δ {diff:+.1f}, tol. {tol:.1f})"

    out = []
    for p in (pct(d) for d in DENSITIES):
        out.append(
            f"- top-{p} % mask vs full OPD: {cmp(f'top{p}', 'full')}; vs full training of the same scope (block "
            f"Linears only): {cmp(f'top{p}', 'block')}; random mask of the same counts vs the top-{p} % mask: "
            f"{cmp(f'random{p}', f'top{p}')}."
        )
    out.append(f"- bf16-visible mask vs full OPD: {cmp('bf16', 'full')}; vs block Linears only: {cmp('bf16', 'block')} "
               f"(the mask is {100 * by['bf16']['density']:.1f} % dense at this lr: nearly full training).")  # fmt: skip
    out.append(f"- scope: full OPD of the block Linears only vs of all parameters: {cmp('block', 'full')}.")
    out.append(f"- low-magnitude vs random, same counts as top-20 %: {cmp('lowmag20', 'random20')}.")
    out.append(f"- {by['lora20']['label']} vs the top-20 % mask: {cmp('lora20', 'top20')}.")
    return out


def run(ctx: StudyContext) -> Section:
    """Item 3: the main recovery table, the AdamW-vs-SGD ablation and the low-lr regime search."""
    from . import recovery_extra as extra

    rows, meta = main_table(ctx)
    sgd = extra.sgd_ablation(ctx, rows, meta)
    low = extra.low_lr_regime(ctx, rows, meta, sgd)
    plots = extra.plots(ctx, rows, sgd, low)
    info = RenderInfo.from_context(ctx)
    data = json_roundtrip({"rows": rows, "meta": meta, "sgd": sgd, "low_lr": low,
                           "compute_seconds": info.compute_seconds("rec_")[1]})  # fmt: skip
    return Section("recovery", "Subnetwork recovery (masked retraining)", render(info, data, plots), data, plots)


def render(info: RenderInfo, data: dict[str, Any], plots: list[str]) -> str:
    """The section's markdown from its data (as stored in ``study.json``)."""
    from . import recovery_extra as extra

    config, rows, meta = info.config, data["rows"], data["meta"]
    n = config.seeds
    md = [
        f"Each seed's own full OPD run (the shared `opd_full_s<seed>`, {config.steps} steps, AdamW lr "
        f"{config.lr:g}) gives the masks; each row retrains from the anchor with the same recipe and seed "
        f"(equal steps). Masks: bf16-visible (|bf16(W₊) − bf16(W0)| > 0) and top-k |ΔW| over all block Linears; "
        "random and low-magnitude controls keep each module's coordinate count of the top-k mask; LoRA (peft, alpha = "
        f"2r, same lr) on the same {len(info.block_linears)} block Linears with the rank whose "
        f"count r·Σ(in+out) = r·{meta['lora_per_rank']:,} is nearest to the mask's. Primary rows at {n} seed(s), "
        f"secondary rows at {SECONDARY_SEEDS} (the seeds column; to fit the compute budget). The full-OPD "
        "row's final accuracy is the shared run's; its curve comes from a re-run with evaluations (finals "
        f"{mean_std(next(r for r in rows if r['key'] == 'full')['acc_rerun'], 100)} %). Anchor "
        f"{100 * meta['anchor_acc']:.1f} %. Adapters train block Linears only, full OPD also embeddings, norms "
        "and lm_head: the block-only row separates scope from sparsity. No random row for the bf16-visible mask: at "
        "this lr the mask is nearly dense, so a random mask of the same per-module counts is nearly the same set.",
        "",
        *table_md(rows, config.eval_samples),
        "",
        "**Verdicts** (≈ when the means differ by at most max(2 points, 2 std)):",
        *verdicts(rows),
        "",
        *extra.sgd_md(config, data["sgd"]),
        "",
        *extra.low_lr_md(data["low_lr"], meta),
    ]
    n_runs, secs = info.compute_seconds("rec_")
    md += ["", f"Compute: {n_runs} cached entries named `rec_*`, {secs / 60:.1f} min of wall-clock as first measured "
           f"({config.threads} thread(s); the shared full OPD runs not included)."]  # fmt: skip
    return "\n".join(md)
