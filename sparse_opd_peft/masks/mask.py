"""``SparseMask``: which coordinates of which Linear weights an adapter trains.

A mask maps module names (``model.layers.0.mlp.up_proj``) to the sorted flat indices of the trained entries of
that module's (out, in) weight. It is built from a dict of bool tensors, saved to / loaded from safetensors with the
same packing as the adapter (bitmask or int32 indices), and reports densities per module and per module type.
Builders (:func:`~sparse_opd_peft.masks.mask_from_checkpoints`, :func:`~sparse_opd_peft.masks.random_like`,
:func:`~sparse_opd_peft.masks.low_magnitude`, ...) and :func:`~sparse_opd_peft.masks.mask_overlap` live beside it
in :mod:`sparse_opd_peft.masks`; they import this module, never the other way round.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..module_types import module_type, stats_by_type
from ..positions import pack_coordinates, unpack_coordinates, validate_flat_indices
from ..safetensors_io import atomic_save_safetensors, load_safetensors_checked

MASK_FORMAT = "sparse_opd_mask"
MASK_FORMAT_VERSION = 2  # 2: sparse modules may be coded uint8 streams (sparse_opd_peft/positions.py)


def _check_bool_mask(name: str, value) -> torch.Tensor:
    """``value`` if it is a dense 2-D bool tensor with data, else ``TypeError`` / ``ValueError`` naming the module."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"mask for module '{name}': expected a bool torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise TypeError(
            f"mask for module '{name}' is a {str(value.layout).removeprefix('torch.')} tensor; masks must be dense "
            "bool tensors: pass `mask.to_dense()`"
        )
    if value.device.type == "meta":
        raise ValueError(
            f"mask for module '{name}' is on the meta device (it holds no values); build it from materialised "
            "weights (load the model without device_map='meta' / init_empty_weights)"
        )
    if value.dtype != torch.bool:
        if value.dtype.is_floating_point and torch.isnan(value).any():
            raise ValueError(
                f"mask for module '{name}' contains NaN; build it as a bool tensor (e.g. `delta.abs() > t`)"
            )
        raise ValueError(
            f"mask for module '{name}' has dtype {value.dtype}; masks must be bool tensors (use `mask != 0` or `.bool()`)"
        )
    if value.dim() != 2:
        raise ValueError(f"mask for module '{name}' must be 2-D (out_features, in_features), got {tuple(value.shape)}")
    return value


