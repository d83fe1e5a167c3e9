"""Section "predictors" (issue 6, item 6): the mask before the full run.

The paper calls the OPD mask "a second-pass optimization, not a first-pass shortcut". This section tests cheap
predictors of the full run's top-k |ΔW| mask, each built with :mod:`sparse_opd_peft.masks`:

* early delta: top-k |ΔW| after the first 5 / 10 / 20 % of the same run (a probe run of those steps, timed);
* gradient statistics over 4 or 16 OPD batches at the anchor (weights never move): Σ|g|, Σg², Adam's v, |Σg|,
  the sign consistency |Σg|/sqrt(n·Σg²), and the update Adam would take at frozen weights;
* the low-magnitude prior of W0 (bottom-k |W0| per module);
* combinations: rank mean / rank product of the Adam-update statistic and the low-magnitude prior;
* allocation only: random coordinates with the Σg² mask's per-module counts (separates where a mask puts its
  budget from which coordinates it picks); control: random coordinates with the final mask's per-module counts.

For each: precision / recall / IoU against the final mask with the expectation of a random mask of the same
per-module density, the probe cost, and (for the main predictors) the held-out accuracy of retraining on it
(``SparseOPDConfig(mask=...)``, the study's OPD budget) vs the final mask and a random mask.
"""

from __future__ import annotations

import statistics as st
from typing import Any

from .core import RenderInfo, Section, StudyContext, json_roundtrip
from .predictors_report import plot_predictors, render

__all__ = ["DENSITY", "DENSITY_HI", "RETRAIN_ALL", "RETRAIN_ONE", "final_mask", "predictor_masks", "render", "retrain",
           "run"]  # fmt: skip

DENSITY, DENSITY_HI = 0.20, 0.45
EARLY = (0.05, 0.10, 0.20)  # shares of the run
GRAD_BATCHES = (4, 16)
COMBO_GRAD = "adam_update"  # the statistic combined with the low-magnitude prior
# retrained predictors: on every seed / on seed 0 only (secondary rows) / at DENSITY_HI on seed 0
# (g16_sq was a seed-0-only row until a 1-seed run showed it retrains best; alloc_sq separates its per-module
# allocation from its choice of coordinates)
RETRAIN_ALL = ("final", "random", "early10", "g16_sq", f"g16_{COMBO_GRAD}", "alloc_sq")
RETRAIN_ONE = ("early5", "early20", "lowmag", "combo_mean")
RETRAIN_HI = ("final", "random", "early10", "g16_sq", f"g16_{COMBO_GRAD}")
_STAT_LABEL = {"abs": "Σ|g|", "sq": "Σg²", "adam_v": "Adam v", "net": "|Σg|", "snr": "|Σg|/√(nΣg²)",
               "adam_update": "Adam update"}  # fmt: skip


def _agreement(ov: dict) -> dict:
    """The study's agreement record (as stored in its results) from :func:`~sparse_opd_peft.masks.mask_overlap`
    of (predicted, final): precision = share_of_a, recall = share_of_b."""
    return {"precision": ov["share_of_a"], "recall": ov["share_of_b"], "iou": ov["iou"],
            "intersection": ov["intersection"], "nnz_pred": ov["nnz_a"], "nnz_final": ov["nnz_b"],
            "random_expectation_precision": ov["random_share_of_a"],
            "random_expectation_recall": ov["random_share_of_b"], "random_expectation_iou": ov["random_iou"]}  # fmt: skip


def _early_stop(ctx: StudyContext, share: float) -> int:
    return max(1, int(round(share * ctx.config.steps)))


# ------------------------------------------------------------------------------------------ probes (cached)
def early_probe(ctx: StudyContext, seed: int) -> dict[str, Any]:
    """Probe run: the first 20 % of the full run's steps (same schedule and rollouts), snapshots at 5 / 10 / 20 %.

    Returns the cached result ``{"stops": {str(step): seconds}, "snapshot_match_max_abs": float | None}``; the
    snapshots are ``artifact_dir(f"pred_probe_s{seed}")/step_<k>.safetensors``. ``snapshot_match_max_abs``: the
    largest |difference| between the probe's and the full run's snapshot at the same step (0 = the probe is exactly
    the full run's beginning), when the full run saved that step.
    """
    from safetensors.torch import load_file

    from ...safetensors_io import atomic_save_safetensors
    from ..toy import runs

    name = f"pred_probe_s{seed}"
    adir = ctx.artifact_dir(name)
    stops = sorted({_early_stop(ctx, s) for s in EARLY})

    def run() -> dict[str, Any]:
        _, states, secs, hist = runs.opd_probe_run(
            ctx.world.load_student(), ctx.world, ctx.base.with_(seed=seed), stops
        )
        adir.mkdir(parents=True, exist_ok=True)
        match = None
        for k, state in states.items():
            atomic_save_safetensors(state, adir / f"step_{k}.safetensors")
            ref = ctx.artifact_dir(f"opd_full_s{seed}") / "checkpoints" / f"step_{k}.safetensors"
            if ref.exists():
                other = load_file(str(ref))
                diff = max(float((state[n] - other[n]).abs().max()) for n in state if n in other)
                match = diff if match is None else max(match, diff)
        return {"stops": {str(k): v for k, v in secs.items()}, "snapshot_match_max_abs": match,
                "loss_at_stop": {str(k): hist[k - 1].get("loss") for k in stops}}  # fmt: skip

    result = ctx.cached(name, run)
    if not all((adir / f"step_{k}.safetensors").exists() for k in stops):  # artefacts removed: probe again
        (ctx.runs_dir / f"{name}.json").unlink()
        result = ctx.cached(name, run)
    return result


