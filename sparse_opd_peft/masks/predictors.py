"""Predict the final OPD mask *before* the full run: cheap probes as :class:`~sparse_opd_peft.masks.SparseMask`
builders, and how well a predicted mask agrees with the final one.

Predictors (each gives a ``SparseMask`` at a chosen density, like ``mask_from_checkpoints(rule="topk")``):

* :func:`early_delta_mask` - top-k ``|ΔW|`` (or bf16-visible) between the anchor and an *early* snapshot of the run
  (e.g. after 5 / 10 / 20 % of its steps);
* :func:`~.gradient.gradient_statistics` + :func:`~.gradient.gradient_mask` - per-coordinate statistics of the OPD gradient over a few
  batches at the anchor (the weights never move): ``Σ|g|``, ``Σg²``, Adam's bias-corrected second moment, ``|Σg|``,
  the sign consistency ``|Σg| / sqrt(n·Σg²)`` and the update Adam would take at frozen weights;
* :func:`low_magnitude_scores` - the low-magnitude prior ``-|W0|`` (as a mask: :func:`~sparse_opd_peft.masks.low_magnitude`);
* :func:`combine_scores` - rank-average or rank-product of several score maps, then :func:`mask_from_scores`.

Allocation only: ``random_like(gradient_mask(stats, density, "sq"), seed)`` keeps a predictor's per-module
coordinate counts and draws the coordinates at random.

:func:`~sparse_opd_peft.masks.mask_overlap` ``(predicted, final)`` reports how well a predicted mask agrees with the
final one (precision = ``share_of_a``, recall = ``share_of_b``) with the expectation for a uniform random mask of the
same per-module counts.

Score maps are ``{module name: float32 tensor (out, in)}`` (module names without ``.weight``, as in
``model.named_modules()``); larger score = more likely in the mask.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ..diagnostics.metrics import check_finite
from ..diagnostics.sources import module_name, open_source, select_weights
from .budget import Budget, select_top
from .checkpoints import mask_from_checkpoints
from .mask import SparseMask

__all__ = ["ScoreMap", "combine_scores", "early_delta_mask", "low_magnitude_scores",
           "mask_from_scores", "rank_normalise"]  # fmt: skip

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
    budget = Budget(density, ffn_share, per_module, type_overrides)
    groups = budget.allocate({n: s.numel() for n, s in scores.items()})
    selected = select_top(scores, groups)
    entries = {n: (tuple(scores[n].shape), selected[n]) for n in scores if n in selected}
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
    :func:`~sparse_opd_peft.masks.low_magnitude`. Its top-k is the bottom-k ``|W0|`` (globally ranked).
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
