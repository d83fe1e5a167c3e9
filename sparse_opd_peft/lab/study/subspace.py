"""Study item 4, "Early subspace" (geometry-of-opd.md §4.2): does the rank-16 channel of ΔW at ≈ 20 % of the run
suffice for the rest of OPD, and does the same bottleneck hurt SFT?

Protocol (the paper's: "training then resumes under this rank-16 constraint"): per seed and method (OPD = the
study's default loss, SFT = cross-entropy on the dataset's completions, same lr / steps), train the first 20 % of
the run (the run's own lr schedule, stopped there), save that model; take ``V_r`` = top-r right singular vectors of
``ΔW_20% = W_20% − W0`` per block Linear (:func:`~sparse_opd_peft.masks.subspace_from_checkpoints`; for OPD from
the shared full run's 20 % snapshot, checked equal to the prefix); then resume from the 20 % model for the remaining
80 % of the steps (fresh AdamW, 10 % warm-up, linear decay from the schedule's lr at 20 % to 0) either unconstrained
or with ``SparseOPDConfig(subspace=V_r)`` (every block-Linear update ``ΔW = C V_rᵀ``).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from .core import RenderInfo, Section, StudyContext, block_linears, json_roundtrip, mean_std
from .recovery import block_only_student, curve_of, curve_settings, fmt_steps, mean_curve, pct, steps_to

RANKS = (16, 4)  # the paper's rank at config.seeds, then a smaller one at SECONDARY_SEEDS
SECONDARY_SEEDS = 1
PREFIX = 0.2  # share of the run after which the subspace is taken and the constraint starts
METHODS = {"opd": None, "sft": "sft"}  # loss per method (None = the study's default loss)
PAPER = {"opd": "essentially unchanged under rank 16", "sft": "degraded under rank 16"}


def prefix_steps(ctx: StudyContext) -> int:
    """Step at which the subspace is taken (≈ 20 % of ``config.steps``, at least 1)."""
    return _prefix_steps(ctx.config.steps)


def _prefix_steps(steps: int) -> int:
    return max(1, int(round(PREFIX * steps)))


def _changes(ctx: StudyContext, method: str) -> dict[str, Any]:
    return {"loss": METHODS[method]} if METHODS[method] else {}


def load_dir(path: Path) -> torch.nn.Module:
    """A float32 model saved with ``save_pretrained`` (eval mode)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def prefix(ctx: StudyContext, method: str, seed: int) -> tuple[dict[str, Any], Path]:
    """The first 20 % of ``method``'s run (its own schedule), saved to ``artifact_dir(name)/model``; cached."""
    from ...opd import trainable_state_dict
    from ..toy import heldout_accuracy
    from ..toy import runs as toy_runs
    from .recovery import CURVE_SAMPLES

    name, k = f"sub_prefix_{method}_s{seed}", prefix_steps(ctx)
    path = ctx.artifact_dir(name) / "model"

    def fn() -> dict[str, Any]:
        cfg = ctx.base.with_(seed=seed, **_changes(ctx, method))
        model, _, secs, _ = toy_runs.opd_probe_run(ctx.world.load_student(), ctx.world, cfg, [k])
        model.save_pretrained(path)
        n = min(CURVE_SAMPLES, ctx.config.eval_samples)
        out = {"acc": ctx.accuracy(model), "acc_curve": heldout_accuracy(model, ctx.world, ctx.config.task, n),
               "train_seconds": secs[k], "step": k}  # fmt: skip
        snap = snapshot(ctx, method, seed)
        if snap is not None:  # the prefix must replay the shared full run exactly
            from safetensors.torch import load_file

            ref, mine = load_file(str(snap)), trainable_state_dict(model)
            out["max_abs_diff_vs_full_run_snapshot"] = max(float((ref[n] - mine[n]).abs().max()) for n in ref)
        return out

    result = ctx.cached(name, fn)
    if not path.exists():  # result cached but the model was removed: train again
        (ctx.runs_dir / f"{name}.json").unlink()
        result = ctx.cached(name, fn)
    return result, path


def snapshot(ctx: StudyContext, method: str, seed: int) -> Path | None:
    """The shared full OPD run's snapshot at the prefix step (OPD only; None when it has none there)."""
    if method != "opd":
        return None
    ctx.full_opd(seed)
    p = ctx.artifact_dir(f"opd_full_s{seed}") / "checkpoints" / f"step_{prefix_steps(ctx)}.safetensors"
    return p if p.exists() else None


