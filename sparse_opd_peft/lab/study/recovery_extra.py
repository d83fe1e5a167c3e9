"""Second half of study item 3 (see :mod:`.recovery`): AdamW vs SGD under OPD, the search for a regime where one run
both learns a lot and leaves a sparse bf16-visible mask (and the papers' exact protocol there), and the plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Optional

from .core import StudyConfig, StudyContext
from .recovery import (
    CURVE_SAMPLES,
    anchor_curve_acc,
    block_only_student,
    curve_of,
    curve_settings,
    masked_student,
    mean_curve,
    pct,
    seed_masks,
    word_of,
)

SGD_LRS = (0.03, 0.1, 0.3, 1.0)  # full-parameter SGD grid (gradients clipped to norm 1, as in every run)
SGD_MASKED_LRS = (0.1, 0.3, 1.0)  # masked top-20 % SGD grid
SGD_BLOCK_LRS = (0.1, 1.0)  # all-block-Linears SGD grid (is full SGD's failure due to embeddings / lm_head?)
LOW_LRS = (1e-6, 1e-5, 1e-4)  # AdamW lrs of the low-lr regime search
LOW_STEPS_FACTOR = 2  # their runs are this many times longer than config.steps
SPARSE = 0.5  # "sparse": bf16-visible density at most this (the papers: OPD leaves 48.6-57.1 % unchanged)
LEARNS = 0.5  # "learns a lot": at least this share of the full-OPD accuracy gain over the anchor
PAPER_SPARSITY = "OPD bf16 sparsity 51.6 % (Qwen3-8B; variants 48.6–57.1 %); 66.7–89.5 % of entries move < 1e-5"


def visible_density(ctx: StudyContext, tuned: Path, total: int) -> float:
    """bf16-visible changed share of all block-Linear entries between the anchor and ``tuned`` (0 when none)."""
    from ...masks import mask_from_checkpoints

    try:
        return mask_from_checkpoints(ctx.student_path(), tuned, rule="bf16_visible").nnz() / total
    except ValueError:  # no coordinate visible at all
        return 0.0


def density_traj(ctx: StudyContext, run_name: str, total: int) -> dict[str, list[float]]:
    """bf16-visible density of every snapshot of run ``run_name`` (cached as ``rec_bf16traj_<run_name>``)."""
    from ...opd.checkpoint import snapshot_paths

    def fn() -> dict[str, Any]:
        ck = ctx.artifact_dir(run_name) / "checkpoints"
        snaps = snapshot_paths(ck)
        return {"steps": [k for k, _ in snaps], "density": [visible_density(ctx, path, total) for _, path in snaps]}

    return ctx.cached(f"rec_bf16traj_{run_name}", fn)


def final_density(ctx: StudyContext, run_name: str, total: int) -> float:
    """bf16-visible density of run ``run_name``'s saved final model (cached as ``rec_bf16_<run_name>``)."""
    fn = lambda: {"density": visible_density(ctx, ctx.artifact_dir(run_name) / "final", total)}  # noqa: E731
    return ctx.cached(f"rec_bf16_{run_name}", fn)["density"]


def lr_sum(result: dict[str, Any]) -> float:
    """Σ over the run's steps of the learning rate (an AdamW coordinate moves at most about lr per step)."""
    return float(sum(h.get("lr", 0.0) for h in result["history"]))


