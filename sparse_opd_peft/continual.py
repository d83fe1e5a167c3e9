"""Continual post-training metrics and masks: churn between models, overlap of masks, a budgeted top-k mask.

Metrics: :func:`bf16_churn` (share of weight entries whose bfloat16 value differs from a reference model's),
:func:`changed_coordinates` (those entries as a mask), :func:`mask_overlap` (IoU and overlap shares of two masks
with the expectation for independent uniform random masks of the same per-module sizes) and
:func:`budgeted_topk_mask` (top-k ``|ΔW|`` of a probe run, with at most a given share of an earlier mask reused).
Helpers: :func:`merged_copy`, :func:`weight_tensors`, :func:`block_linear_names`, :func:`lora_rank_for`,
:func:`adapter_names`, :func:`dir_bytes`.

The continual *experiments* (train a stage on a toy task with a method, probe a stage's own mask) are in the lab:
:mod:`sparse_opd_peft.lab.continual`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from .diagnostics.sources import is_block_linear, module_name
from .masks import SparseMask
from .visibility import bf16_bits

__all__ = [
    "adapter_names",
    "bf16_churn",
    "block_linear_names",
    "budgeted_topk_mask",
    "changed_coordinates",
    "dir_bytes",
    "lora_rank_for",
    "mask_overlap",
    "merged_copy",
    "weight_tensors",
]

MaskLike = Union[SparseMask, Mapping[str, torch.Tensor]]
WeightsLike = Union[nn.Module, Mapping[str, torch.Tensor]]


def _is_peft(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merged_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every active peft adapter merged in (``merge_and_unload``), in eval mode and
    with all parameters trainable; a plain model is just copied. ``model`` itself is not changed."""
    out = copy.deepcopy(model)
    if _is_peft(out):
        out = out.merge_and_unload()
    out.requires_grad_(True)
    return out.eval()


def block_linear_names(model: nn.Module) -> list[str]:
    """Module names of the Linear layers inside numbered transformer blocks (the mask builders' default
    selection: no embeddings, norms or ``lm_head``), as in the unwrapped model's ``named_modules()``.
    A peft model is read through a merged copy."""
    if _is_peft(model):
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
    plain = merged_copy(model) if _is_peft(model) else model
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


def _as_mask(mask: MaskLike) -> SparseMask:
    return mask if isinstance(mask, SparseMask) else SparseMask(mask)


