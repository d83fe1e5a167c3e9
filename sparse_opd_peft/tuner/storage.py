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
from collections.abc import Collection, Mapping
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..atomic import atomic_file

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


# ---------------------------------------------------------------------------------------------- adapter files
ADAPTER_PARAMS = (
    "sparse_opd_values",
    "sparse_opd_indices",
    "sparse_opd_bitmask",
    "sparse_opd_coeff",
    "sparse_opd_basis",
)
VALUE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PEFT_PREFIX = "base_model.model."
_REFUSE = (
    "a SparseOPD adapter file holds only sparse_opd_values / _indices / _bitmask / _coeff / _basis tensors of the "
    "modules its adapter_config.json lists (never base-model weights): the file was altered or belongs to another "
    "adapter; re-save it with save_adapter / model.save_pretrained"
)


def parse_adapter_key(key: str) -> tuple[str, str]:
    """``"base_model.model.<module>.<param>"`` -> ``(module, param)`` for our tensors; ``("", "")`` for any other key
    (an adapter name or anything else after the parameter name counts as another key)."""
    for param in ADAPTER_PARAMS:
        if key.endswith("." + param):
            return key[: -len(param) - 1].removeprefix(_PEFT_PREFIX), param
    return "", ""


def _check_float(t: torch.Tensor, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...], where: str) -> None:
    """Shape, dtype and finiteness of one stored float tensor (``ValueError`` naming ``where`` otherwise)."""
    if tuple(t.shape) != shape or t.dtype not in dtypes:
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(
            f"{where} must be {want} of shape {list(shape)}, got {str(t.dtype).removeprefix('torch.')} "
            f"{list(t.shape)}; {_REFUSE}"
        )
    if t.device.type != "meta" and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(
            f"{where} holds {bad} NaN / inf value(s); the adapter is broken (diverged training or a damaged file): "
            "retrain it or load an earlier checkpoint"
        )


def decode_adapter_state(
    config, state_dict: Mapping[str, torch.Tensor], source: str, allowed: Collection[str] = ()
) -> dict[str, torch.Tensor]:
    """Check a saved adapter's tensors against its config and decode the packed coordinates.

    Every key must be ``base_model.model.<module>.<param>`` of a module in ``config.module_shapes``: per module with
    ``module_nnz`` n > 0 exactly one coordinate tensor (bitmask ``uint8`` or sorted ``int32`` / ``int64`` indices;
    n valid coordinates) and ``values`` (n,) in ``config.save_dtype``; per module with ``module_rank`` r > 0
    ``coeff`` (out, r) in ``save_dtype`` and ``basis`` (in, r) float; all finite; nothing else, so a file holding
    base weights (``...base_layer.weight``, ``model.embed_tokens.weight``) or a module the config does not train is
    refused before anything is loaded.

    Args:
        config: a ``SparseOPDConfig`` whose metadata was checked (:func:`..files.check_adapter_metadata`).
        state_dict: ``{key: tensor}`` as read from ``adapter_model.safetensors``.
        source: the file, for error messages.
        allowed: other keys to pass through unchecked (peft's ``modules_to_save`` copies).

    Returns:
        The state dict with ``sparse_opd_bitmask`` / ``_indices`` replaced by ``sparse_opd_indices`` (sorted flat
        ``int32`` indices, ``int64`` when out·in >= 2³¹), every other tensor unchanged.

    Raises:
        ValueError / TypeError: naming ``source``, the module and the tensor.
    """
    found: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor; {_REFUSE}")
        if key in allowed:
            out[key] = value
            continue
        name, param = parse_adapter_key(key)
        if not param:
            raise ValueError(f"{source}: holds {key!r}, which is not a tensor of this adapter; {_REFUSE}")
        if name not in config.module_shapes:
            raise ValueError(
                f"{source}: tensor {key!r} is for module '{name}', which adapter_config.json does not list "
                f"(module_shapes); {_REFUSE}"
            )
        kind = "coords" if param in ("sparse_opd_bitmask", "sparse_opd_indices") else param
        if kind in found.setdefault(name, {}):
            raise ValueError(f"{source} module '{name}': holds both {found[name][kind][0]!r} and {key!r}; {_REFUSE}")
        found[name][kind] = (key, value)
    save_dtype = VALUE_DTYPES[config.save_dtype]
    for name in sorted(set(found) | set(config.module_nnz) | set(config.module_rank)):
        where = f"{source} module '{name}'"
        have = found.get(name, {})
        out_f, in_f = (int(x) for x in config.module_shapes[name])
        nnz, rank = int(config.module_nnz.get(name, 0)), int(config.module_rank.get(name, 0))
        need = ({"coords", "sparse_opd_values"} if nnz else set()) | (
            {"sparse_opd_coeff", "sparse_opd_basis"} if rank else set()
        )
        missing, extra = sorted(need - set(have)), sorted(set(have) - need)
        if missing:
            what = ", ".join("coordinates" if m == "coords" else m for m in missing)
            raise ValueError(f"{where}: no {what} although adapter_config.json gives it {nnz} coordinates and rank "
                             f"{rank}; the file is incomplete: re-save the adapter")  # fmt: skip
        if extra:
            raise ValueError(f"{where}: {have[extra[0]][0]!r} is not part of this module's adapter (adapter_config.json"
                             f" gives it {nnz} coordinates and rank {rank}); {_REFUSE}")  # fmt: skip
        if nnz:
            key, packed = have["coords"]
            kind = "bitmask" if key.endswith("sparse_opd_bitmask") else "indices"
            if kind == "indices" and packed.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"{where}: sparse_opd_indices must be int32 / int64, got {packed.dtype}; {_REFUSE}")
            idx = unpack_coordinates(kind, packed, out_f * in_f, where)
            if idx.numel() != nnz:
                raise ValueError(
                    f"{where}: {idx.numel()} coordinates but adapter_config.json says {nnz}; the file and its config "
                    "do not belong together (a file copied over another adapter's): re-save the adapter"
                )
            out[key.replace("sparse_opd_bitmask", "sparse_opd_indices")] = idx.to(index_dtype(out_f * in_f))
            key, values = have["sparse_opd_values"]
            _check_float(values, (nnz,), (save_dtype,), f"{where}: sparse_opd_values")
            out[key] = values
        if rank:
            key, coeff = have["sparse_opd_coeff"]
            _check_float(coeff, (out_f, rank), (save_dtype,), f"{where}: sparse_opd_coeff")
            out[key] = coeff
            key, basis = have["sparse_opd_basis"]
            _check_float(basis, (in_f, rank), tuple(VALUE_DTYPES.values()), f"{where}: sparse_opd_basis")
            out[key] = basis
    return out
