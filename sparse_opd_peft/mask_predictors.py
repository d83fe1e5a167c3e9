"""Predict the final OPD mask *before* the full run: cheap probes as :class:`~sparse_opd_peft.masks.SparseMask`
builders, and how well a predicted mask agrees with the final one.

Predictors (each gives a ``SparseMask`` at a chosen density, like ``mask_from_checkpoints(rule="topk")``):

* :func:`early_delta_mask` - top-k ``|ΔW|`` (or bf16-visible) between the anchor and an *early* snapshot of the run
  (e.g. after 5 / 10 / 20 % of its steps);
* :func:`gradient_statistics` + :func:`gradient_mask` - per-coordinate statistics of the OPD gradient over a few
  batches at the anchor (the weights never move): ``Σ|g|``, ``Σg²``, Adam's bias-corrected second moment, ``|Σg|``,
  the sign consistency ``|Σg| / sqrt(n·Σg²)`` and the update Adam would take at frozen weights;
* :func:`low_magnitude_scores` - the low-magnitude prior ``-|W0|`` (as a mask: :func:`~.mask_builders.low_magnitude`);
* :func:`combine_scores` - rank-average or rank-product of several score maps, then :func:`mask_from_scores`.

Allocation only: ``random_like(gradient_mask(stats, density, "sq"), seed)`` keeps a predictor's per-module
coordinate counts and draws the coordinates at random.

:func:`mask_agreement` reports precision / recall / IoU of a predicted mask against the final one with the
expectation for a uniform random mask of the same per-module density.

Score maps are ``{module name: float32 tensor (out, in)}`` (module names without ``.weight``, as in
``model.named_modules()``); larger score = more likely in the mask.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .diagnostics.metrics import check_finite, top_fraction_mask
from .diagnostics.sources import ModuleSource, module_name, open_source, select_weights
from .mask_builders import low_magnitude, mask_from_checkpoints
from .masks import SparseMask
from .module_types import module_type

__all__ = ["STATISTICS", "GradientStatistics", "combine_scores", "early_delta_mask", "gradient_mask",
           "gradient_statistics", "low_magnitude", "low_magnitude_scores", "mask_agreement", "mask_from_scores",
           "rank_normalise"]  # fmt: skip

STATISTICS = ("abs", "sq", "adam_v", "net", "snr", "adam_update")
# accumulators each statistic needs: sum Σg, abs Σ|g|, sq Σg², m / v Adam's EMAs, upd Σ m̂/(√v̂ + eps)
_NEEDS = {"abs": ("abs",), "sq": ("sq",), "adam_v": ("v",), "net": ("sum",), "snr": ("sum", "sq"),
          "adam_update": ("m", "v", "upd")}  # fmt: skip
ScoreMap = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------ score maps -> masks
def _check_scores(scores: Mapping[str, torch.Tensor], what: str = "scores") -> ScoreMap:
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError(f"{what} must be a non-empty dict {{module name: float tensor (out, in)}}")
    out = {}
    for name, s in scores.items():
        if not isinstance(s, torch.Tensor) or s.dim() != 2 or not s.dtype.is_floating_point:
            shape = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"{what}['{name}'] must be a 2-D float tensor (out, in), got {shape}")
        check_finite(s, f"{what}['{name}']")
        out[module_name(name)] = s.detach().float().cpu() + 0.0  # + 0.0 turns -0.0 into 0.0 (radix select)
    return out


def mask_from_scores(
    scores: Mapping[str, torch.Tensor],
    density: float,
    *,
    ffn_share: float | None = None,
    per_module: bool = False,
    type_overrides: Mapping[str, str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> SparseMask:
    """Top-``density`` coordinates of a score map (the scored analogue of ``mask_from_checkpoints(rule="topk")``).

    Args:
        scores: ``{module: finite float tensor (out, in)}``; larger = selected first.
        density: share of all scored coordinates to select, in (0, 1] (``round(density · total)`` coordinates).
        ffn_share: share of the budget given to FFN modules (the rest to the others); None = one global ranking.
        per_module: ``round(density · numel)`` coordinates in every module instead of a global ranking.
        type_overrides: module-type rules (see :func:`~sparse_opd_peft.module_types.module_type`).
        metadata: extra JSON-able provenance stored in the mask's metadata.

    Returns:
        :class:`SparseMask` over the modules with at least one selected coordinate; ties at the threshold are
        broken by (module order, flat index), so the result is deterministic.
    """
    scores = _check_scores(scores)
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if ffn_share is not None and (per_module or not 0.0 <= float(ffn_share) <= 1.0):
        raise ValueError(f"ffn_share must be in [0, 1] and excludes per_module=True, got {ffn_share!r}")
    names = list(scores)
    if per_module:
        groups = [([n], int(round(float(density) * scores[n].numel()))) for n in names]
    else:
        budget = int(round(float(density) * sum(scores[n].numel() for n in names)))
        if ffn_share is None:
            groups = [(names, budget)]
        else:
            ffn = [n for n in names if module_type(n, type_overrides) == "ffn"]
            rest = [n for n in names if n not in set(ffn)]
            nf = int(round(float(ffn_share) * budget))
            groups = [(ffn, nf), (rest, budget - nf)]
            for g, b in groups:
                cap = sum(scores[n].numel() for n in g)
                if b > cap:
                    raise ValueError(f"ffn_share={ffn_share} asks for {b} coordinates of modules that have {cap}")
    entries = {}
    for group, count in groups:
        if not group or count <= 0:
            continue
        flat = torch.cat([scores[n].reshape(-1) for n in group])
        keep = top_fraction_mask(flat, count / flat.numel())
        start = 0
        for n in group:
            size = scores[n].numel()
            idx = keep[start : start + size].nonzero().squeeze(1)
            start += size
            if idx.numel():
                entries[n] = (tuple(scores[n].shape), idx)
    if not entries:
        raise ValueError(f"density={density} selects no coordinate; use a larger density")
    total = sum(s.numel() for s in scores.values())
    meta = {"rule": "scores_topk", "density": float(density), "ffn_share": ffn_share, "per_module": per_module,
            "achieved_density": sum(int(i.numel()) for _, i in entries.values()) / total}  # fmt: skip
    return SparseMask.from_indices(entries, {**meta, **dict(metadata or {})})


def rank_normalise(scores: Mapping[str, torch.Tensor]) -> ScoreMap:
    """Global percentile ranks of a score map: every entry -> (average rank of its value) / N, in (0, 1].

    Ranks run over all modules together (ties share their average rank), so maps on different scales combine.
    """
    scores = _check_scores(scores)
    flat = torch.cat([s.reshape(-1) for s in scores.values()]).double()
    values, order = torch.sort(flat, stable=True)
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    avg = (ends - counts.double() + 1 + ends) / 2  # mean of 1-based ranks start+1 .. end
    ranks = torch.empty_like(flat)
    ranks[order] = avg[inverse] / flat.numel()
    out, start = {}, 0
    for n, s in scores.items():
        out[n] = ranks[start : start + s.numel()].view(s.shape).float()
        start += s.numel()
    return out


def combine_scores(
    score_maps: Sequence[Mapping[str, torch.Tensor]], how: str = "rank_mean", weights: Sequence[float] | None = None
) -> ScoreMap:
    """Combine score maps over the same modules through their global percentile ranks (:func:`rank_normalise`).

    Args:
        score_maps: two or more ``{module: (out, in)}`` maps with identical module names and shapes.
        how: ``"rank_mean"`` (weighted mean of ranks) or ``"rank_product"`` (weighted geometric mean of ranks:
            a coordinate must rank high in every map).
        weights: non-negative weight per map (default equal).

    Returns:
        ``{module: float32 (out, in)}`` combined scores in (0, 1].
    """
    if how not in ("rank_mean", "rank_product"):
        raise ValueError(f"how must be 'rank_mean' or 'rank_product', got {how!r}")
    if len(score_maps) < 2:
        raise ValueError(f"combine_scores needs at least two score maps, got {len(score_maps)}")
    w = [1.0] * len(score_maps) if weights is None else [float(x) for x in weights]
    if len(w) != len(score_maps) or any(x < 0 or not math.isfinite(x) for x in w) or sum(w) <= 0:
        raise ValueError(f"weights must be {len(score_maps)} finite non-negative numbers with a positive sum, got {w}")
    ranked = [rank_normalise(s) for s in score_maps]
    ref = ranked[0]
    for i, r in enumerate(ranked[1:], 1):
        if set(r) != set(ref) or any(r[n].shape != ref[n].shape for n in ref):
            raise ValueError(f"score map {i} does not cover the same modules / shapes as score map 0")
    total = sum(w)
    out = {}
    for n in ref:
        if how == "rank_mean":
            out[n] = sum(wi * r[n] for wi, r in zip(w, ranked, strict=True)) / total
        else:
            out[n] = torch.exp(sum(wi * r[n].log() for wi, r in zip(w, ranked, strict=True)) / total)
    return out


# ------------------------------------------------------------------------------------------ priors / snapshots
def low_magnitude_scores(model, *, modules: str | Iterable[str] | None = None) -> ScoreMap:
    """The low-magnitude prior as a score map: ``-|W0|`` (float32, (out, in)) per selected module.

    ``model``: W0 as a model directory, ``.safetensors`` file, Hub id or ``nn.Module``; ``modules`` as in
    :func:`~sparse_opd_peft.mask_builders.low_magnitude`. Its top-k is the bottom-k ``|W0|`` (globally ranked).
    """
    out = {}
    with open_source(model) as src:
        for n in select_weights(src, modules):
            w = src.get(n)
            check_finite(w, f"{src.location(n)}: tensor '{n}'")
            out[module_name(n)] = -w.detach().float().abs().cpu()
    return out


def early_delta_mask(
    source, snapshot, density: float | None = None, *, rule: str = "topk", **kwargs: Any
) -> SparseMask:
    """Mask of an early snapshot's update: ``mask_from_checkpoints(source, snapshot, rule, density=...)``.

    Args:
        source: the anchor W0. snapshot: the student after the first k steps of the planned run (a model directory,
            a trainable-state ``.safetensors`` written by ``OPDTrainer`` with ``save_every``, or an ``nn.Module``).
        density: for ``rule="topk"`` (required there); rule: ``"topk"`` or ``"bf16_visible"`` (no density).
        kwargs: ``ffn_share``, ``per_module``, ``modules``, ... as in :func:`mask_from_checkpoints`.
    """
    if rule not in ("topk", "bf16_visible"):
        raise ValueError(f"early_delta_mask: rule must be 'topk' or 'bf16_visible', got {rule!r}")
    mask = mask_from_checkpoints(source, snapshot, rule, density=density, **kwargs)
    mask.metadata["predictor"] = "early_delta"
    return mask


# ------------------------------------------------------------------------------------------ gradient statistics
@dataclass
class GradientStatistics:
    """Accumulated per-coordinate gradient statistics of a few OPD batches at fixed weights.

    Attributes:
        accumulators: ``{kind: {module: float32 (out, in)}}`` with kinds ``sum`` (Σg), ``abs`` (Σ|g|), ``sq`` (Σg²),
            ``m`` / ``v`` (Adam's EMAs after ``batches`` steps, not bias-corrected) and ``upd`` (Σ_t m̂_t/(√v̂_t+eps)).
        batches: number of gradients accumulated. betas, eps: the Adam constants used for ``m``, ``v``, ``upd``.
        seconds: wall-clock of the probe (rollouts, teacher scoring, backward).
        history: the trainer's per-batch metrics (loss, kl, ...).
    """

    accumulators: dict[str, ScoreMap]
    batches: int
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)

    def score(self, statistic: str) -> ScoreMap:
        """Score map of one statistic (float32 (out, in) per module; larger = more update expected).

        ``abs`` Σ|g|, ``sq`` Σg², ``adam_v`` v / (1 - β2^n), ``net`` |Σg|, ``snr`` |Σg| / sqrt(n·Σg²) in [0, 1]
        (1 = the same sign and size every batch), ``adam_update`` |Σ_t m̂_t / (√v̂_t + eps)| (the distance Adam
        would move each coordinate per unit lr if the gradients stayed these).
        """
        if statistic not in STATISTICS:
            raise ValueError(f"unknown gradient statistic {statistic!r}; use one of {', '.join(STATISTICS)}")
        missing = [k for k in _NEEDS[statistic] if k not in self.accumulators]
        if missing:
            raise ValueError(f"statistic {statistic!r} needs accumulators {missing}; collect it in gradient_statistics")
        acc, n = self.accumulators, self.batches
        if statistic in ("abs", "sq"):
            return {k: v.clone() for k, v in acc[statistic].items()}
        if statistic == "adam_v":
            return {k: v / (1 - self.betas[1] ** n) for k, v in acc["v"].items()}
        if statistic == "net":
            return {k: v.abs() for k, v in acc["sum"].items()}
        if statistic == "adam_update":
            return {k: v.abs() for k, v in acc["upd"].items()}
        return {k: torch.where(q > 0, s.abs() / (n * q).clamp_min(1e-45).sqrt(), torch.zeros_like(s))
                for (k, s), q in zip(acc["sum"].items(), acc["sq"].values(), strict=True)}  # fmt: skip

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat ``{"<kind>::<module>": tensor}`` (for ``safetensors.torch.save_file``)."""
        return {f"{k}::{n}": t.contiguous() for k, d in self.accumulators.items() for n, t in d.items()}

    @classmethod
    def from_state_dict(cls, tensors: Mapping[str, torch.Tensor], batches: int, **kwargs: Any) -> GradientStatistics:
        """Inverse of :meth:`state_dict` (``batches`` and the other fields are passed back explicitly)."""
        acc: dict[str, ScoreMap] = {}
        for key, t in tensors.items():
            kind, sep, name = key.partition("::")
            if not sep:
                raise ValueError(f"gradient-statistics tensor {key!r} is not named '<kind>::<module>'")
            acc.setdefault(kind, {})[name] = t
        return cls(acc, int(batches), **kwargs)


class _Recorder(torch.optim.Optimizer):
    """An "optimizer" that accumulates gradient statistics of the tracked weights and never changes a weight."""

    def __init__(self, params: list[torch.nn.Parameter], tracked: dict[int, str], kinds: set[str], betas, eps):
        super().__init__(params, {"lr": 0.0})
        self.tracked, self.kinds, self.betas, self.eps, self.t = tracked, kinds, betas, eps, 0
        self.acc: dict[str, ScoreMap] = {k: {} for k in kinds}

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):  # noqa: D102
        self.t += 1
        b1, b2 = self.betas
        for group in self.param_groups:
            for p in group["params"]:
                name = self.tracked.get(id(p))
                if name is None:
                    continue
                g = p.grad.detach().float().cpu() if p.grad is not None else torch.zeros(p.shape)
                a = {k: d.setdefault(name, torch.zeros(p.shape)) for k, d in self.acc.items()}
                if "sum" in a:
                    a["sum"] += g
                if "abs" in a:
                    a["abs"] += g.abs()
                if "sq" in a:
                    a["sq"] += g * g
                if "m" in a:
                    a["m"].mul_(b1).add_(g, alpha=1 - b1)
                if "v" in a:
                    a["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                if "upd" in a:
                    m_hat, v_hat = a["m"] / (1 - b1**self.t), a["v"] / (1 - b2**self.t)
                    a["upd"] += m_hat / (v_hat.sqrt() + self.eps)
        return None


def gradient_statistics(
    student: torch.nn.Module,
    teacher: Optional[torch.nn.Module],
    tokenizer,
    train_dataset,
    config,
    *,
    batches: int,
    modules: str | Iterable[str] | None = None,
    statistics: Sequence[str] = STATISTICS,
    reward_fn=None,
    eps: float = 1e-8,
    progress: bool = False,
) -> GradientStatistics:
    """Collect OPD gradient statistics over the first ``batches`` batches of a planned run, at the anchor.

    Runs :class:`~sparse_opd_peft.opd.OPDTrainer` for ``batches`` steps with ``config`` (same rollouts, teacher
    scoring, loss, token normalisation and gradient clipping as that run's first steps) but with an optimizer that
    only records the (clipped) gradients: the student's weights never change, so every batch is scored at W0.

    Args:
        student: a plain causal LM (not PEFT-wrapped) whose selected weights require grad.
        teacher, tokenizer, train_dataset, reward_fn: as for ``OPDTrainer``.
        config: the :class:`~sparse_opd_peft.opd.OPDConfig` of the planned run (``steps`` / checkpoints / eval /
            trackers are overridden; ``adam_betas`` set the Adam statistics).
        batches: number of batches (>= 1); each costs about one OPD step without the optimizer update.
        modules: None (block Linear layers), a regex or a list of module names (as in the mask builders).
        statistics: which of :data:`STATISTICS` to make available (fewer = less memory; all need at most 5 float32
            accumulators per coordinate).
        eps: Adam's epsilon for ``adam_update``.

    Returns:
        :class:`GradientStatistics` with float32 (out, in) accumulators per selected module.
    """
    from .opd import OPDConfig, OPDTrainer

    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"batches must be an integer >= 1, got {batches!r}")
    if not isinstance(config, OPDConfig):
        raise ValueError(f"config must be an OPDConfig, got {type(config).__name__}")
    unknown = [s for s in statistics if s not in STATISTICS]
    if unknown or not statistics:
        raise ValueError(f"statistics must be a non-empty subset of {list(STATISTICS)}, got {list(statistics)}")
    kinds = {k for s in statistics for k in _NEEDS[s]}
    src = ModuleSource(student)  # raises for PEFT-wrapped students
    names = select_weights(src, modules)
    params = dict(student.named_parameters())
    frozen = [n for n in names if not params[n].requires_grad]
    if frozen:
        raise ValueError(f"weights {frozen[:3]} do not require grad; set requires_grad=True to probe their gradients")
    tracked = {id(params[n]): module_name(n) for n in names}
    cfg = dataclasses.replace(config, steps=batches, save_every=0, checkpoint_dir=None, eval_every=0,
                              report_to=None, progress_bar=progress)  # fmt: skip
    betas = tuple(cfg.adam_betas)

    class _Probe(OPDTrainer):
        def _build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
            trainable = [p for p in model.parameters() if p.requires_grad]
            return _Recorder(trainable, tracked, kinds, betas, eps)

    before = {n: params[n].detach().clone() for n in names[:1]}
    trainer = _Probe(student, teacher, tokenizer, train_dataset, cfg, reward_fn=reward_fn)
    t0 = time.perf_counter()
    history = trainer.train()
    seconds = time.perf_counter() - t0
    for n, w in before.items():  # the recorder never writes; guard against a future trainer that would
        if not torch.equal(w, params[n].detach()):
            raise RuntimeError(f"gradient_statistics changed weight '{n}'; the probe must not update the student")
    acc = trainer.optimizer.optimizer.acc if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer.acc
    for kind in kinds:  # a module whose gradient never arrived (unused) scores 0
        for n in names:
            acc[kind].setdefault(module_name(n), torch.zeros(params[n].shape))
    return GradientStatistics(acc, batches, betas, eps, seconds, history)