def mask_overlap(a: MaskLike, b: MaskLike) -> dict[str, float]:
    """Overlap of two masks over the union of their modules, with the random expectation.

    The expectation is that of independent uniform random masks with the same number of coordinates in every
    module: ``E|A∩B| = Σ_m nnz_A(m)·nnz_B(m) / numel(m)`` (modules present in one mask only contribute 0);
    the expected IoU is reported as ``E|A∩B| / (|A| + |B| − E|A∩B|)`` (ratio of expectations, exact in the
    large-mask limit).

    Returns:
        ``{"nnz_a", "nnz_b", "intersection", "iou", "share_of_a" (= |A∩B|/|A|), "share_of_b" (= |A∩B|/|B|),
        "random_intersection", "random_iou", "random_share_of_a", "random_share_of_b"}``.
    """
    a, b = _as_mask(a), _as_mask(b)
    inter = exp_inter = 0.0
    for name in a:
        if name in b:
            if a.shape(name) != b.shape(name):
                raise ValueError(f"module '{name}': shapes differ ({a.shape(name)} vs {b.shape(name)})")
            inter += float(torch.isin(a.indices(name), b.indices(name)).sum())
            exp_inter += a.nnz(name) * b.nnz(name) / a.numel(name)
    na, nb = a.nnz(), b.nnz()

    def ratio(x: float, y: float) -> float:
        return x / y if y else 0.0

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
    otherwise the top ``allowed`` earlier coordinates plus the top ``k − allowed`` others. Ties at the threshold are
    broken by ``torch.topk``. All |ΔW| are held in memory at once (fine for the toy world; for large models use
    :func:`~sparse_opd_peft.mask_builders.mask_from_checkpoints` and ``SparseOPDConfig(exclude=...)``).

    Args:
        source, tuned: models (plain or peft, merged first) or ``{module_name: weight}`` dicts.
        density: share of the block-Linear entries in (0, 1].
        previous: the earlier stage's mask (None: no budget). reuse_share: in [0, 1]; None: no budget.

    Returns:
        a :class:`SparseMask` whose metadata records the rule, density, budget and how many earlier coordinates
        it reuses.
    """
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if reuse_share is not None and not 0.0 <= float(reuse_share) <= 1.0:
        raise ValueError(f"reuse_share must be in [0, 1] or None, got {reuse_share!r}")
    w0, w1 = weight_tensors(source), weight_tensors(tuned)
    names = [n for n in w0 if n in w1]
    if not names:
        raise ValueError("source and tuned share no block Linear weight")
    shapes = {n: tuple(w0[n].shape) for n in names}
    sizes = [w0[n].numel() for n in names]
    scores = torch.cat([(w1[n].float() - w0[n].float()).abs().reshape(-1) for n in names])
    prev = _as_mask(previous) if previous is not None else None
    in_prev = torch.zeros(scores.numel(), dtype=torch.bool)
    if prev is not None:
        offset = 0
        for n, size in zip(names, sizes, strict=True):
            if n in prev:
                if prev.shape(n) != shapes[n]:
                    raise ValueError(f"previous mask module '{n}' has shape {prev.shape(n)}, weight is {shapes[n]}")
                in_prev[offset + prev.indices(n)] = True
            offset += size
    k = int(round(float(density) * scores.numel()))
    if k <= 0:
        raise ValueError(f"density {density} selects no coordinate of {scores.numel()}")
    selected = torch.topk(scores, k).indices
    if prev is not None and reuse_share is not None:
        allowed = int(math.floor(float(reuse_share) * int(in_prev.sum()) + 1e-9))
        if int(in_prev[selected].sum()) > allowed:
            n_out = int((~in_prev).sum())
            take_out = min(k - allowed, n_out)
            take_in = k - take_out  # > allowed only when the complement is too small: then it cannot be met
            if take_in > allowed:
                raise ValueError(
                    f"the churn budget cannot be met: {k} coordinates asked, only {n_out} outside the earlier mask and "
                    f"at most {allowed} inside it; lower the density or raise reuse_share"
                )
            parts = []
            if take_in:
                parts.append(torch.topk(scores.masked_fill(~in_prev, -1.0), take_in).indices)
            parts.append(torch.topk(scores.masked_fill(in_prev, -1.0), take_out).indices)
            selected = torch.cat(parts)
    flat = torch.zeros(scores.numel(), dtype=torch.bool)
    flat[selected] = True
    entries, offset = {}, 0
    for n, size in zip(names, sizes, strict=True):
        idx = flat[offset : offset + size].nonzero().squeeze(1)
        if idx.numel():
            entries[n] = (shapes[n], idx)
        offset += size
    meta = {
        "rule": "topk_budgeted",
        "density": float(density),
        "achieved_density": k / scores.numel(),
        "reuse_share": reuse_share,
        "reused": int(in_prev[selected].sum()),
        "previous_nnz": int(in_prev.sum()),
    }
    return SparseMask.from_indices(entries, meta)


def lora_rank_for(model: nn.Module, target_modules: Sequence[str], n_params: int) -> int:
    """LoRA rank whose trainable-parameter count ``r · Σ(in + out)`` over ``target_modules`` is closest to
    ``n_params`` (at least 1)."""
    modules = dict(model.named_modules())
    per_rank = 0
    for name in target_modules:
        m = modules[name]
        base = m.get_base_layer() if hasattr(m, "get_base_layer") else m
        per_rank += base.in_features + base.out_features
    if per_rank == 0:
        raise ValueError("no target module")
    return max(1, int(round(n_params / per_rank)))


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the peft adapters ``model`` holds (``[]`` for a plain model)."""
    return list(model.peft_config) if _is_peft(model) else []


def dir_bytes(directory: Union[str, Path], pattern: str = "*.safetensors") -> int:
    """Total size in bytes of the files matching ``pattern`` under ``directory`` (recursive)."""
    return sum(p.stat().st_size for p in Path(directory).rglob(pattern) if p.is_file())
