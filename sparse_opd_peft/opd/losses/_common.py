"""Shared helpers of the loss functions: mask checks, dtype promotion, position blocks under checkpointing."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.checkpoint import checkpoint

__all__: list[str] = []


def _check_mask(mask: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if mask.dtype != torch.bool:
        raise ValueError(f"{what}: mask must be a bool tensor, got {mask.dtype}; pass completion_mask.bool()")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{what}: mask shape {tuple(mask.shape)} differs from the values' shape {tuple(shape)}")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float32, or float64 for float64 input."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _blocks(n: int, t: int, chunk_size: int) -> Iterator[tuple[slice, slice]]:
    """(row slice, position slice) blocks of about ``chunk_size`` positions covering an (n, t) grid, row-major."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if t >= chunk_size:
        for i in range(n):
            for j in range(0, t, chunk_size):
                yield slice(i, i + 1), slice(j, min(t, j + chunk_size))
    else:
        rows = max(1, chunk_size // max(t, 1))
        for i in range(0, n, rows):
            yield slice(i, min(n, i + rows)), slice(0, t)


def _blockwise(
    fn: Callable[..., torch.Tensor], n: int, t: int, chunk_size: int, *tensors: torch.Tensor
) -> torch.Tensor:
    """Apply ``fn`` to (n, t, ...) blocks of ``tensors`` (views, no copies) and reassemble an (n, t) result; blocks
    are checkpointed when a gradient is needed so their float32 temporaries are recomputed in backward."""
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    rows: list[list[torch.Tensor]] = []
    last_rows = None
    for rs, ts in _blocks(n, t, chunk_size):
        args = [x[rs, ts] for x in tensors]
        out = checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args)
        if rs != last_rows:
            rows.append([])
            last_rows = rs
        rows[-1].append(out)
    if not rows:
        return tensors[0].new_zeros((n, t), dtype=torch.float32)
    return torch.cat([torch.cat(r, dim=1) for r in rows], dim=0)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate near 0 and near -inf."""
    x = x.clamp(max=0.0)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
