"""Tensors on disk: every safetensors file the package writes goes through :func:`atomic_save_safetensors`
(temp file, fsync, atomic rename, umask-respecting mode) and every one it reads back through
:func:`load_safetensors_checked` (truncation / corruption -> a ``ValueError`` naming the file)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .atomic import atomic_file

__all__ = ["atomic_save_safetensors", "load_safetensors_checked"]


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
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, json.JSONDecodeError, RuntimeError) as err:
        raise ValueError(
            f"{path}: not a readable safetensors file ({err}); the file is truncated or corrupt, re-save or re-download it"
        ) from None
    return tensors, metadata