class SparseMask(Mapping):
    """Module name -> trained coordinates of that module's 2-D weight.

    Indexing returns a dense bool tensor of the weight's shape; :meth:`indices` returns sorted flat ``int64``
    indices (``row * in_features + col``). Immutable: set operations return new masks.

    Args:
        masks: ``{module_name: bool tensor of shape (out_features, in_features)}``. A trailing ``.weight`` in a
            name is stripped.
        metadata: JSON-able provenance (source / tuned checkpoints, rule, density, ...), kept through save/load.
    """

    def __init__(self, masks: Mapping[str, torch.Tensor] | None = None, metadata: Mapping | None = None):
        self._shapes: dict[str, tuple[int, int]] = {}
        self._indices: dict[str, torch.Tensor] = {}
        self.metadata: dict = dict(metadata or {})
        for name, value in (masks or {}).items():
            name = name[: -len(".weight")] if name.endswith(".weight") else name
            value = _check_bool_mask(name, value)
            flat = value.detach().reshape(-1).nonzero().squeeze(1).cpu()
            if flat.numel() == 0:
                raise ValueError(f"mask for module '{name}' is empty (no True entry); drop the module from the mask")
            self._shapes[name] = (int(value.shape[0]), int(value.shape[1]))
            self._indices[name] = flat
        if not self._indices and masks is not None:
            raise ValueError("the mask is empty: it names no module; pass at least one {module_name: bool tensor}")

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_indices(
        cls, entries: Mapping[str, tuple[tuple[int, int], torch.Tensor]], metadata: Mapping | None = None
    ) -> SparseMask:
        """Build from ``{name: ((out, in), sorted flat int indices)}`` without materialising dense masks."""
        mask = cls(None, metadata)
        for name, (shape, idx) in entries.items():
            if not isinstance(idx, torch.Tensor) or idx.layout != torch.strided or idx.device.type == "meta":
                what = type(idx).__name__ if not isinstance(idx, torch.Tensor) else f"{idx.layout} / {idx.device}"
                raise TypeError(
                    f"mask module '{name}': indices must be a dense 1-D integer tensor with data, got {what}; pass "
                    "sorted flat indices (row * in_features + col) as a torch.Tensor"
                )
            out_f, in_f = int(shape[0]), int(shape[1])
            mask._shapes[name] = (out_f, in_f)
            mask._indices[name] = validate_flat_indices(idx.detach().cpu(), out_f * in_f, f"mask module '{name}'")
        if not mask._indices:
            raise ValueError("the mask is empty: it names no module")
        return mask

    @classmethod
    def coerce(cls, value) -> SparseMask:
        """Accept a ``SparseMask``, a ``{name: bool tensor}`` dict or a path to a saved mask."""
        if isinstance(value, SparseMask):
            return value
        if isinstance(value, (str, os.PathLike)):
            return cls.load(value)
        if isinstance(value, Mapping):
            return cls(value)
        raise TypeError(
            f"mask must be a SparseMask, a dict {{module_name: bool tensor}} or a path, got {type(value).__name__}"
        )

    # ----------------------------------------------------------------- mapping protocol
    def __getitem__(self, name: str) -> torch.Tensor:
        """Dense bool mask of shape (out_features, in_features) for module ``name``."""
        out_f, in_f = self._shapes[name]
        dense = torch.zeros(out_f * in_f, dtype=torch.bool)
        dense[self._indices[name]] = True
        return dense.view(out_f, in_f)

    def __iter__(self) -> Iterator[str]:
        return iter(self._indices)

    def __len__(self) -> int:
        return len(self._indices)

    def __repr__(self) -> str:
        return f"SparseMask({len(self)} modules, nnz={self.nnz():,}, density={self.density():.4f})"

    def indices(self, name: str) -> torch.Tensor:
        """Sorted flat ``int64`` indices (1-D, length nnz) of module ``name``."""
        return self._indices[name]

    def shape(self, name: str) -> tuple[int, int]:
        """(out_features, in_features) of module ``name``'s weight."""
        return self._shapes[name]

    # ----------------------------------------------------------------- statistics
    def nnz(self, name: str | None = None) -> int:
        """Number of trained coordinates of one module, or of all modules."""
        if name is not None:
            return int(self._indices[name].numel())
        return sum(int(v.numel()) for v in self._indices.values())

    def numel(self, name: str | None = None) -> int:
        """Number of weight entries of one module, or of all masked modules."""
        if name is not None:
            return math.prod(self._shapes[name])
        return sum(math.prod(s) for s in self._shapes.values())

    def density(self, name: str | None = None) -> float:
        """nnz / numel for one module or, parameter-weighted, over all masked modules."""
        return self.nnz(name) / max(self.numel(name), 1)

    def module_stats(self, overrides: Mapping[str, str] | None = None) -> dict[str, dict]:
        """Per module: ``{"shape", "nnz", "numel", "density", "type"}`` (``overrides``: as in :meth:`type_stats`)."""
        return {
            n: {
                "shape": list(self._shapes[n]),
                "nnz": self.nnz(n),
                "numel": self.numel(n),
                "density": self.density(n),
                "type": module_type(n, overrides),
            }
            for n in self
        }

    def type_stats(self, overrides: Mapping[str, str] | None = None) -> dict[str, dict]:
        """Per module type (ffn / attention / other): nnz, numel, density and share of all trained coordinates."""
        return stats_by_type({n: {"nnz": self.nnz(n), "numel": self.numel(n)} for n in self}, overrides=overrides)

    # ----------------------------------------------------------------- set operations
    def _combine(self, other: SparseMask, op: str) -> SparseMask:
        if not isinstance(other, SparseMask):
            return NotImplemented
        names = list(self) + [n for n in other if n not in self._indices]
        entries = {}
        for n in names:
            a, b = self._indices.get(n), other._indices.get(n)
            if a is not None and b is not None and self._shapes[n] != other._shapes[n]:
                raise ValueError(f"module '{n}': shapes differ ({self._shapes[n]} vs {other._shapes[n]})")
            shape = self._shapes.get(n) or other._shapes[n]
            empty = torch.empty(0, dtype=torch.long)
            a = a if a is not None else empty
            b = b if b is not None else empty
            if op == "and":
                idx = a[torch.isin(a, b)]
            elif op == "or":
                idx = torch.unique(torch.cat([a, b]))
            else:
                idx = a[~torch.isin(a, b)]
            if idx.numel():
                entries[n] = (shape, idx)
        if not entries:
            raise ValueError(f"the result of mask {op} is empty")
        return SparseMask.from_indices(entries, {"derived": op})

    def __and__(self, other: SparseMask) -> SparseMask:
        return self._combine(other, "and")

    def __or__(self, other: SparseMask) -> SparseMask:
        return self._combine(other, "or")

    def __sub__(self, other: SparseMask) -> SparseMask:
        return self._combine(other, "sub")

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike, overwrite: bool = True) -> Path:
        """Save as safetensors (bitmask when density >= 1/32, else int32 indices), atomically. Returns the path."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
        tensors, layout = {}, {}
        for i, n in enumerate(self):
            out_f, in_f = self._shapes[n]
            kind, packed = pack_coordinates(self._indices[n], out_f * in_f)
            tensors[f"m{i}.{kind}"] = packed
            layout[n] = {"key": f"m{i}", "kind": kind, "shape": [out_f, in_f], "nnz": self.nnz(n)}
        meta = {
            "format": MASK_FORMAT,
            "format_version": str(MASK_FORMAT_VERSION),
            "layout": json.dumps(layout),
            "metadata": json.dumps(self.metadata),
        }
        atomic_save_safetensors(tensors, path, metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SparseMask:
        """Load a mask written by :meth:`save`; corrupt or foreign files raise ``ValueError`` naming the file."""
        tensors, meta = load_safetensors_checked(path)
        if meta.get("format") != MASK_FORMAT:
            raise ValueError(f"{path}: not a sparse_opd_peft mask file (metadata 'format' is {meta.get('format')!r})")
        if int(meta.get("format_version", "0")) > MASK_FORMAT_VERSION:
            raise ValueError(f"{path}: mask format version {meta['format_version']} is newer; upgrade sparse_opd_peft")
        try:
            layout = json.loads(meta["layout"])
            metadata = json.loads(meta.get("metadata", "{}"))
        except (KeyError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: mask layout metadata is missing or corrupt ({err})") from None
        entries = {}
        for name, info in layout.items():
            key = f"{info['key']}.{info['kind']}"
            if key not in tensors:
                raise ValueError(f"{path}: tensor {key!r} for module '{name}' is missing")
            shape = tuple(info["shape"])
            idx = unpack_coordinates(info["kind"], tensors[key], shape[0] * shape[1], f"{path} module '{name}'")
            if idx.numel() != info["nnz"]:
                raise ValueError(f"{path} module '{name}': {idx.numel()} coordinates but layout says {info['nnz']}")
            entries[name] = (shape, idx)
        mask = cls.from_indices(entries, metadata)
        mask.metadata.setdefault("loaded_from", str(path))
        return mask