def continue_changes(ctx: StudyContext, method: str, seed: int) -> dict[str, Any]:
    """ToyRunConfig changes of the resumed 80 %: the schedule's lr at the prefix step, decaying to 0."""
    from ...opd import OPDConfig

    k, b = prefix_steps(ctx), ctx.base.opd
    lr_k = OPDConfig(lr=b.lr, warmup_steps=b.warmup_steps, steps=b.steps, progress_bar=False).lr_at(k)
    steps = b.steps - k
    return dict(seed=seed, lr=lr_k, steps=steps, warmup_steps=min(b.warmup_steps, steps // 10),
                **curve_settings(ctx, steps), **_changes(ctx, method))  # fmt: skip


def effective_rank(ctx: StudyContext, rank: int) -> int:
    """``rank`` clamped to the smallest min(out, in) of the block Linears (matters in the tiny world only)."""
    return _clamp_rank(rank, block_linears(ctx.world.student))


def _clamp_rank(rank: int, shapes: dict[str, tuple[int, int]]) -> int:
    return min(rank, min(min(s) for s in shapes.values()))


def arm_run(ctx: StudyContext, method: str, arm: str, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """One resumed run (``arm`` = ``free`` | ``block`` | ``rank<r>``); returns (prefix result, run result)."""
    from peft import get_peft_model

    from ...masks import subspace_from_checkpoints
    from ...tuner import SparseOPDConfig

    pre, path = prefix(ctx, method, seed)
    name = f"sub_{method}_{arm}_s{seed}"
    if arm == "free":
        make = lambda: load_dir(path)  # noqa: E731
    elif arm == "block":
        make = lambda: block_only_student(lambda: load_dir(path))  # noqa: E731
    else:
        r = effective_rank(ctx, int(arm[4:]))

        def make() -> torch.nn.Module:
            early = snapshot(ctx, method, seed) or path
            basis = subspace_from_checkpoints(ctx.student_path(), early, r)
            return get_peft_model(load_dir(path), SparseOPDConfig(subspace=basis))

    result = ctx.opd(name, make, save_model=arm == "free", **continue_changes(ctx, method, seed))
    if arm == "free" and not (ctx.artifact_dir(name) / "final").exists():  # cached, but the model was removed
        (ctx.runs_dir / f"{name}.json").unlink()
        result = ctx.opd(name, make, save_model=True, **continue_changes(ctx, method, seed))
    return pre, result


def similarity(ctx: StudyContext, method: str, seed: int, rank: int) -> dict[str, float]:
    """Sim_r(20 %, end) = mean over block Linears of ‖V_r(20 %)ᵀ V_r(end)‖²_F / r, "end" = the unconstrained arm's
    final model, with the random-subspace expectation r / in_features (cached)."""
    from ...masks import subspace_from_checkpoints

    def fn() -> dict[str, float]:
        _, path = prefix(ctx, method, seed)
        final = ctx.artifact_dir(f"sub_{method}_free_s{seed}") / "final"
        v0 = subspace_from_checkpoints(ctx.student_path(), snapshot(ctx, method, seed) or path, rank)
        v1 = subspace_from_checkpoints(ctx.student_path(), final, rank)
        sims = [float((v0[n].double().T @ v1[n].double()).pow(2).sum()) / rank for n in v0 if n in v1]
        return {"sim": statistics.mean(sims), "random": statistics.mean(rank / v.shape[0] for v in v0.values())}

    return ctx.cached(f"sub_sim_{method}_r{rank}_s{seed}", fn)


def arms() -> list[tuple[str, bool]]:
    """``(arm, primary)``: unconstrained and rank 16 at config.seeds; block-only and rank 4 at SECONDARY_SEEDS."""
    return [("free", True), (f"rank{RANKS[0]}", True), ("block", False)] + [(f"rank{r}", False) for r in RANKS[1:]]


def label(ctx: StudyContext, arm: str) -> str:
    """Table label of an arm."""
    if arm == "free":
        return "unconstrained (all parameters)"
    if arm == "block":
        return "unconstrained, block Linears only"
    return f"rank-{effective_rank(ctx, int(arm[4:]))} early subspace (SparseOPDConfig(subspace=V))"


def collect(ctx: StudyContext) -> dict[str, Any]:
    """Every (method, arm, seed) run: accuracies, curves (offset by the prefix), trainable counts."""
    k = prefix_steps(ctx)
    out: dict[str, Any] = {}
    for method in METHODS:
        rows = {}
        for arm, primary in arms():
            seeds = ctx.seeds if primary else ctx.seeds[:SECONDARY_SEEDS]
            pairs = [arm_run(ctx, method, arm, s) for s in seeds]
            rows[arm] = {
                "label": label(ctx, arm), "seeds": list(seeds), "acc": [r["acc"] for _, r in pairs],
                "trainable": pairs[0][1]["trainable"],
                "curves": [curve_of(r, (k, p["acc_curve"]), offset=k) for p, r in pairs],
                "train_seconds": statistics.mean(r["train_seconds"] for _, r in pairs),
            }  # fmt: skip
        pres = [prefix(ctx, method, s)[0] for s in ctx.seeds]
        sims = [similarity(ctx, method, s, effective_rank(ctx, RANKS[0])) for s in ctx.seeds]
        out[method] = {"rows": rows, "prefix_acc": [p["acc"] for p in pres],
                       "snapshot_diff": [p.get("max_abs_diff_vs_full_run_snapshot") for p in pres],
                       "sim": [x["sim"] for x in sims], "sim_random": sims[0]["random"]}  # fmt: skip
    out["full_opd_acc"] = [ctx.full_opd(s)[0]["acc"] for s in ctx.seeds]
    return out


def verdict(rows: dict[str, Any], arm: str) -> tuple[str, float]:
    """("≈" | "<" | ">", difference in points) of ``arm`` vs unconstrained (≈ within max(2, 2 std) points)."""
    a, f = rows[arm]["acc"], rows["free"]["acc"]
    sd = max(statistics.stdev(x) if len(x) > 1 else 0.0 for x in (a, f))
    diff = 100 * (statistics.mean(a) - statistics.mean(f))
    return ("≈" if abs(diff) <= max(2.0, 200 * sd) else (">" if diff > 0 else "<")), diff


def plot(ctx: StudyContext, res: dict[str, Any], anchor: float) -> str:
    """``plots/subspace.png``: held-out accuracy vs step, OPD and SFT panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = prefix_steps(ctx)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, method in zip(axes, METHODS, strict=True):
        pre = res[method]["rows"]["free"]["curves"][0][0][1]
        ax.plot([0, k], [100 * anchor, 100 * pre], "k:", label="first 20 % (unconstrained)")
        for arm, row in res[method]["rows"].items():
            c = mean_curve(row["curves"])
            ax.plot([p[0] for p in c], [100 * p[1] for p in c], marker=".", ls="-" if arm == "free" else "--",
                    label=f"{row['label']} (n={len(row['seeds'])})")  # fmt: skip
        ax.axvline(k, color="grey", lw=0.8)
        ax.set(title=f"{method.upper()}: resumed at step {k}", xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("held-out accuracy %")
    fig.tight_layout()
    fig.savefig(ctx.plots / "subspace.png", dpi=110)
    plt.close(fig)
    return "plots/subspace.png"


def channel_verdict(opd_rows: dict[str, Any], sft_rows: dict[str, Any], rank: int) -> str:
    """The section's verdict line: does the rank-``rank`` early channel keep OPD and hurt SFT (rows of the
    ``rank<RANKS[0]>`` and ``free`` arms), and does the paper's asymmetry (OPD less affected than SFT) hold?"""
    rk = f"rank{RANKS[0]}"
    (vo, do), (vs, ds) = verdict(opd_rows, rk), verdict(sft_rows, rk)
    keeps = (
        "does not keep"
        if vo == "<"
        else (
            "keeps"
            if vo == ">" or abs(do) <= 2.0
            else "is not distinguishable (seed spread too large) from unconstrained for"
        )
    )
    hurts = "hurts" if vs == "<" else "does not hurt"
    return (
        f"**Verdict**: the rank-{rank} early channel {keeps} OPD here (Δ {do:+.1f} points vs unconstrained) and "
        f"{hurts} SFT (Δ {ds:+.1f}); the paper: OPD essentially unchanged, SFT degraded. "
        + (
            "The paper's asymmetry (OPD less affected than SFT) "
            + ("holds" if do > ds else "does not hold")
            + " here. "
        )
        + "(≈ = within max(2 points, 2 std).)"
    )


def run(ctx: StudyContext) -> Section:
    """Item 4: resumed training under the early rank-r subspace vs unconstrained, for OPD and SFT."""
    from .recovery import anchor_curve_acc

    res = collect(ctx)
    info = RenderInfo.from_context(ctx)
    res["compute_seconds"] = info.compute_seconds("sub_")[1]
    plots = [plot(ctx, res, anchor_curve_acc(ctx))]
    data = json_roundtrip(res)
    return Section("subspace", "Early subspace (rank-r projected training)", render(info, data, plots), data, plots)


def render(info: RenderInfo, data: dict[str, Any], plots: list[str]) -> str:
    """The section's markdown from its data (as stored in ``study.json``)."""
    res, config, shapes = data, info.config, info.block_linears
    total = sum(o * i for o, i in shapes.values())
    r0 = _clamp_rank(RANKS[0], shapes)
    shares = sorted({f"{r0}/{i} = {100 * r0 / i:.0f} %" for _, i in shapes.values()})
    k, n = _prefix_steps(config.steps), config.seeds
    hidden, inter = min(i for _, i in shapes.values()), max(i for _, i in shapes.values())
    md = [
        f"Resume at step {k} of {config.steps} ({pct(PREFIX)} %) from the method's own 20 % model (the paper's "
        "protocol); the subspace V is the top-r right singular vectors of ΔW at that step; fresh AdamW for the "
        f"remaining {config.steps - k} steps in every arm (see module docstring). OPD = loss "
        f"`{info.base.opd.loss}`, SFT = `sft` on the dataset's completions, both from the same anchor at lr "
        f"{config.lr:g}. Primary rows at {n} seed(s), secondary rows at {SECONDARY_SEEDS} (the seeds column). "
        f"The OPD prefix replays the shared full run: max |ΔW| vs its step-{k} snapshot "
        f"{res['opd']['snapshot_diff']}.",
        "",
        f"**Scale caveat**: the toy modules are small (hidden {hidden}, intermediate {inter}), so rank {r0} "
        f"keeps a large share of each module's input directions ({', '.join(shares)}) and its trainable count "
        f"Σ out·r is {100 * res['opd']['rows'][f'rank{RANKS[0]}']['trainable'] / total:.0f} % of the block-Linear "
        "entries; in Qwen3-8B (hidden 4096, intermediate 12288) rank 16 keeps 0.4 % / 0.1 %. Rank "
        f"{_clamp_rank(RANKS[-1], shapes)} is the closer analogue of the paper's bottleneck.",
        "",
        f"| method | arm | trainable | seeds | final acc % ({config.eval_samples} prompts) | vs unconstrained | "
        "steps to 50 % | papers |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for method in METHODS:
        rows = res[method]["rows"]
        md.append(f"| {method.upper()} | at 20 % (start of every arm) | – | {n} | "
                  f"{mean_std(res[method]['prefix_acc'], 100)} | | | |")  # fmt: skip
        for arm, row in rows.items():
            v = "" if arm == "free" else "{} {:+.1f}".format(*verdict(rows, arm))
            paper = PAPER[method] if arm == f"rank{RANKS[0]}" else ""
            md.append(
                f"| {method.upper()} | {row['label']} | {row['trainable']:,} | {len(row['seeds'])} | "
                f"{mean_std(row['acc'], 100)} | {v} | {fmt_steps([steps_to(c, 0.5) for c in row['curves']])} | {paper} |"
            )
    md.append(f"| OPD | uninterrupted shared full run (reference) | all | {n} | {mean_std(res['full_opd_acc'], 100)} "
              "| | | |")  # fmt: skip
    md += [
        "",
        f"Is the 20 % channel the final one? Sim_{r0}(step {k}, end) = ‖V(step {k})ᵀ V(end)‖²_F / {r0}, averaged over "
        f"block Linears (end = the unconstrained arm's final model): OPD {mean_std(res['opd']['sim'], 1, 2)}, SFT "
        f"{mean_std(res['sft']['sim'], 1, 2)}, random subspaces {res['opd']['sim_random']:.2f}. The paper (Fig. 5): "
        "OPD aligned with its final rank-16 channel from the first checkpoint, SFT and RLVR converging later.",
        "",
        channel_verdict(res["opd"]["rows"], res["sft"]["rows"], r0),
    ]
    n_runs, secs = info.compute_seconds("sub_")
    md += ["", f"Compute: {n_runs} cached entries named `sub_*`, {secs / 60:.1f} min of wall-clock as first measured."]
    return "\n".join(md)
