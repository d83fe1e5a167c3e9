"""The one coordinate-budget allocator: how many coordinates each group of modules gets, which ones, and what is
excluded.

* :class:`Budget` - a density, optionally a fixed share of it for FFN modules or the same density in every module;
  :meth:`Budget.allocate` turns it into ``[(module names, coordinate count), ...]`` groups;
* :func:`select_top` - the top-``count`` coordinates of each group of an in-memory score map (ties broken by module
  order, then flat index); the streaming variant over checkpoints is :func:`~.checkpoints.mask_from_checkpoints`,
  which allocates through the same :class:`Budget`;
* :func:`exclude_coordinates` - a mask without the coordinates of another (``SparseOPDConfig(exclude=...)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from ..diagnostics.metrics import top_fraction_mask
from ..module_types import module_type
from .mask import SparseMask

Group = tuple[tuple[str, ...], int]

__all__ = ["Budget", "Group", "exclude_coordinates", "select_top"]


@dataclass(frozen=True)
class Budget:
    """A coordinate budget over a set of modules.

    Args:
        density: share of the modules' weight entries to select, in (0, 1].
        ffn_share: share of the budget given to FFN modules (the rest to attention / other modules); None = one
            ranking over all modules.
        per_module: ``round(density · numel)`` coordinates in every module instead of one global ranking.
        type_overrides: module-type rules (see :func:`~sparse_opd_peft.module_types.module_type`).
    """

    density: float
    ffn_share: Optional[float] = None
    per_module: bool = False
    type_overrides: Optional[Mapping[str, str]] = None

    def __post_init__(self) -> None:
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)):
            raise ValueError(f"density must be a number in (0, 1] (e.g. --density 0.05), got {self.density!r}")
        if not 0.0 < float(self.density) <= 1.0:
            raise ValueError(f"density must be in (0, 1] (e.g. --density 0.05), got {self.density!r}")
        if self.ffn_share is not None and not 0.0 <= float(self.ffn_share) <= 1.0:
            raise ValueError(f"ffn_share must be in [0, 1], got {self.ffn_share!r}")
        if self.ffn_share is not None and self.per_module:
            raise ValueError(
                "ffn_share and per_module=True exclude each other: per-module budgets are fixed per module"
            )

    def allocate(self, numel: Mapping[str, int]) -> list[Group]:
        """Split the budget over modules with ``numel[name]`` weight entries each (in the mapping's order).

        Returns:
            ``[(module names, coordinate count), ...]``: one group per module (``per_module``), FFN + the rest
            (``ffn_share``) or one group of all modules; groups with count 0 are kept (they select nothing).

        Raises:
            ValueError: no module; ``ffn_share`` asks more coordinates of a kind than its modules have; the budget
                rounds to 0 coordinates in total.
        """
        names = tuple(numel)
        if not names:
            raise ValueError("the budget has no module to allocate over (check the module selection)")
        density, total = float(self.density), sum(int(numel[n]) for n in names)
        if self.per_module:
            groups = [((n,), int(round(density * numel[n]))) for n in names]
        elif self.ffn_share is None:
            groups = [(names, int(round(density * total)))]
        else:
            budget = int(round(density * total))
            ffn = tuple(n for n in names if module_type(n, self.type_overrides) == "ffn")
            in_ffn = set(ffn)
            rest = tuple(n for n in names if n not in in_ffn)
            n_ffn = int(round(float(self.ffn_share) * budget))
            groups = [(ffn, n_ffn), (rest, budget - n_ffn)]
            for (members, count), kind in zip(groups, ("FFN", "non-FFN"), strict=True):
                cap = sum(int(numel[n]) for n in members)
                if count > cap:
                    raise ValueError(
                        f"ffn_share={self.ffn_share} asks for {count} {kind} coordinates but the selected {kind} "
                        f"modules have only {cap}; lower the density or change ffn_share"
                    )
        if not any(count for _, count in groups):
            smallest = min(numel[n] for n in names) if self.per_module else total
            raise ValueError(
                f"density {self.density} keeps no coordinate: round(density x weight entries) is 0 for the {total:,} "
                f"entries of the {len(names)} selected modules{' (per module)' if self.per_module else ''}; use a "
                f"density of at least {1 / smallest:.3g} (e.g. --density 0.05)"
            )
        return groups


def select_top(scores: Mapping[str, torch.Tensor], groups: Sequence[Group]) -> dict[str, torch.Tensor]:
    """The top-``count`` coordinates of each group of a score map.

    Args:
        scores: ``{module name: finite float tensor (out, in)}``, larger = selected first.
        groups: ``[(module names, count), ...]`` as from :meth:`Budget.allocate`.

    Returns:
        ``{module name: sorted flat int64 indices}`` for modules with at least one selected coordinate; exactly
        ``count`` per group, ties at the threshold broken by (module order in the group, flat index).
    """
    out: dict[str, torch.Tensor] = {}
    for names, count in groups:
        if not names or count <= 0:
            continue
        flat = torch.cat([scores[n].reshape(-1) for n in names])
        keep = top_fraction_mask(flat, count / flat.numel())
        start = 0
        for n in names:
            size = scores[n].numel()
            idx = keep[start : start + size].nonzero().squeeze(1).cpu()
            start += size
            if idx.numel():
                out[n] = idx
    return out


def exclude_coordinates(mask: SparseMask, exclude: SparseMask) -> SparseMask:
    """``mask`` without the coordinates of ``exclude`` (e.g. an earlier stage's mask in continual training).

    Returns:
        a new :class:`SparseMask`; its metadata adds ``excluded_coordinates`` (how many were removed).

    Raises:
        ValueError: a module in both with different shapes, or nothing left.
    """
    for name in mask:
        if name in exclude and exclude.shape(name) != mask.shape(name):
            raise ValueError(
                f"exclude mask for module '{name}' has shape {exclude.shape(name)}, mask has {mask.shape(name)}"
            )
    try:
        left = mask - exclude
    except ValueError:  # the difference is empty
        raise ValueError(
            "every coordinate of the mask is excluded; nothing is left to train (loosen the churn budget)"
        ) from None
    left.metadata = {**mask.metadata, "excluded_coordinates": mask.nnz() - left.nnz()}
    return left
