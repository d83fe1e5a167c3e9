"""The mask-rule registry: a new rule is one decorated function here, and ``sparse-opd mask --rule`` lists it.

A rule reads one module's source and tuned weights ``w0, w1`` (same shape (out, in), any float dtype) and is one of
two kinds:

* ``"threshold"``: returns a bool tensor (out, in) of the moved coordinates (``bf16_visible``, ``abs_threshold``);
* ``"score"``: returns non-negative finite float32 scores (out, in); the coordinates are then chosen by a
  :class:`~sparse_opd_peft.masks.budget.Budget` (density, FFN share, per module) - ``topk`` ranks ``|ΔW|``.

This module imports no torch at import time (the CLI reads :data:`RULES` for its ``--help``); rules import what they
need when they run. :func:`~sparse_opd_peft.masks.checkpoints.mask_from_checkpoints` applies them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

__all__ = ["RULES", "MaskRule", "register_rule"]


@dataclass(frozen=True)
class MaskRule:
    """One registered rule: its name, kind (``"threshold"`` | ``"score"``), function, one-line help and the keyword
    options it takes (passed through from ``mask_from_checkpoints``)."""

    name: str
    kind: Literal["threshold", "score"]
    fn: Callable[..., Any]
    help: str
    options: tuple[str, ...] = ()


RULES: dict[str, MaskRule] = {}


def register_rule(
    name: str, kind: Literal["threshold", "score"], help: str, options: tuple[str, ...] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn(w0, w1, **options)`` as mask rule ``name`` (see the module docstring for kinds)."""
    if kind not in ("threshold", "score"):
        raise ValueError(f"mask rule {name!r}: kind must be 'threshold' or 'score', got {kind!r}")

    def add(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in RULES:
            raise ValueError(f"mask rule {name!r} is registered twice")
        RULES[name] = MaskRule(name, kind, fn, help, tuple(options))
        return fn

    return add


@register_rule("bf16_visible", "threshold", "|bf16(W1) - bf16(W0)| > eta * max(|.|, |.|), eta = 1e-3", ("eta",))
def bf16_visible(w0: torch.Tensor, w1: torch.Tensor, *, eta: float | None = None) -> torch.Tensor:
    """Coordinates whose change survives bfloat16 storage (SPEC eq. 1): bool (out, in)."""
    from ..diagnostics.metrics import ETA, bf16_visible_mask

    return bf16_visible_mask(w0, w1, ETA if eta is None else eta)


@register_rule("abs_threshold", "threshold", "|W1 - W0| >= 1e-5 in float32", ("abs_threshold",))
def abs_threshold(w0: torch.Tensor, w1: torch.Tensor, *, abs_threshold: float | None = None) -> torch.Tensor:
    """Coordinates with ``|ΔW| >= abs_threshold`` (float32 ΔW): bool (out, in)."""
    from ..diagnostics.metrics import ABS_THRESHOLD, abs_changed_mask

    return abs_changed_mask(w0, w1, ABS_THRESHOLD if abs_threshold is None else abs_threshold)


@register_rule("topk", "score", "largest |W1 - W0| at --density (global, --per-module or --ffn-share)")
def topk(w0: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """Scores ``|W1 - W0|`` in float32, shape (out, in)."""
    return (w1.float() - w0.float()).abs()
