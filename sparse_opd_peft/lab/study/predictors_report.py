"""Section "predictors": its table, verdict, plot and markdown, from the data the section stores (see
:mod:`.predictors` for what is measured)."""

from __future__ import annotations

import statistics as st
from typing import Any

from .core import RenderInfo, StudyContext, mean_std

__all__ = ["outcome", "plot_predictors", "render"]


def _mean(xs: list[float]) -> float | None:
    return st.mean(xs) if xs else None


def _table(rows: dict[str, dict], steps: int) -> list[str]:
    final, rand = _mean(rows["final"]["acc"]), _mean(rows["random"]["acc"])
    lines = ["| predictor | cost: steps (share of run) · s | FFN share | precision (random) | recall (random) | "
             "IoU (random) | retrain acc % | share of final's gain over random | seeds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip

    def cell(ag: list[dict], k: str) -> str:
        return f"{mean_std([a[k] for a in ag], 100)} ({_mean([a['random_expectation_' + k] for a in ag]) * 100:.1f})"

    for row in rows.values():
        ag = row["agreement"]
        acc = _mean(row["acc"])
        gain = "–"
        if acc is not None and final is not None and rand is not None and abs(final - rand) > 1e-9:
            gain = f"{100 * (acc - rand) / (final - rand):.0f} %"
        cost = f"{row['steps']} ({100 * row['steps'] / steps:.0f} %) · {_mean(row['seconds']):.1f}"
        label = row["label"].replace("|", "\\|")
        lines.append(f"| {label} | {cost} | {100 * _mean(row['ffn_share']):.0f} % | "
                     f"{cell(ag, 'precision')} | {cell(ag, 'recall')} | {cell(ag, 'iou')} | {mean_std(row['acc'], 100)} | {gain} | "
                     f"{len(row['acc']) or '–'} |")  # fmt: skip
    return lines


def outcome(rows: dict[str, dict]) -> tuple[str, list[str]]:
    """The verdict on "a predictor recovers full-mask quality" from the retrained rows: ``("no_separation", [])``
    when the final mask is not 2 points better than the random one, else ``("recovers", keys)`` with the retrained
    predictors within 2 points of the final mask, or ``("none", [])`` when there is none."""
    final, rand = _mean(rows["final"]["acc"]), _mean(rows["random"]["acc"])
    if final - rand < 0.02:
        return "no_separation", []
    good = [k for k, r in rows.items() if r["acc"] and r["kind"] not in ("oracle", "control")
            and _mean(r["acc"]) >= final - 0.02]  # fmt: skip
    return ("recovers", good) if good else ("none", [])


def _verdict(rows: dict[str, dict], full_acc: float) -> list[str]:
    final, rand = _mean(rows["final"]["acc"]), _mean(rows["random"]["acc"])
    out = []
    tested = [(k, r) for k, r in rows.items() if r["acc"] and r["kind"] not in ("oracle", "control")]
    kind, good_keys = outcome(rows)
    good = [(k, rows[k]) for k in good_keys]
    best_k, best = max(tested, key=lambda kr: _mean(kr[1]["acc"]))
    out.append(f"Full OPD reaches {100 * full_acc:.1f} %; retraining on the final mask {100 * final:.1f} %, on a "
               f"random mask of the same per-module density {100 * rand:.1f} %.")  # fmt: skip
    if kind == "no_separation":
        out.append("The final mask itself is not 2 points better than random here, so \"recovering full-mask quality\" "
                   "does not separate the predictors at this setting.")  # fmt: skip
    elif good:
        names = "; ".join(f"{r['label']} ({100 * _mean(r['acc']):.1f} %, {len(r['acc'])} seed(s), cost {r['steps']} "
                          f"steps ≈ {_mean(r['seconds']):.0f} s)" for _, r in good)  # fmt: skip
        out.append(f"**Recovers full-mask quality (within 2 points):** {names}.")
    else:
        out.append(f"**No predictor recovers full-mask quality** (within 2 points of the final mask). The best is "
                   f"{best['label']}: {100 * _mean(best['acc']):.1f} % at a cost of {best['steps']} steps "
                   f"({_mean(best['seconds']):.0f} s).")  # fmt: skip
    worse = [r["label"] for _, r in tested if _mean(r["acc"]) <= rand + 0.01]
    if worse:
        out.append(f"No better than the random mask (≤ 1 point above it): {'; '.join(worse)}.")
    lift = lambda r: _mean([a["precision"] - a["random_expectation_precision"] for a in r["agreement"]])  # noqa: E731
    anti = []
    for kind in ("gradient", "combination", "prior"):
        of_kind = [r for r in rows.values() if r["kind"] == kind]
        below = [r["label"] for r in of_kind if lift(r) < 0]
        if below and len(below) == len(of_kind) > 1:
            anti.append(f"all {len(of_kind)} {kind} predictors")
        else:
            anti += below
    if anti:
        out.append(f"Precision below the random expectation (anti-predictive at this density): {'; '.join(anti)}.")
    by_iou = max(tested, key=lambda kr: _mean([a["iou"] for a in kr[1]["agreement"]]))
    if by_iou[0] != best_k:
        out.append(
            f"Agreement with the final mask does not rank the masks by retraining accuracy: the highest-IoU "
            f"predictor ({by_iou[1]['label']}, IoU {100 * _mean([a['iou'] for a in by_iou[1]['agreement']]):.1f} %) "
            f"retrains to {100 * _mean(by_iou[1]['acc']):.1f} %, the best-retraining one ({best['label']}, IoU "
            f"{100 * _mean([a['iou'] for a in best['agreement']]):.1f} %) to {100 * _mean(best['acc']):.1f} %."
        )
    alloc = rows.get("alloc_sq")
    if alloc and alloc["acc"] and rows.get("g16_sq", {}).get("acc"):
        out.append(
            f"Allocation vs coordinates: random coordinates with the Σg² mask's per-module counts (FFN share "
            f"{100 * _mean(alloc['ffn_share']):.0f} %) retrain to {100 * _mean(alloc['acc']):.1f} %, the Σg² mask "
            f"itself to {100 * _mean(rows['g16_sq']['acc']):.1f} %, random coordinates with the final mask's counts "
            f"(FFN share {100 * _mean(rows['random']['ffn_share']):.0f} %) to {100 * rand:.1f} %."
        )
    return out


def plot_predictors(ctx: StudyContext, rows: dict[str, dict], full_acc: float, density: float) -> str:
    """``plots/predictors.png``: precision vs the final mask, and retrained accuracy vs probe cost."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    keys = list(rows)
    prec = [100 * _mean([a["precision"] for a in rows[k]["agreement"]]) for k in keys]
    base = [100 * _mean([a["random_expectation_precision"] for a in rows[k]["agreement"]]) for k in keys]
    y = range(len(keys))
    ax1.barh(y, prec, color="tab:blue", label="precision vs final mask")
    ax1.scatter(base, y, color="black", marker="|", s=200, label="random expectation", zorder=3)
    ax1.set_yticks(list(y), [k for k in keys], fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel(f"precision at density {100 * density:.0f} % (%)")
    ax1.legend(fontsize=8, loc="lower right")
    colours = {"oracle": "tab:green", "control": "grey", "early": "tab:blue", "prior": "tab:brown",
               "gradient": "tab:red", "combination": "tab:purple", "allocation": "tab:orange"}  # fmt: skip
    for k in keys:
        r = rows[k]
        if not r["acc"]:
            continue
        x = max(r["steps"], 0.5)
        ax2.scatter(x, 100 * _mean(r["acc"]), color=colours[r["kind"]], s=30)
        ax2.annotate(k, (x, 100 * _mean(r["acc"])), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax2.axhline(100 * full_acc, color="tab:green", ls="--", lw=1, label="full OPD")
    ax2.axhline(100 * _mean(rows["random"]["acc"]), color="grey", ls=":", lw=1, label="random mask")
    ax2.set_xscale("log")
    ax2.set_xlabel("OPD steps / batches spent to obtain the mask (free masks plotted at 0.5)")
    ax2.set_ylabel("held-out accuracy after masked retraining (%)")
    ax2.legend(fontsize=8)
    fig.suptitle("Predicting the OPD mask before the full run")
    fig.tight_layout()
    ctx.plots.mkdir(parents=True, exist_ok=True)
    path = ctx.plots / "predictors.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path.relative_to(ctx.out))


def render(info: RenderInfo, data: dict[str, Any], plots: list[str]) -> str:
    """The section's markdown from its data (as stored in ``study.json``; seed 0's full OPD accuracy from the run
    store)."""
    steps, rows, rows_hi = info.config.steps, data["rows"], data["rows_hi"]
    lock, visible, probe = data["lock_in_precision"], data["bf16_visible_density"], data["probe_snapshot_match_max_abs"]
    md = [
        f"Predictors of the full OPD run's top-{100 * data['density']:.0f} % |ΔW| mask (global top-k over block Linears), "
        f"each a `SparseMask` from `sparse_opd_peft.masks` at the same density. Precision / recall / IoU "
        "against the final mask with, in brackets, the expectation for a uniform random mask with the predictor's "
        f"per-module counts; retraining = `SparseOPDConfig(mask=...)` from the anchor, {steps} OPD steps "
        f"(mean ± std over {info.config.seeds} seed(s); secondary rows on seed 0 only — see the seeds column). Cost = "
        "steps and wall-clock spent to obtain the mask (full run for the final mask; a probe run of the first steps; "
        "gradient batches at W0 with no update); wall-clock depends on the load of the shared machine, steps do not.",
        "",
        *_table(rows, steps),
        "",
        *_verdict(rows, data["full_acc"]),
        "",
        f"At {100 * data['density_hi']:.0f} % density (seed 0):",
        "",
        *_table(rows_hi, steps),
        "",
        *_verdict(rows_hi, info.runs["opd_full_s0"]["acc"]),
        "",
        "How early the mask locks in: precision of the full run's own snapshot top-k against its final mask (seed "
        "0, random ≈ density): " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in lock.items()) + ".",
        "",
        "bf16-visible masks (the papers' rule, η = 1e-3) are already nearly dense early, so they cannot be compared "
        "at a fixed density: density " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in visible.items()) + " (seed 0).",
        "",
        "Probe runs replay the full run's first steps exactly (same lr schedule over the full run, same seeded "
        f"rollouts): max |Δ| between probe and full-run snapshots at the same step = {probe}. "
        'The paper\'s claim ("a second-pass optimization, not a first-pass shortcut") is tested here at toy scale '
        "only: the final mask is a magnitude (top-k |ΔW|) mask because a fast toy run's bf16-visible mask is ~dense.",
        "",
        f"![predictors]({plots[0]})",
    ]
    return "\n".join(md)