def grad_probe(ctx: StudyContext, seed: int, batches: int):
    """Gradient statistics of ``batches`` OPD batches at the anchor (the run of ``seed``'s first batches).

    Returns ``(GradientStatistics, cached result {"seconds", "batches"})``; tensors live in
    ``artifact_dir(f"pred_grad_s{seed}_b{batches}")/stats.safetensors``.
    """
    from safetensors.torch import load_file

    from ... import masks as mp
    from ...safetensors_io import atomic_save_safetensors
    from ..toy import runs

    name = f"pred_grad_s{seed}_b{batches}"
    path = ctx.artifact_dir(name) / "stats.safetensors"

    def run() -> dict[str, Any]:
        w = ctx.world
        cfg = runs.opd_config(w, ctx.base.with_(seed=seed))
        stats = mp.gradient_statistics(w.load_student(), w.teacher, w.tokenizer, w.datasets[ctx.config.task]["train"],
                                       cfg, batches=batches, reward_fn=runs.toy_reward_fn(w, ctx.config.task))  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(stats.state_dict(), path)
        return {"seconds": stats.seconds, "batches": batches, "betas": list(stats.betas), "eps": stats.eps,
                "loss": [h.get("loss") for h in stats.history]}  # fmt: skip

    result = ctx.cached(name, run)
    if not path.exists():
        (ctx.runs_dir / f"{name}.json").unlink()
        result = ctx.cached(name, run)
    stats = mp.GradientStatistics.from_state_dict(load_file(str(path)), batches, betas=tuple(result["betas"]),
                                                  eps=result["eps"], seconds=result["seconds"])  # fmt: skip
    return stats, result


# ------------------------------------------------------------------------------------------ masks and retraining
def final_mask(ctx: StudyContext, seed: int, density: float = DENSITY):
    """Top-``density`` |ΔW| mask of the shared full OPD run of ``seed`` (the mask the predictors try to match)."""
    from ...masks import mask_from_checkpoints

    _, final_dir = ctx.full_opd(seed)
    return mask_from_checkpoints(ctx.student_path(), final_dir, "topk", density=density)


def predictor_masks(ctx: StudyContext, seed: int, density: float) -> dict[str, dict[str, Any]]:
    """``{key: {"label", "mask", "steps", "seconds", "kind"}}`` for every predictor of ``seed`` at ``density``
    (``steps`` / ``seconds``: what obtaining the mask cost before any retraining)."""
    from ... import masks as mp
    from ...masks import low_magnitude, random_like

    full, _ = ctx.full_opd(seed)
    final = final_mask(ctx, seed, density)
    w0, steps = ctx.student_path(), ctx.config.steps
    out = {
        "final": {"label": "final: top-k |ΔW| of the full run", "mask": final, "steps": steps,
                  "seconds": full["train_seconds"], "kind": "oracle"},
        "random": {"label": "random, final's per-module density", "mask": random_like(final, seed=seed),
                   "steps": 0, "seconds": 0.0, "kind": "control"},
    }  # fmt: skip
    probe = early_probe(ctx, seed)
    for share in EARLY:
        k = _early_stop(ctx, share)
        snap = ctx.artifact_dir(f"pred_probe_s{seed}") / f"step_{k}.safetensors"
        out[f"early{round(100 * share)}"] = {
            "label": f"early Δ: top-k after {100 * share:.0f} % of the run (step {k})",
            "mask": mp.early_delta_mask(w0, snap, density), "steps": k, "seconds": probe["stops"][str(k)],
            "kind": "early",
        }  # fmt: skip
    out["lowmag"] = {"label": "low-magnitude W0 (bottom-k |W0| per module)", "mask": low_magnitude(w0, density),
                     "steps": 0, "seconds": 0.0, "kind": "prior"}  # fmt: skip
    lowmag = mp.low_magnitude_scores(w0)
    for n in GRAD_BATCHES:
        stats, res = grad_probe(ctx, seed, n)
        for stat in mp.STATISTICS if n == max(GRAD_BATCHES) else (COMBO_GRAD, "sq"):
            out[f"g{n}_{stat}"] = {"label": f"gradient {_STAT_LABEL[stat]}, {n} batches at W0",
                                   "mask": mp.gradient_mask(stats, density, stat), "steps": n,
                                   "seconds": res["seconds"], "kind": "gradient"}  # fmt: skip
        if n == max(GRAD_BATCHES):
            out["alloc_sq"] = {"label": f"random, Σg² ({n} batches) mask's per-module counts",
                               "mask": random_like(out[f"g{n}_sq"]["mask"], seed=seed), "steps": n,
                               "seconds": res["seconds"], "kind": "allocation"}  # fmt: skip
            for how in ("mean", "product"):
                scores = mp.combine_scores([stats.score(COMBO_GRAD), lowmag], f"rank_{how}")
                out[f"combo_{how[:4]}"] = {
                    "label": f"{_STAT_LABEL[COMBO_GRAD]} ({n} batches) + low-magnitude, rank {how}",
                    "mask": mp.mask_from_scores(scores, density), "steps": n, "seconds": res["seconds"],
                    "kind": "combination",
                }  # fmt: skip
    return out


