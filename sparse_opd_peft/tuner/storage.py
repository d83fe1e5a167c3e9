"""On-disk packing of sparse coordinates, base-weight fingerprints and atomic safetensors writes.

Coordinates of one (out, in) weight are sorted flat indices ``i = row * in + col``. On disk they are stored as
either

* a packed bitmask: ``uint8`` of length ``ceil(out * in / 8)``, bit ``7 - (i % 8)`` of byte ``i // 8`` set when
  ``i`` is a coordinate (numpy ``packbits`` order); 1 bit per weight entry, used when density >= 1/32, or
* sorted ``int32`` flat indices (``int64`` when ``out * in >= 2**31``): 4 bytes per coordinate, used below 1/32.

At density 1/32 both cost 4 bytes per coordinate, so the rule always picks the smaller one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

BITMASK_MIN_DENSITY = 1.0 / 32.0
FINGERPRINT_SAMPLES = 4096
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def index_dtype(numel: int) -> torch.dtype:
    """Smallest signed integer dtype that holds flat indices into a tensor of ``numel`` entries."""
    return torch.int32 if numel < 2**31 else torch.int64


def pack_bitmask(flat_indices: torch.Tensor, numel: int) -> torch.Tensor:
    """Pack sorted flat indices (1-D integer tensor) into a bitmask: 1-D ``uint8`` of length ``ceil(numel / 8)``."""
    bits = torch.zeros(((numel + 7) // 8) * 8, dtype=torch.uint8, device=flat_indices.device)
    bits[flat_indices.long()] = 1
    return (bits.view(-1, 8) * _BIT_WEIGHTS.to(bits.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bitmask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bitmask`: 1-D ``uint8`` -> sorted flat indices (1-D ``int64``)."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 7) // 8:
        raise ValueError(
            f"bitmask must be 1-D uint8 of length {(numel + 7) // 8} for {numel} weight entries, "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    bits = (packed.unsqueeze(1) & _BIT_WEIGHTS.to(packed.device)).ne(0).reshape(-1)
    if bits[numel:].any():
        raise ValueError("bitmask has bits set past the end of the weight (padding bits must be zero)")
    return bits[:numel].nonzero().squeeze(1)


def pack_coordinates(flat_indices: torch.Tensor, numel: int) -> tuple[str, torch.Tensor]:
    """Choose the on-disk form of sorted flat indices: ``("bitmask", uint8)`` or ``("indices", int32|int64)``."""
    if flat_indices.numel() >= numel * BITMASK_MIN_DENSITY:
        return "bitmask", pack_bitmask(flat_indices, numel)
    return "indices", flat_indices.to(index_dtype(numel)).contiguous()


def validate_flat_indices(indices: torch.Tensor, numel: int, where: str) -> torch.Tensor:
    """Check that ``indices`` (1-D integer) are in ``[0, numel)``, strictly increasing; return them as int64.

    Raises:
        ValueError: naming ``where`` (module or file) on out-of-range, duplicate or unsorted indices.
    """
    if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(
            f"{where}: coordinates must be a 1-D integer tensor, got {indices.dtype} {tuple(indices.shape)}"
        )
    idx = indices.long()
    if idx.numel() == 0:
        raise ValueError(f"{where}: the adapter has no coordinates (empty mask); drop this module from the mask")
    if int(idx.min()) < 0 or int(idx.max()) >= numel:
        raise ValueError(
            f"{where}: coordinate out of range [0, {numel}) (min {int(idx.min())}, max {int(idx.max())}); "
            "the file does not belong to this weight shape"
        )
    steps = idx[1:] - idx[:-1]
    if (steps == 0).any():
        raise ValueError(f"{where}: duplicate coordinates; each weight entry may appear once (re-save the adapter)")
    if (steps < 0).any():
        raise ValueError(f"{where}: coordinates are not sorted ascending (re-save the adapter)")
    return idx


def unpack_coordinates(kind: str, tensor: torch.Tensor, numel: int, where: str) -> torch.Tensor:
    """Decode a stored ``("bitmask" | "indices", tensor)`` pair into validated sorted flat int64 indices."""
    if kind == "bitmask":
        try:
            idx = unpack_bitmask(tensor, numel)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        return validate_flat_indices(idx, numel, where)
    if kind == "indices":
        return validate_flat_indices(tensor, numel, where)
    raise ValueError(f"{where}: unknown coordinate encoding {kind!r} (expected 'bitmask' or 'indices')")


def _bf16_sha256(values: torch.Tensor) -> str:
    """SHA-256 of the bfloat16 bit patterns of ``values``: the same base stored in float32, bfloat16 or float16
    (rounded from one float32 original) hashes alike."""
    bits = values.detach().to(torch.bfloat16).view(torch.int16).cpu().contiguous()
    return hashlib.sha256(bits.numpy().tobytes()).hexdigest()


def weight_fingerprint(weight: torch.Tensor, full: bool = False) -> dict:
    """Fingerprint of a base weight: shape, dtype and a SHA-256 of a fixed strided sample (or of all entries),
    hashed as bfloat16 bit patterns so that a float32 checkpoint and its bf16 copy match.

    Args:
        weight: a dense float tensor of any shape (quantized bitsandbytes weights are fingerprinted by shape only).
        full: hash every entry instead of :data:`FINGERPRINT_SAMPLES` evenly spaced ones.

    Returns:
        ``{"shape": [...], "dtype": "torch.float32", "sample_sha256": str | None, "full_sha256": str | None}``.
    """
    shape = list(weight.shape)
    info = {"shape": shape, "dtype": str(weight.dtype), "sample_sha256": None, "full_sha256": None}
    if weight.device.type == "meta" or not weight.dtype.is_floating_point:
        return info
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    if n:
        pos = torch.linspace(0, n - 1, min(n, FINGERPRINT_SAMPLES), device=flat.device).round().long()
        info["sample_sha256"] = _bf16_sha256(flat[pos])[:32]
        if full:
            info["full_sha256"] = _bf16_sha256(flat)
    return info


def fingerprint_mismatch(expected: Mapping, actual: Mapping) -> str | None:
    """Return a human-readable difference between two fingerprints, or None when they agree."""
    if list(expected.get("shape", [])) != list(actual.get("shape", [])):
        return f"shape {expected.get('shape')} != {actual.get('shape')}"
    for key in ("sample_sha256", "full_sha256"):
        a, b = expected.get(key), actual.get(key)
        if a is not None and b is not None and a != b:
            return f"{key} differs (weights differ; adapter dtype {expected.get('dtype')}, base {actual.get('dtype')})"
    return None


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> None:
    """Write ``tensors`` to ``path`` as safetensors through a temp file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_safetensors_checked(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file and its metadata, turning truncation / corruption into a clear ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, json.JSONDecodeError, RuntimeError) as err:
        raise ValueError(
            f"{path}: not a readable safetensors file ({err}); the file is truncated or corrupt, re-save or re-download it"
        ) from None
    return tensors, metadata
