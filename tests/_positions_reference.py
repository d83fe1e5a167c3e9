"""A plain-Python reference writer of the coded position streams (format version 2, ``sparse_opd_peft/positions.py``'s
docstring), written from the format's description only. It also writes what the library's encoder never would
(unsorted, duplicate or out-of-range positions, a lying count), so tests can craft hostile streams."""

from __future__ import annotations

import torch


def leb128(value: int) -> list[int]:
    out = []
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return out


def _pack(bits: str) -> list[int]:
    bits += "0" * (-len(bits) % 8)
    return [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]


def varint_stream(positions: list[int], count: int | None = None) -> torch.Tensor:
    """Delta-varint stream of ``positions`` (taken as given), header count ``count`` (default: their number)."""
    gaps = [p - q for p, q in zip(positions, [0] + positions[:-1], strict=True)]
    data = [1, 0] + leb128(len(positions) if count is None else count)
    for gap in gaps:
        data += leb128(gap)
    return torch.tensor(data, dtype=torch.uint8)


def elias_fano_stream(positions: list[int], numel: int, low_bits: int, count: int | None = None) -> torch.Tensor:
    """Elias-Fano stream of ``positions`` (taken as given; ``(p >> low_bits) + k`` must stay inside the upper bits)."""
    n = len(positions)
    low = "".join(format(p & ((1 << low_bits) - 1), f"0{low_bits}b") for p in positions) if low_bits else ""
    upper = ["0"] * (n + ((numel - 1) >> low_bits) + 1)
    for k, p in enumerate(positions):
        upper[(p >> low_bits) + k] = "1"
    data = [2, low_bits] + leb128(n if count is None else count) + _pack(low) + _pack("".join(upper))
    return torch.tensor(data, dtype=torch.uint8)
