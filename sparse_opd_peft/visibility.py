"""bf16 visibility: does an update survive rounding the merged weight to bfloat16?

An update ``δ`` of a base weight ``w0`` is *visible* iff ``bf16(w0 + δ) != bf16(w0)`` as bit patterns, with
``w0 + δ`` formed in float32 (one rounding, as :meth:`merge` does).
"""

from __future__ import annotations

import torch


def bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """Bit patterns (int16, same shape) of ``x`` rounded to bfloat16 (round-to-nearest-even)."""
    return x.to(torch.bfloat16).view(torch.int16)


def visible_update(w0: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Bool tensor (same shape): True where ``bf16(float32(w0) + delta)`` differs in bits from ``bf16(w0)``.

    Args:
        w0: base weight entries, any float dtype.
        delta: update of the same shape, any float dtype (accumulated in float32).
    """
    base = w0.to(torch.float32)
    return bf16_bits(base + delta.to(torch.float32)) != bf16_bits(base)


def visibility_summary(rows: dict[str, dict]) -> dict:
    """Aggregate per-module ``{"coords": n, "visible": k}`` rows into ``{"coords", "visible", "share", "modules"}``
    where ``share`` = Σk / Σn (coordinate-weighted) and each module row gets its own ``share``."""
    total = sum(r["coords"] for r in rows.values())
    visible = sum(r["visible"] for r in rows.values())
    for r in rows.values():
        r["share"] = r["visible"] / r["coords"] if r["coords"] else 0.0
    return {"coords": total, "visible": visible, "share": visible / total if total else 0.0, "modules": rows}
