"""Churn between models and a churn-budgeted mask, for continual post-training.

:func:`bf16_churn` (share of weight entries whose bfloat16 value differs from a reference model's),
:func:`changed_coordinates` (those entries as a mask) and :func:`budgeted_topk_mask` (top-k ``|ΔW|`` of a probe run,
with at most a given share of an earlier mask reused). Helpers: :func:`merged_copy`, :func:`weight_tensors`,
:func:`block_linear_names`. Overlap of two masks: :func:`~sparse_opd_peft.masks.mask_overlap`.

The continual *experiments* (train a stage on a toy task with a method, probe a stage's own mask) are in the lab:
:mod:`sparse_opd_peft.lab.continual`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from ..diagnostics.sources import is_block_linear, module_name
from ..visibility import bf16_bits
from .budget import Budget, select_top
from .mask import SparseMask
from .overlap import MaskLike, as_mask

__all__ = ["bf16_churn", "block_linear_names", "budgeted_topk_mask", "changed_coordinates", "is_peft", "merged_copy",
           "weight_tensors"]  # fmt: skip

WeightsLike = Union[nn.Module, Mapping[str, torch.Tensor]]


def is_peft(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel``."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merged_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every active peft adapter merged in (``merge_and_unload``), in eval mode and
    with all parameters trainable; a plain model is just copied. ``model`` itself is not changed."""
    out = copy.deepcopy(model)
    if is_peft(out):
        out = out.merge_and_unload()
    out.requires_grad_(True)
    return out.eval()


def block_linear_names(model: nn.Module) -> list[str]:
    """Module names of the Linear layers inside numbered transformer blocks (the mask builders' default
    selection: no embeddings, norms or ``lm_head``), as in the unwrapped model's ``named_modules()``.
    A peft model is read through a merged copy."""
    if is_peft(model):
        model = merged_copy(model)
    return [module_name(n) for n, p in model.named_parameters() if is_block_linear(n, p.shape)]


def weight_tensors(
    model: WeightsLike, which: Literal["block_linear", "all"] = "block_linear"
) -> dict[str, torch.Tensor]:
    """Effective weights of ``model`` (peft adapters merged into a copy), detached, on CPU.

    Args:
        model: an ``nn.Module`` (plain or ``PeftModel``) or an already extracted ``{name: tensor}`` dict (returned
            as is).
        which: ``"block_linear"``: ``{module_name: (out, in) weight}`` of the blocks' Linear layers;
            ``"all"``: ``{parameter name: tensor}`` of every floating-point parameter.
    """
    if isinstance(model, Mapping):
        return dict(model)
    if which not in ("block_linear", "all"):
        raise ValueError(f"which must be 'block_linear' or 'all', got {which!r}")
    plain = merged_copy(model) if is_peft(model) else model
    out = {}
    for name, p in plain.named_parameters():
        if not p.dtype.is_floating_point:
            continue
        if which == "all":
            out[name] = p.detach().cpu()
        elif is_block_linear(name, p.shape):
            out[module_name(name)] = p.detach().cpu()
    return out


def _bf16_changed(reference: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    if reference.shape != tensor.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(tensor.shape)}")
    return bf16_bits(reference.float()) != bf16_bits(tensor.float())


def bf16_churn(
    reference: WeightsLike, model: WeightsLike, which: Literal["block_linear", "all"] = "block_linear"
) -> dict[str, Any]:
    """Share of weight entries whose bfloat16 value differs between ``reference`` and ``model``.

    An entry counts as changed iff ``bf16(w_model) != bf16(w_reference)`` as bit patterns (both rounded to
    nearest-even from their own dtype), i.e. the change would survive storing both models in bf16.

    Args:
        reference: the anchor (``nn.Module`` or ``{name: tensor}``); model: the trained model (plain or peft;
            adapters are merged into a float32 copy first).
        which: ``"block_linear"`` (the Linear weights the adapters target) or ``"all"`` parameters; names
            present in only one of the two are ignored.

    Returns:
        ``{"changed": int, "total": int, "share": changed / total, "modules": {name: {"changed", "total",
        "share"}}}``.
    """
    ref, new = weight_tensors(reference, which), weight_tensors(model, which)
    rows = {}
    for name, w0 in ref.items():
        if name not in new:
            continue
        changed = int(_bf16_changed(w0, new[name]).sum())
        rows[name] = {"changed": changed, "total": w0.numel(), "share": changed / max(w0.numel(), 1)}
    changed = sum(r["changed"] for r in rows.values())
    total = sum(r["total"] for r in rows.values())
    return {"changed": changed, "total": total, "share": changed / total if total else 0.0, "modules": rows}


def changed_coordinates(reference: WeightsLike, model: WeightsLike) -> Optional[SparseMask]:
    """The block-Linear entries whose bf16 value differs between ``reference`` and ``model``, as a
    :class:`SparseMask` (modules without a change are left out); ``None`` when nothing changed."""
    ref, new = weight_tensors(reference), weight_tensors(model)
    masks = {}
    for name, w0 in ref.items():
        if name in new and w0.dim() == 2:
            m = _bf16_changed(w0, new[name])
            if m.any():
                masks[name] = m
    return SparseMask(masks, {"rule": "bf16_changed"}) if masks else None