# ---------------------------------------------------------------------------------------------- AdamW vs SGD
def sgd_ablation(ctx: StudyContext, rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """Full-parameter SGD over :data:`SGD_LRS`, then masked (top-20 %) SGD around the best lr; seed 0 only."""
    s, load, curve = ctx.seeds[0], ctx.world.load_student, curve_settings(ctx)
    start, total = (0, anchor_curve_acc(ctx)), meta["block_params"]
    full = []
    for lr in SGD_LRS:
        name = f"rec_sgd_full_lr{lr:g}_s{s}"
        r = ctx.opd(name, load, save_model=True, seed=s, optimizer="sgd", lr=lr, **curve)
        full.append({"name": name, "lr": lr, "acc": r["acc"], "curve": curve_of(r, start),
                     "density": final_density(ctx, name, total)})  # fmt: skip
    best = max(full, key=lambda x: x["acc"])["lr"]
    masked = []
    for lr in SGD_MASKED_LRS:
        r = ctx.opd(f"rec_sgd_top20_lr{lr:g}_s{s}", lambda: masked_student(load, seed_masks(ctx, s)["top20"]),
                    seed=s, optimizer="sgd", lr=lr, **curve)  # fmt: skip
        masked.append({"lr": lr, "acc": r["acc"], "curve": curve_of(r, start)})
    block = []
    for lr in SGD_BLOCK_LRS:
        r = ctx.opd(f"rec_sgd_block_lr{lr:g}_s{s}", lambda: block_only_student(load), seed=s, optimizer="sgd", lr=lr,
                    **curve)  # fmt: skip
        block.append({"lr": lr, "acc": r["acc"], "curve": curve_of(r, start)})
    by = {r["key"]: r for r in rows}
    adamw = {k: {"acc": by[k]["acc"][0], "curve": by[k]["curves"][0]} for k in ("full", "block", "top20")}
    state = ctx.artifact_dir(f"opd_full_s{s}") / "checkpoints" / "state" / "opd_trainer_state.json"
    norms = [h["grad_norm"] for h in json.loads(state.read_text())["history"] if h.get("grad_norm") is not None] if (
        state.exists()) else []  # fmt: skip
    return {
        "seed": s,
        "full": full,
        "masked_top20": masked,
        "block": block,
        "best_full_lr": best,
        "adamw": adamw,
        "adamw_full_grad_norm": [min(norms), statistics.median(norms), max(norms)] if norms else None,
    }


def sgd_md(config: StudyConfig, sgd: dict[str, Any]) -> list[str]:
    """Markdown of the optimizer ablation."""
    best_full = max(sgd["full"], key=lambda x: x["acc"])
    best_mask = max(sgd["masked_top20"], key=lambda x: x["acc"])
    best_block = max(sgd["block"], key=lambda x: x["acc"])
    aw = sgd["adamw"]

    def word(a: dict, b: dict) -> str:  # ≈ within 2 points
        return f"{100 * a['acc']:.1f} {word_of(100 * (a['acc'] - b['acc']), 2)} {100 * b['acc']:.1f}"

    lines = [
        f"**AdamW vs SGD under OPD** (seed {sgd['seed']}, {config.steps} steps, same schedule, gradients clipped "
        "to norm 1 as in every run; SGD without momentum). Tried SGD lr "
        + ", ".join(f"{x['lr']:g} → {100 * x['acc']:.1f} %" for x in sgd["full"])
        + " (full); masked top-20 % at "
        + ", ".join(f"{x['lr']:g} → {100 * x['acc']:.1f} %" for x in sgd["masked_top20"])
        + "; all block Linears (embeddings, norms, lm_head frozen) at "
        + ", ".join(f"{x['lr']:g} → {100 * x['acc']:.1f} %" for x in sgd["block"])
        + "."
        + (
            " Gradient norms here are ≫ 1 (AdamW full run, pre-clip: median {:.0f}, range {:.0f}–{:.0f}), so clipped "
            "SGD takes steps of length ≈ lr (normalised gradient descent).".format(
                sgd["adamw_full_grad_norm"][1], sgd["adamw_full_grad_norm"][0], sgd["adamw_full_grad_norm"][2]
            )
            if sgd.get("adamw_full_grad_norm")
            else ""
        ),
        "",
        "| optimizer | full OPD % | all block Linears % | top-20 % mask % | papers |",
        "|---|---:|---:|---:|---|",
        f"| AdamW lr {config.lr:g} | {100 * aw['full']['acc']:.1f} | {100 * aw['block']['acc']:.1f} | "
        f"{100 * aw['top20']['acc']:.1f} | better |",
        f"| SGD, best lr of each grid ({best_full['lr']:g} / {best_block['lr']:g} / {best_mask['lr']:g}) | "
        f"{100 * best_full['acc']:.1f} | {100 * best_block['acc']:.1f} | {100 * best_mask['acc']:.1f} | "
        'worse ("SGD underperforms AdamW") |',
        "",
        f"SGD vs AdamW at this budget (1 seed): full OPD {word(best_full, aw['full'])}, all block Linears "
        f"{word(best_block, aw['block'])}, top-20 % mask {word(best_mask, aw['top20'])}. SGD's final bf16-visible "
        "density (full): " + ", ".join(f"lr {x['lr']:g}: {100 * x['density']:.1f} %" for x in sgd["full"]) + ".",
    ]
    return lines


# ---------------------------------------------------------------------------------------------- low-lr regime
def low_lr_regime(ctx: StudyContext, rows: list[dict[str, Any]], meta: dict[str, Any], sgd: dict[str, Any]) -> dict:
    """AdamW at :data:`LOW_LRS` for ``LOW_STEPS_FACTOR × steps`` (seed 0) plus the SGD runs: does any run both learn
    a lot and leave a sparse bf16-visible mask? Then the papers' protocol (retrain on that run's bf16-visible mask
    vs a random mask, same recipe) at the best candidate."""
    from ...masks import mask_from_checkpoints, random_like

    s, load, total = ctx.seeds[0], ctx.world.load_student, meta["block_params"]
    steps = LOW_STEPS_FACTOR * ctx.config.steps
    start = (0, anchor_curve_acc(ctx))
    full_acc = next(r for r in rows if r["key"] == "full")["acc"][0]
    gain = lambda acc: (acc - meta["anchor_acc"]) / max(full_acc - meta["anchor_acc"], 1e-9)  # noqa: E731
    full_traj = density_traj(ctx, f"opd_full_s{s}", total)
    cands = [{"name": f"opd_full_s{s}", "lr_sum": lr_sum(ctx.full_opd(s)[0]), "label": f"AdamW lr {ctx.config.lr:g}, {ctx.config.steps} steps (full OPD)",
              "optimizer": "adamw", "lr": ctx.config.lr, "steps": ctx.config.steps, "acc": full_acc,
              "density": full_traj["density"][-1], "traj": full_traj, "curve": rows[0]["curves"][0]}]  # fmt: skip
    for lr in LOW_LRS:
        name = f"rec_lowlr{lr:g}_s{s}"
        r = ctx.opd(name, load, save_model=True, save_every=max(steps // 10, 1), seed=s, lr=lr, steps=steps,
                    **curve_settings(ctx, steps))  # fmt: skip
        traj = density_traj(ctx, name, total)
        cands.append({"name": name, "label": f"AdamW lr {lr:g}, {steps} steps", "optimizer": "adamw", "lr": lr,
                      "lr_sum": lr_sum(r),
                      "steps": steps, "acc": r["acc"], "density": final_density(ctx, name, total), "traj": traj,
                      "curve": curve_of(r, start)})  # fmt: skip
    for x in sgd["full"]:
        cands.append({"name": x["name"], "label": f"SGD lr {x['lr']:g}, {ctx.config.steps} steps", "optimizer": "sgd",
                      "lr": x["lr"], "steps": ctx.config.steps, "acc": x["acc"], "density": x["density"],
                      "curve": x["curve"]})  # fmt: skip
    for c in cands:
        c["gain_share"] = gain(c["acc"])
        c["qualifies"] = c["gain_share"] >= LEARNS and c["density"] <= SPARSE
    pool = [c for c in cands[1:] if c["qualifies"]] or [c for c in cands[1:] if c["gain_share"] >= LEARNS / 2]
    pick = min(pool, key=lambda c: c["density"]) if pool else max(cands[1:], key=lambda c: c["gain_share"])
    final = ctx.artifact_dir(pick["name"]) / "final"
    changes = dict(seed=s, lr=pick["lr"], steps=pick["steps"], optimizer=pick["optimizer"],
                   **curve_settings(ctx, pick["steps"]))  # fmt: skip
    mask = lambda: mask_from_checkpoints(ctx.student_path(), final, rule="bf16_visible")  # noqa: E731
    proto = {}
    for kind in ("mask", "random"):
        build = mask if kind == "mask" else (lambda: random_like(mask(), seed=2000 + s))
        r = ctx.opd(f"rec_protocol_{kind}_{pick['name']}", lambda b=build: masked_student(load, b()), **changes)
        proto[kind] = {"acc": r["acc"], "curve": curve_of(r, start)}
    return {"candidates": cands, "pick": pick["name"], "regime_found": any(c["qualifies"] for c in cands),
            "protocol": proto, "seed": s}  # fmt: skip


def low_lr_md(low: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    """Markdown of the regime search and the protocol."""
    pick = next(c for c in low["candidates"] if c["name"] == low["pick"])
    lines = [
        f'**Low-lr regime** (seed {low["seed"]}; "learns a lot" = at least {pct(LEARNS)} % of full OPD\'s gain over '
        f'the anchor, "sparse" = bf16-visible density ≤ {pct(SPARSE)} %; papers: {PAPER_SPARSITY}):',
        "",
        "| run | Σₜ lrₜ (AdamW: how far one coordinate can move) | final acc % | share of full-OPD gain | "
        "bf16-visible density | both? |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for c in low["candidates"]:
        lr_cell = f"{c['lr_sum']:.2g}" if "lr_sum" in c else "–"
        lines.append(f"| {c['label']} | {lr_cell} | {100 * c['acc']:.1f} | {100 * c['gain_share']:.0f} % | "
                     f"{100 * c['density']:.1f} % | {'yes' if c['qualifies'] else 'no'} |")  # fmt: skip
    p = low["protocol"]
    verdict = word_of(p["mask"]["acc"] - p["random"]["acc"], 0.02)
    found = "A regime exists" if low["regime_found"] else "No run both learned a lot and left a sparse bf16 mask"
    adam = [c for c in low["candidates"] if c["optimizer"] == "adamw"]
    sparsest = min(adam, key=lambda c: c["density"])
    learners = [c for c in adam if c["gain_share"] >= LEARNS]
    if learners:
        least = min(learners, key=lambda c: c["density"])
        found += (
            f". AdamW moves every coordinate with a nonzero gradient by about lr per step: its sparsest run here "
            f"({sparsest['label']}, Σ lr {sparsest['lr_sum']:.2g}) already changed {100 * sparsest['density']:.0f} % "
            f"of the entries visibly for {100 * sparsest['gain_share']:.0f} % of the gain, while the sparsest run that "
            f"learns a lot ({least['label']}, Σ lr {least['lr_sum']:.2g}) changed {100 * least['density']:.0f} %"
        )
    lines += [
        "",
        f"{found}. The papers' exact protocol at the best candidate ({pick['label']}, its bf16-visible mask "
        f"{100 * pick['density']:.1f} % dense; same optimizer, lr, steps and seed): masked "
        f"{100 * p['mask']['acc']:.1f} % {verdict} random (same per-module counts) {100 * p['random']['acc']:.1f} % vs "
        f"the source run {100 * pick['acc']:.1f} % (anchor {100 * meta['anchor_acc']:.1f} %). The papers: masked ≈ "
        "full, random worse.",
    ]
    return lines


# ---------------------------------------------------------------------------------------------- plots
def plots(ctx: StudyContext, rows: list[dict[str, Any]], sgd: dict[str, Any], low: dict[str, Any]) -> list[str]:
    """``plots/recovery_curves.png``, ``recovery_optim.png``, ``recovery_lowlr.png``; returns paths relative to out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {r["key"]: r for r in rows}

    def line(ax, curve, label, **kw):
        ax.plot([p[0] for p in curve], [100 * p[1] for p in curve], label=label, **kw)

    out = []
    colors = {"full": "k", "block": "grey", "bf16": "C0", "45": "C1", "20": "C2", "10": "C3", "5": "C4"}
    styles = {"random": "--", "lowmag": ":", "lora": "-."}
    fig, axes = plt.subplots(1, 2, figsize=(13, 6), sharey=True)
    for ax, keys, title in (
        (axes[0], ["full", "block", "bf16", "top45", "top20", "top10", "top5"], "top-k |ΔW| masks by density"),
        (axes[1], ["full", "top20", "random20", "lowmag20", "lora20", "top45", "random45"], "controls at ≈ 20 / 45 %"),
    ):
        for k in (k for k in keys if k in by):
            kind = k.rstrip("0123456789")
            color = colors.get(k) or colors.get(k[len(kind) :], "C5")
            line(ax, mean_curve(by[k]["curves"]), f"{by[k]['label']} (n={len(by[k]['seeds'])})".replace("\\", ""),
                 ls=styles.get(kind, "-"), marker=".", color=color)  # fmt: skip
        ax.set(title=title, xlabel="OPD step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    axes[0].set_ylabel(f"held-out accuracy % ({min(CURVE_SAMPLES, ctx.config.eval_samples)} prompts)")
    out.append(_save(fig, ctx, "recovery_curves.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    line(ax, sgd["adamw"]["full"]["curve"], f"AdamW {ctx.config.lr:g}, full", lw=2, color="k")
    line(ax, sgd["adamw"]["top20"]["curve"], f"AdamW {ctx.config.lr:g}, top-20 % mask", lw=2, color="k", ls="--")
    for x in sgd["full"]:
        line(ax, x["curve"], f"SGD {x['lr']:g}, full", marker=".")
    for x in sgd["masked_top20"]:
        line(ax, x["curve"], f"SGD {x['lr']:g}, top-20 % mask", ls="--", marker=".")
    for x in sgd["block"]:
        line(ax, x["curve"], f"SGD {x['lr']:g}, block Linears only", ls=":", marker="o", ms=3)
    ax.set(title=f"AdamW vs SGD under OPD (seed {sgd['seed']})", xlabel="OPD step", ylabel="held-out accuracy %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    out.append(_save(fig, ctx, "recovery_optim.png"))

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for c in low["candidates"]:
        if "traj" in c:
            axes[0].plot(c["traj"]["steps"], [100 * d for d in c["traj"]["density"]], marker=".", label=c["label"])
        line(axes[1], c["curve"], c["label"], marker=".")
        axes[2].scatter(100 * c["density"], 100 * c["acc"], label=c["label"])
    for kind, mk in (("mask", "*"), ("random", "x")):
        axes[2].scatter(100 * next(c for c in low["candidates"] if c["name"] == low["pick"])["density"],
                        100 * low["protocol"][kind]["acc"], marker=mk, s=120, color="k",
                        label=f"protocol: retrain on {kind}")  # fmt: skip
    axes[2].axvspan(10.5, 51.4, color="g", alpha=0.1, label="papers' OPD update density (10.5–51.4 %)")
    axes[0].set(title="bf16-visible density vs step", xlabel="step", ylabel="changed share of block Linears %")
    axes[1].set(title="held-out accuracy vs step", xlabel="step", ylabel="accuracy %")
    axes[2].set(title="final: density vs accuracy", xlabel="bf16-visible density %", ylabel="accuracy %")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    out.append(_save(fig, ctx, "recovery_lowlr.png"))
    return out


def _save(fig: Any, ctx: StudyContext, name: str, rel: Optional[str] = None) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(ctx.plots / name, dpi=110)
    plt.close(fig)
    return rel or f"plots/{name}"