def retrain(ctx: StudyContext, key: str, mask, seed: int, density: float) -> dict[str, Any]:
    """Cached OPD retraining from the anchor on ``mask`` (study budget, seed ``seed``)."""
    from peft import get_peft_model

    from ... import SparseOPDConfig

    def make() -> Any:
        return get_peft_model(ctx.world.load_student(), SparseOPDConfig(mask=mask))

    return ctx.opd(f"pred_{key}_d{round(100 * density)}_s{seed}", make, seed=seed)


# ------------------------------------------------------------------------------------------ the section
def _collect(ctx: StudyContext, density: float, seeds: list[int], retrain_all: tuple, retrain_one: tuple) -> dict:
    from ...masks import mask_overlap

    rows: dict[str, dict] = {}
    for seed in seeds:
        masks = predictor_masks(ctx, seed, density)
        final = masks["final"]["mask"]
        for key, m in masks.items():
            row = rows.setdefault(key, {"label": m["label"], "kind": m["kind"], "steps": m["steps"], "seconds": [],
                                        "agreement": [], "acc": [], "retrain_seconds": [], "ffn_share": []})  # fmt: skip
            row["seconds"].append(m["seconds"])
            row["agreement"].append(_agreement(mask_overlap(m["mask"], final)))
            row["ffn_share"].append(m["mask"].type_stats()["ffn"]["share_of_nnz"])
            if key in retrain_all or (key in retrain_one and seed == seeds[0]):
                res = retrain(ctx, key, m["mask"], seed, density)
                row["acc"].append(res["acc"])
                row["retrain_seconds"].append(res["train_seconds"])
    return rows


def _bf16_visible_densities(ctx: StudyContext, seed: int) -> dict[str, float]:
    """Density of the bf16-visible mask (the papers' rule) after each early stop and at the end of the run."""
    from ...masks import early_delta_mask

    _, final_dir = ctx.full_opd(seed)
    early_probe(ctx, seed)
    out = {}
    for share in EARLY:
        k = _early_stop(ctx, share)
        snap = ctx.artifact_dir(f"pred_probe_s{seed}") / f"step_{k}.safetensors"
        out[f"step {k}"] = early_delta_mask(ctx.student_path(), snap, rule="bf16_visible").density()
    out["final"] = early_delta_mask(ctx.student_path(), final_dir, rule="bf16_visible").density()
    return out


def _lock_in(ctx: StudyContext, seed: int, density: float = DENSITY) -> dict[str, float]:
    """Precision of the top-k |ΔW| mask of each of the full run's own snapshots against its final mask: how early
    the mask locks in (``{"step k": precision}``)."""
    from ...masks import early_delta_mask, mask_overlap
    from ...opd.checkpoint import snapshot_paths

    final = final_mask(ctx, seed, density)
    ckpts = ctx.artifact_dir(f"opd_full_s{seed}") / "checkpoints"
    return {f"step {k}": mask_overlap(early_delta_mask(ctx.student_path(), path, density), final)["share_of_a"]
            for k, path in snapshot_paths(ckpts) if k < ctx.config.steps}  # fmt: skip


def run(ctx: StudyContext) -> Section:
    """Agreement, cost and retraining accuracy of every predictor at 20 % density (and 45 % on seed 0)."""
    rows = _collect(ctx, DENSITY, ctx.seeds, RETRAIN_ALL, RETRAIN_ONE)
    rows_hi = _collect(ctx, DENSITY_HI, ctx.seeds[:1], RETRAIN_HI, ())
    visible = _bf16_visible_densities(ctx, ctx.seeds[0])
    lock = _lock_in(ctx, ctx.seeds[0])
    full_acc = st.mean(ctx.full_opd(s)[0]["acc"] for s in ctx.seeds)
    probe = [early_probe(ctx, s)["snapshot_match_max_abs"] for s in ctx.seeds]
    plot = plot_predictors(ctx, rows, full_acc, DENSITY)
    data = {"density": DENSITY, "rows": rows, "density_hi": DENSITY_HI, "rows_hi": rows_hi,
            "full_acc": full_acc, "probe_snapshot_match_max_abs": probe, "bf16_visible_density": visible,
            "lock_in_precision": lock}  # fmt: skip
    data = json_roundtrip(data)
    markdown = render(RenderInfo.from_context(ctx), data, [plot])
    return Section("predictors", "Beyond the papers: the mask before the full run", markdown, data, [plot])
