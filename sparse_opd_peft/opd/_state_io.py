"""Pickle-free building blocks of the resumable trainer state (:mod:`.checkpoint`): a JSON + safetensors codec for
``optimizer.state_dict()``, global RNG states, frozen-adapter digests, safetensors headers and durable writes."""

from __future__ import annotations

import hashlib
import random
from itertools import chain
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import safe_open

from ..atomic import fsync_path, write_json_atomic
from ..safetensors_io import _SAFETENSORS_DTYPES

_TAG = "__t__"
# safetensors dtype code -> torch dtype name ("F32" -> "float32"), the float8 codes included
_ST_DTYPES = {code: str(dtype).removeprefix("torch.") for code, dtype in _SAFETENSORS_DTYPES.items()} | {
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def encode(value: Any, path: tuple[str, ...], tensors: dict[str, torch.Tensor]) -> Any:
    """JSON form of ``value`` (e.g. an ``optimizer.state_dict()``): every tensor moves to ``tensors`` under its dotted
    ``path`` (``"state.3.exp_avg"``; CPU, contiguous, dtype and shape kept, 0-d included) and is referenced by key;
    tuples and dicts with non-string keys (the ``state`` dict's int keys) are tagged so :func:`decode` restores them
    exactly. ``None`` / bool / int / float / str stay as they are (JSON keeps int vs float, and non-finite floats).

    Raises:
        TypeError: for any other type (it could only be stored by pickling).
    """
    if isinstance(value, torch.Tensor):
        key = ".".join(path)
        tensors[key] = value.detach().cpu().contiguous()
        return {_TAG: "tensor", "key": key}
    if isinstance(value, tuple):
        return {_TAG: "tuple", "items": [encode(v, (*path, str(i)), tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, (*path, str(i)), tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if _TAG not in value and all(isinstance(k, str) for k in value):
            return {k: encode(v, (*path, k), tensors) for k, v in value.items()}
        items = [[encode(k, (), {}), encode(v, (*path, str(k)), tensors)] for k, v in value.items()]
        return {_TAG: "dict", "items": items}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {'.'.join(path) or 'top level'} without pickle")


def decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode` (``KeyError`` for a tensor key missing from ``tensors``, ``ValueError`` for an
    unknown tag)."""
    if isinstance(value, list):
        return [decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    tag = value.get(_TAG)
    if tag is None:
        return {k: decode(v, tensors) for k, v in value.items()}
    if tag == "tensor":
        return tensors[value["key"]]
    if tag == "tuple":
        return tuple(decode(v, tensors) for v in value["items"])
    if tag == "dict":
        return {decode(k, tensors): decode(v, tensors) for k, v in value["items"]}
    raise ValueError(f"unknown tag {tag!r}")


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with copies where two share a storage (safetensors refuses those)."""
    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen and t.numel() else t
        seen.add(ptr)
    return out


def frozen_adapter_digests(model: torch.nn.Module) -> dict[str, str]:
    """``{name: "sha256:dtype:shape"}`` of a PEFT adapter's frozen tensors (buffers and frozen parameters named with
    the tuner's prefix, e.g. SparseOPD's ``sparse_opd_indices`` / ``sparse_opd_basis``), so resuming with another
    mask of the same sizes is caught; ``{}`` for a plain model or an adapter without frozen tensors (LoRA)."""
    prefix = getattr(getattr(model, "base_model", None), "prefix", None)
    if not hasattr(model, "peft_config") or not isinstance(prefix, str):
        return {}
    frozen = ((n, p) for n, p in model.named_parameters() if not p.requires_grad)
    out = {}
    for name, t in chain(model.named_buffers(), frozen):
        if f".{prefix}" in name:
            flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            out[name] = f"{hashlib.sha256(flat.numpy().tobytes()).hexdigest()}:{t.dtype}:{list(t.shape)}"
    return out


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's global RNG states, as ``accelerate.save_state`` saved them: ``({"torch_cpu": uint8 (5056,),
    "cuda.<device>": uint8 (16,) per visible device}, {"python": random.getstate(), "numpy": legacy MT19937})``."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    numpy_state = [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    return tensors, {"python": [version, list(internal), gauss], "numpy": numpy_state}


def _python_state(rng: dict[str, Any]) -> tuple:
    version, internal, gauss = rng["python"]
    return version, tuple(internal), gauss


def _numpy_state(rng: dict[str, Any]) -> tuple:
    name, keys, pos, has_gauss, cached = rng["numpy"]
    return name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached


def check_rng(tensors: dict[str, torch.Tensor], rng: dict[str, Any]) -> None:
    """Raise (``KeyError`` / ``TypeError`` / ``ValueError`` / ``RuntimeError``) unless :func:`rng_state` output is
    well formed; checked on throwaway generators, so no global state changes."""
    torch.Generator().set_state(tensors["torch_cpu"])
    random.Random().setstate(_python_state(rng))
    np.random.RandomState().set_state(_numpy_state(rng))


def set_rng(tensors: dict[str, torch.Tensor], rng: dict[str, Any]) -> None:
    """Restore :func:`rng_state` output into the global generators (CUDA: the devices present in both)."""
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda.{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"cuda.{i}"], i)
    random.setstate(_python_state(rng))
    np.random.set_state(_numpy_state(rng))


def safetensors_header(path: Path) -> dict[str, tuple[list[int], str]]:
    """``{key: (shape, torch dtype name such as "float32")}`` of a safetensors file, without reading its tensors."""
    with safe_open(str(path), framework="pt") as f:
        slices = {k: f.get_slice(k) for k in f.keys()}
        return {k: (list(s.get_shape()), _ST_DTYPES.get(s.get_dtype(), s.get_dtype())) for k, s in slices.items()}


def write_json(path: Path, obj: Any, indent: Optional[int] = 1) -> None:
    """Write ``obj`` as JSON (other objects through ``float``, e.g. numpy scalars) to ``path`` atomically."""
    write_json_atomic(path, obj, indent=indent, default=float)


def fsync_tree(directory: Path) -> None:
    """Flush the files of ``directory`` and the directory itself to disk (skipped where the OS does not allow it)."""
    for path in [*sorted(p for p in directory.iterdir() if p.is_file()), directory]:
        fsync_path(path)
