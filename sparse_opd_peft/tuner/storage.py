"""On-disk adapter files: tensor names, the check and decoding of a saved adapter's tensors, base-weight fingerprints,
and adapter file sizes (atomic / checked safetensors writes, reads and byte counts:
:mod:`sparse_opd_peft.safetensors_io`).

Adapter file format (``adapter_model.safetensors``, :data:`ADAPTER_FORMAT_VERSION`): per module with coordinates
``sparse_opd_values`` (nnz,) in ``save_dtype`` and one coordinate tensor in the smallest form of
:func:`sparse_opd_peft.positions.pack_coordinates`: ``sparse_opd_bitmask`` (``uint8`` bitmask), or ``sparse_opd_indices``: sorted
``int32`` / ``int64`` flat indices, or (version 2) a ``uint8`` coded stream (Elias-Fano or delta-varint, see
:mod:`sparse_opd_peft.positions`); per module with a subspace ``sparse_opd_coeff`` (out, r) and ``sparse_opd_basis`` (in, r).
Version-1 files (bitmask or int32 / int64 indices only) are valid version-2 files and load unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping

import torch

from ..positions import index_dtype, unpack_coordinates
from ..safetensors_io import safetensors_nbytes
from .peft_type import FORMAT_VERSION as ADAPTER_FORMAT_VERSION  # noqa: F401 - named with the format it versions

FINGERPRINT_SAMPLES = 4096


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


def _group_adapter_tensors(
    config, state_dict: Mapping[str, torch.Tensor], source: str, allowed: Collection[str]
) -> tuple[dict[str, dict[str, tuple[str, torch.Tensor]]], dict[str, torch.Tensor]]:
    """Sort a file's tensors by module: ``({module: {"coords" | param: (key, tensor)}}, {allowed key: tensor})``;
    foreign keys, tensors of unlisted modules and two tensors of one kind for a module are refused."""
    found: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    passed: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor; {_REFUSE}")
        if key in allowed:
            passed[key] = value
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
    return found, passed


def _decode_coordinates(key: str, packed: torch.Tensor, numel: int, nnz: int, where: str) -> torch.Tensor:
    """One module's stored coordinate tensor -> sorted flat indices (``int32``, ``int64`` when numel >= 2³¹), which
    must number ``nnz`` (the count adapter_config.json gives)."""
    if key.endswith("sparse_opd_bitmask"):
        kind = "bitmask"
    elif packed.dtype == torch.uint8:
        kind = "coded"
    elif packed.dtype in (torch.int32, torch.int64):
        kind = "indices"
    else:
        raise ValueError(
            f"{where}: sparse_opd_indices must be int32 / int64 (positions) or uint8 (a coded stream, format "
            f"version 2), got {packed.dtype}; {_REFUSE}"
        )
    idx = unpack_coordinates(kind, packed, numel, where)
    if idx.numel() != nnz:
        raise ValueError(
            f"{where}: {idx.numel()} coordinates but adapter_config.json says {nnz}; the file and its config "
            "do not belong together (a file copied over another adapter's): re-save the adapter"
        )
    return idx.to(index_dtype(numel))


def _decode_module(config, name: str, have: Mapping[str, tuple[str, torch.Tensor]], where: str) -> dict:
    """Check and decode one module's tensors against adapter_config.json (see :func:`decode_adapter_state`)."""
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
    save_dtype = VALUE_DTYPES[config.save_dtype]
    out = {}
    if nnz:
        key, packed = have["coords"]
        idx = _decode_coordinates(key, packed, out_f * in_f, nnz, where)
        out[key.replace("sparse_opd_bitmask", "sparse_opd_indices")] = idx
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


def decode_adapter_state(
    config, state_dict: Mapping[str, torch.Tensor], source: str, allowed: Collection[str] = ()
) -> dict[str, torch.Tensor]:
    """Check a saved adapter's tensors against its config and decode the packed coordinates.

    Every key must be ``base_model.model.<module>.<param>`` of a module in ``config.module_shapes``: per module with
    ``module_nnz`` n > 0 exactly one coordinate tensor (bitmask ``uint8``, sorted ``int32`` / ``int64`` indices or a
    ``uint8`` coded stream; n valid coordinates) and ``values`` (n,) in ``config.save_dtype``; per module with
    ``module_rank`` r > 0 ``coeff`` (out, r) in ``save_dtype`` and ``basis`` (in, r) float; all finite; nothing else,
    so a file holding base weights (``...base_layer.weight``, ``model.embed_tokens.weight``) or a module the config
    does not train is refused before anything is loaded. Format versions 1 and 2 (:data:`ADAPTER_FORMAT_VERSION`).

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
    found, out = _group_adapter_tensors(config, state_dict, source, allowed)
    for name in sorted(set(found) | set(config.module_nnz) | set(config.module_rank)):
        out.update(_decode_module(config, name, found.get(name, {}), f"{source} module '{name}'"))
    return out


# ---------------------------------------------------------------------------------------------- file sizes
def adapter_file_bytes(model, adapter_name: str = "default") -> int:
    """Size in bytes of the ``adapter_model.safetensors`` that ``model.save_pretrained`` writes for ``adapter_name``
    (packed coordinates, values in ``save_dtype``), without writing it."""
    from peft.utils import get_peft_model_state_dict

    return safetensors_nbytes(get_peft_model_state_dict(model, adapter_name=adapter_name), {"format": "pt"})