def budgeted_topk_mask(
    source: WeightsLike,
    tuned: WeightsLike,
    density: float,
    previous: Optional[MaskLike] = None,
    reuse_share: Optional[float] = None,
) -> SparseMask:
    """Top-k ``|ΔW|`` mask (global over the block Linears) with a churn budget against an earlier mask.

    ``k = round(density · numel)`` coordinates are chosen; at most ``floor(reuse_share · |previous|)`` of them may
    be coordinates of ``previous`` (``reuse_share=0``: disjoint from it). The result is the exact maximiser of
    ``Σ|ΔW|`` under that constraint: the unconstrained top-k when it reuses few enough earlier coordinates,
    otherwise the top ``allowed`` earlier coordinates plus the top ``k − allowed`` others. The budget is allocated
    and selected by :mod:`~sparse_opd_peft.masks.budget` (ties broken by module order, then flat index). All |ΔW|
    are held in memory at once (fine for the toy world; for large models use
    :func:`~sparse_opd_peft.masks.mask_from_checkpoints` and ``SparseOPDConfig(exclude=...)``).

    Args:
        source, tuned: models (plain or peft, merged first) or ``{module_name: weight}`` dicts.
        density: share of the block-Linear entries in (0, 1].
        previous: the earlier stage's mask (None: no budget). reuse_share: in [0, 1]; None: no budget.

    Returns:
        a :class:`SparseMask` whose metadata records the rule, density, budget and how many earlier coordinates
        it reuses.
    """
    budget = Budget(density)
    if reuse_share is not None and not 0.0 <= float(reuse_share) <= 1.0:
        raise ValueError(f"reuse_share must be in [0, 1] or None, got {reuse_share!r}")
    w0, w1 = weight_tensors(source), weight_tensors(tuned)
    names = [n for n in w0 if n in w1]
    if not names:
        raise ValueError("source and tuned share no block Linear weight")
    scores = {n: (w1[n].float() - w0[n].float()).abs() for n in names}
    groups = budget.allocate({n: s.numel() for n, s in scores.items()})
    prev = as_mask(previous, "previous") if previous is not None else None
    in_prev = {n: _in(prev, n, scores[n].shape) for n in names}
    selected = select_top(scores, groups)
    previous_nnz = sum(int(m.sum()) for m in in_prev.values())
    reused = _reused(selected, in_prev)
    if prev is not None and reuse_share is not None:
        allowed = int(math.floor(float(reuse_share) * previous_nnz + 1e-9))
        if reused > allowed:
            selected = _split_selection(scores, in_prev, groups[0][1], allowed)
            reused = _reused(selected, in_prev)
    entries = {n: (tuple(scores[n].shape), selected[n]) for n in names if n in selected}
    meta = {
        "rule": "topk_budgeted",
        "density": float(density),
        "achieved_density": groups[0][1] / sum(s.numel() for s in scores.values()),
        "reuse_share": reuse_share,
        "reused": reused,
        "previous_nnz": previous_nnz,
    }
    return SparseMask.from_indices(entries, meta)


def _in(prev: Optional[SparseMask], name: str, shape: torch.Size) -> torch.Tensor:
    """Flat bool membership (numel,) of module ``name``'s coordinates in ``prev``."""
    flat = torch.zeros(shape.numel(), dtype=torch.bool)
    if prev is not None and name in prev:
        if prev.shape(name) != tuple(shape):
            raise ValueError(f"previous mask module '{name}' has shape {prev.shape(name)}, weight is {tuple(shape)}")
        flat[prev.indices(name)] = True
    return flat


def _reused(selected: Mapping[str, torch.Tensor], in_prev: Mapping[str, torch.Tensor]) -> int:
    return sum(int(in_prev[n][idx].sum()) for n, idx in selected.items())


def _split_selection(
    scores: Mapping[str, torch.Tensor], in_prev: Mapping[str, torch.Tensor], k: int, allowed: int
) -> dict[str, torch.Tensor]:
    """The top ``allowed`` earlier coordinates plus the top ``k - allowed`` others (``allowed`` may be 0)."""
    names = tuple(scores)
    n_out = sum(int((~m).sum()) for m in in_prev.values())
    take_out = min(k - allowed, n_out)
    take_in = k - take_out  # > allowed only when the complement is too small: then it cannot be met
    if take_in > allowed:
        raise ValueError(
            f"the churn budget cannot be met: {k} coordinates asked, only {n_out} outside the earlier mask and "
            f"at most {allowed} inside it; lower the density or raise reuse_share"
        )
    inside = {n: s.reshape(-1).masked_fill(~in_prev[n], -1.0) for n, s in scores.items()}
    outside = {n: s.reshape(-1).masked_fill(in_prev[n], -1.0) for n, s in scores.items()}
    out = select_top(outside, [(names, take_out)])
    for n, idx in select_top(inside, [(names, take_in)]).items():
        out[n] = torch.cat([out[n], idx]).sort().values if n in out else idx
    return out
