"""The one overlap / agreement measure of two masks, with its random expectation.

Used for the overlap of two stages' masks (continual post-training), the agreement of a predicted mask with the
final one (precision = ``share_of_a``, recall = ``share_of_b``), and the overlap of one weight's visible update with
its principal / low-magnitude mask in the diagnostics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Union

import torch

from .mask import SparseMask

MaskLike = Union[SparseMask, Mapping[str, torch.Tensor], torch.Tensor]

__all__ = ["MaskLike", "as_mask", "mask_overlap"]


def as_mask(mask: MaskLike, what: str = "mask") -> SparseMask | None:
    """A :class:`SparseMask` from a mask, a ``{module: bool tensor (out, in)}`` dict or one bool tensor (a single
    weight, module name ``""``; 1-D tensors are read as one row). Returns None for an all-False single tensor."""
    if isinstance(mask, SparseMask):
        return mask
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(f"{what}: a single tensor must be bool, got {mask.dtype}")
        t = mask.reshape(1, -1) if mask.dim() == 1 else mask
        return SparseMask({"": t}) if bool(t.any()) else None
    if isinstance(mask, Mapping):
        return SparseMask(mask)
    raise TypeError(
        f"{what} must be a SparseMask, a dict {{module: bool tensor}} or a bool tensor, got {type(mask).__name__}"
    )


def _shape_of(mask: MaskLike) -> tuple[int, ...] | None:
    return (
        tuple(mask.reshape(1, -1).shape if mask.dim() == 1 else mask.shape) if isinstance(mask, torch.Tensor) else None
    )


def _sparse_counts(ma: SparseMask | None, mb: SparseMask | None) -> tuple[int, int, float, float]:
    """``(|A|, |B|, |A∩B|, E|A∩B|)`` of two masks (None = empty)."""
    inter = exp_inter = 0.0
    for name in ma or ():
        if mb is not None and name in mb:
            if ma.shape(name) != mb.shape(name):
                raise ValueError(f"module '{name}': shapes differ ({ma.shape(name)} vs {mb.shape(name)})")
            inter += float(torch.isin(ma.indices(name), mb.indices(name)).sum())
            exp_inter += ma.nnz(name) * mb.nnz(name) / ma.numel(name)
    return (ma.nnz() if ma is not None else 0), (mb.nnz() if mb is not None else 0), inter, exp_inter


def mask_overlap(a: MaskLike, b: MaskLike) -> dict[str, float]:
    """Overlap of masks A and B, counted over every coordinate of both (a module in one mask only adds nothing to
    the intersection), with the expectation for independent uniform random masks of the same per-module counts.

    ``E|A∩B| = Σ_m nnz_A(m)·nnz_B(m) / numel(m)`` (exact for the intersection and the two shares); the expected IoU
    is the ratio of expectations ``E|A∩B| / (|A| + |B| − E|A∩B|)`` (exact in the large-mask limit).

    Args:
        a, b: :class:`SparseMask`, ``{module name: bool tensor (out, in)}`` or two bool tensors of one weight
            (same shape). For a predicted mask P against a final mask F call ``mask_overlap(P, F)``: precision is
            ``share_of_a``, recall ``share_of_b``.

    Returns:
        ``{"nnz_a", "nnz_b", "intersection", "iou", "share_of_a" (|A∩B|/|A|), "share_of_b" (|A∩B|/|B|),
        "random_intersection", "random_iou", "random_share_of_a", "random_share_of_b"}``; a ratio over an empty
        mask is ``nan``.

    Raises:
        TypeError: an argument of another kind. ValueError: a module present in both with different shapes.
    """
    sa, sb = _shape_of(a), _shape_of(b)
    if sa is not None and sb is not None:  # one weight, dense: counted in place (no index lists)
        if sa != sb:
            raise ValueError(f"mask_overlap: shapes differ ({sa} vs {sb})")
        for t in (a, b):
            if t.dtype != torch.bool:
                raise TypeError(f"mask_overlap: a single tensor must be bool, got {t.dtype}")
        na, nb, inter = int(a.sum()), int(b.sum()), float((a & b).sum())
        exp_inter = na * nb / a.numel() if a.numel() else 0.0
    else:
        na, nb, inter, exp_inter = _sparse_counts(
            as_mask(a, "mask_overlap argument a"), as_mask(b, "mask_overlap argument b")
        )

    def ratio(x: float, y: float) -> float:
        return x / y if y else math.nan

    return {
        "nnz_a": na,
        "nnz_b": nb,
        "intersection": int(inter),
        "iou": ratio(inter, na + nb - inter),
        "share_of_a": ratio(inter, na),
        "share_of_b": ratio(inter, nb),
        "random_intersection": exp_inter,
        "random_iou": ratio(exp_inter, na + nb - exp_inter),
        "random_share_of_a": ratio(exp_inter, na),
        "random_share_of_b": ratio(exp_inter, nb),
    }