def gradient_mask(stats: GradientStatistics, density: float, statistic: str = "sq", **kwargs: Any) -> SparseMask:
    """Top-``density`` coordinates of one gradient statistic (``kwargs``: ``ffn_share``, ``per_module``, ...)."""
    meta = {"predictor": "gradient", "statistic": statistic, "batches": stats.batches}
    return mask_from_scores(stats.score(statistic), density, metadata=meta, **kwargs)


# ------------------------------------------------------------------------------------------ agreement
def mask_agreement(predicted: SparseMask, final: SparseMask) -> dict[str, float]:
    """Agreement of a predicted mask P with the final mask F, counted over all coordinates of both.

    Returns:
        ``{"precision": |P∩F|/|P|, "recall": |P∩F|/|F|, "iou": |P∩F|/|P∪F|, "intersection", "nnz_pred",
        "nnz_final", "random_expectation_precision", "random_expectation_recall", "random_expectation_iou"}``. The
        random expectations are those of a uniform random mask R with P's per-module coordinate counts:
        ``E|R∩F| = Σ_m nnz_P(m)·nnz_F(m)/numel(m)`` (exact for precision and recall; for IoU the ratio
        ``E|R∩F| / (|P| + |F| - E|R∩F|)``, which the Monte-Carlo mean approaches as masks grow).

    Raises:
        TypeError: for non-``SparseMask`` arguments. ValueError: a module present in both with different shapes.
    """
    if not isinstance(predicted, SparseMask) or not isinstance(final, SparseMask):
        raise TypeError("mask_agreement needs two SparseMask objects (use SparseMask(dict) or SparseMask.load(path))")
    inter = exp_inter = 0.0
    for n in predicted:
        if n not in final:
            continue
        if predicted.shape(n) != final.shape(n):
            raise ValueError(f"module '{n}': shapes differ ({predicted.shape(n)} vs {final.shape(n)})")
        a, b = predicted.indices(n), final.indices(n)
        inter += float(torch.isin(a, b).sum())
        exp_inter += a.numel() * b.numel() / predicted.numel(n)
    n_p, n_f = predicted.nnz(), final.nnz()
    return {
        "precision": inter / n_p, "recall": inter / n_f, "iou": inter / (n_p + n_f - inter),
        "intersection": int(inter), "nnz_pred": n_p, "nnz_final": n_f,
        "random_expectation_precision": exp_inter / n_p, "random_expectation_recall": exp_inter / n_f,
        "random_expectation_iou": exp_inter / (n_p + n_f - exp_inter),
    }  # fmt: skip
