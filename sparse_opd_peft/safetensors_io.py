"""Tensors on disk: every safetensors file the package writes goes through :func:`atomic_save_safetensors`
(temp file, fsync, atomic rename, umask-respecting mode) and every one it reads back through
:func:`load_safetensors_checked` (truncation / corruption -> a ``ValueError`` naming the file);
:func:`safetensors_nbytes` gives the exact size of such a file without writing it."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from .atomic import atomic_file

__all__ = ["atomic_save_safetensors", "load_safetensors_checked", "safetensors_nbytes"]


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> None:
    """Write ``tensors`` (any shapes / dtypes) to ``path`` as safetensors through a temp file in the same folder and
    an atomic rename (:func:`sparse_opd_peft.atomic.atomic_file`: mode per the umask, nothing left on failure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_safetensors_checked(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file and its metadata, turning truncation / corruption into a clear ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            keys = getattr(f, "offset_keys", f.keys)()  # load_file's order: the file's where safetensors has it
            tensors = {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, json.JSONDecodeError, RuntimeError) as err:
        raise ValueError(
            f"{path}: not a readable safetensors file ({err}); the file is truncated or corrupt, re-save or re-download it"
        ) from None
    return tensors, metadata


# safetensors writes tensors sorted by dtype (this order, descending), then by name; the header is padded to 8 bytes.
_SAFETENSORS_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "F16": torch.float16,
                       "BF16": torch.bfloat16, "I32": torch.int32, "F32": torch.float32, "F64": torch.float64,
                       "I64": torch.int64}  # fmt: skip


def safetensors_nbytes(tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> int:
    """Exact size in bytes of the file ``safetensors.torch.save_file(tensors, metadata=metadata)`` writes, computed
    from names, shapes and dtypes only (no copy of the data).

    Args:
        tensors: ``{name: tensor}`` of any shapes; dtypes bool, (u)int8/16/32/64, float16/bfloat16/32/64.
        metadata: the ``__metadata__`` strings (peft writes ``{"format": "pt"}``).
    """
    names = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
    if any(t.dtype not in names for t in tensors.values()):  # rare dtypes: let safetensors serialize in memory
        data = {k: v.contiguous() for k, v in tensors.items()}
        return len(safetensors.torch.save(data, metadata=dict(metadata or {}) or None))
    order = list(_SAFETENSORS_DTYPES)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, tensor in sorted(tensors.items(), key=lambda kv: (-order.index(names[kv[1].dtype]), kv[0])):
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": names[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return 8 + len(raw) + (-len(raw)) % 8 + offset
