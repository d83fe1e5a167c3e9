"""Masks that do not look at an update: :func:`random_like` (uniform random control with another mask's per-module
counts) and :func:`low_magnitude` (the paper's bottom-α ``|W0|`` prior)."""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from ..diagnostics.metrics import check_finite, top_fraction_mask
from ..diagnostics.sources import module_name, open_source, select_weights
from .mask import SparseMask

__all__ = ["low_magnitude", "random_like"]


def _module_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def random_like(mask: SparseMask, seed: int = 0) -> SparseMask:
    """Uniform random mask with exactly the same per-module coordinate counts as ``mask``.

    Each module draws from its own generator seeded by ``(seed, module name)``, so results do not depend on the
    module order. Returns a :class:`SparseMask` whose metadata records the seed and the original rule.
    """
    entries = {}
    for name in mask:
        out_f, in_f = mask.shape(name)
        g = torch.Generator().manual_seed(_module_seed(seed, name))
        idx = torch.randperm(out_f * in_f, generator=g)[: mask.nnz(name)]
        entries[name] = ((out_f, in_f), idx.sort().values)
    meta = {"rule": "random_like", "seed": int(seed), "like_rule": mask.metadata.get("rule")}
    meta["like_density"] = mask.density()
    return SparseMask.from_indices(entries, meta)


def low_magnitude(
    model, alpha: float, *, modules: str | Iterable[str] | None = None, progress: bool = False
) -> SparseMask:
    """Bottom-``alpha`` ``|W0|`` coordinates of every selected module (exactly ``round(alpha · numel)`` each).

    Args:
        model: W0 - model directory, ``.safetensors`` file, Hub id or ``nn.Module``. alpha: fraction in (0, 1].
        modules: None (block Linear layers), a regex or a list of module names.

    Returns:
        :class:`SparseMask` (ties at the threshold broken by flat index).
    """
    if not 0.0 < float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    entries = {}
    with open_source(model) as src:
        for n in tqdm(select_weights(src, modules), desc="low-magnitude mask", disable=not progress):
            w = src.get(n)
            check_finite(w, f"{src.location(n)}: tensor '{n}'")
            idx = top_fraction_mask(w.float().abs(), float(alpha), largest=False).reshape(-1).nonzero().squeeze(1).cpu()
            if idx.numel():
                entries[module_name(n)] = (tuple(w.shape), idx)
        label = src.label
    if not entries:
        raise ValueError(f"alpha={alpha} selects no coordinate in {label}; use a larger alpha")
    return SparseMask.from_indices(entries, {"rule": "low_magnitude", "alpha": float(alpha), "source": label})
