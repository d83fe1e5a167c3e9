"""Turn a ``SparseOPDConfig`` (mask / subspace / exclude, or saved metadata) into a per-module injection plan,
validated against the model *before* any module is replaced, so that bad input leaves the model untouched."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..module_types import stats_by_type
from . import bnb
from .storage import fingerprint_mismatch, weight_fingerprint


@dataclass
class ModulePlan:
    """What one targeted module gets: coordinates (or a placeholder length) and a basis (or a placeholder rank)."""

    indices: torch.Tensor | None
    nnz: int
    basis: torch.Tensor | None
    rank: int


def load_subspace_arg(value) -> dict[str, torch.Tensor]:
    """Accept ``{module_name: (in, r) tensor}`` or a path to a safetensors file of such tensors."""
    if isinstance(value, (str, os.PathLike)):
        from ..masks.subspace import load_subspace  # checks the file format and orthonormal columns

        return load_subspace(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"subspace must be a dict {{module_name: (in, r) tensor}} or a path, got {type(value).__name__}")


def _matches(target_modules, name: str) -> bool:
    if target_modules is None:
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _base_linear(module: nn.Module) -> nn.Module:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or bnb.quantized_kind(module) is not None


def build_plan(config, model: nn.Module) -> tuple[dict[str, ModulePlan], dict]:
    """Validate ``config`` against ``model`` and return ``(plan, metadata)``; raises before any change and only
    reads ``config``.

    Two kinds of config, decided by its content:

    * inputs: ``mask`` (a mask, or ``ALL_COORDINATES`` for every coordinate of ``target_modules``) and / or
      ``subspace``: their modules, narrowed by ``target_modules`` / ``exclude_modules``; any metadata the config
      carries from an earlier use is ignored and derived afresh from ``model``;
    * no inputs, the metadata of a saved adapter (``module_nnz`` / ``module_rank``, as in ``adapter_config.json``):
      placeholders that the adapter file fills (the layers refuse to run until it has), after the base-model
      fingerprint check.

    Raises:
        ValueError / TypeError: unknown module, non-Linear module, wrong mask or basis shape, non-finite basis,
            empty mask, tied weights, fingerprint mismatch (each names the module and the fix).
    """
    from ..masks import SparseMask, exclude_coordinates  # lazy: masks imports tuner.storage
    from .config import AllCoordinates

    modules = dict(model.named_modules())
    loading = config.mask is None and config.subspace is None
    if loading and not config.has_metadata():
        raise ValueError(
            "SparseOPDConfig needs `mask=` (a SparseMask, {module_name: bool tensor} or a path) and/or `subspace=`, "
            "or `target_modules=` to train every coordinate of those Linear modules"
        )
    plan: dict[str, ModulePlan] = {}
    meta: dict = {}
    if loading:
        for name in sorted(set(config.module_nnz) | set(config.module_rank)):
            nnz, rank = int(config.module_nnz.get(name, 0)), int(config.module_rank.get(name, 0))
            plan[name] = ModulePlan(None, nnz, None, rank)
    else:
        if isinstance(config.mask, AllCoordinates):
            mask = _dense_mask(config, modules)
        else:
            mask = SparseMask.coerce(config.mask) if config.mask is not None else None
        if mask is not None and config.exclude is not None:
            mask = exclude_coordinates(mask, SparseMask.coerce(config.exclude))
        basis = load_subspace_arg(config.subspace) if config.subspace is not None else {}
        names = sorted(set(mask or {}) | set(basis))
        names = [n for n in names if _matches(config.target_modules, n) and not _excluded(config, n)]
        if not names:
            raise ValueError(
                f"no module left to adapt: the mask/subspace modules do not match target_modules={config.target_modules!r}"
            )
        for name in names:
            idx = mask.indices(name) if mask is not None and name in mask else None
            b = basis.get(name)
            plan[name] = ModulePlan(idx, 0 if idx is None else int(idx.numel()), b, 0 if b is None else int(b.shape[1]))
        meta["mask_metadata"] = dict(mask.metadata) if mask is not None else {}
        if isinstance(config.mask, (str, os.PathLike)):
            meta["mask_metadata"].setdefault("path", os.fspath(config.mask))
    _validate_against_model(plan, modules, None if loading else mask)
    _check_tied_weights(plan, model, modules)
    meta.update(_metadata(config, plan, modules, loading))
    return plan, meta


def _dense_mask(config, modules: dict[str, nn.Module]):
    """Every coordinate of the modules ``config.target_modules`` matches (outside existing adapter layers)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..masks import SparseMask

    inner = tuple(f"{n}." for n, m in modules.items() if n and isinstance(m, BaseTunerLayer))
    entries = {}
    for name, module in modules.items():
        if not name or name.startswith(inner) or not _matches(config.target_modules, name):
            continue
        base = _base_linear(module)
        if not _is_linear(base):
            raise ValueError(
                f"target_modules={config.target_modules!r} matches module '{name}', a {type(base).__name__}; "
                "SparseOPD adapts Linear layers only: narrow target_modules"
            )
        shape = (base.out_features, base.in_features)
        entries[name] = (shape, torch.arange(shape[0] * shape[1]))
    if not entries:
        raise ValueError(f"target_modules={config.target_modules!r} matches no module of the model")
    return SparseMask.from_indices(entries, {"rule": "all coordinates", "target_modules": config.target_modules})


def _check_tied_weights(plan: dict[str, ModulePlan], model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Refuse modules whose weight is shared with another module (e.g. ``lm_head`` tied to ``embed_tokens``): a
    merge writes into the shared tensor and would change the other module too."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for name in plan:
        weight = getattr(_base_linear(modules[name]), "weight", None)
        others = [
            o for o in owners.get(id(weight), []) if o.removesuffix(".weight") not in (name, f"{name}.base_layer")
        ]
        if others:
            other = others[0].removesuffix(".weight")
            raise ValueError(
                f"module '{name}' shares its weight with '{other}' (tied weights, tie_word_embeddings=True): merging "
                f"the adapter would also change '{other}'. Drop '{name}' from the mask / target_modules, or untie the "
                "weights first (load the model with tie_word_embeddings=False and give it its own copy of the weight)"
            )


def _excluded(config, name: str) -> bool:
    ex = config.exclude_modules
    if not ex:
        return False
    if isinstance(ex, str):
        return re.fullmatch(ex, name) is not None
    return any(name == e or name.endswith("." + e) for e in ex)


def _validate_against_model(plan: dict[str, ModulePlan], modules: dict[str, nn.Module], mask) -> None:
    for name, entry in plan.items():
        if name.endswith(".base_layer") or ".base_layer." in name:
            raise ValueError(
                f"module '{name}' names the inside of an existing adapter layer; use the module name without "
                "'.base_layer' (build masks from the unwrapped model's names)"
            )
        if name not in modules:
            close = [m for m in modules if m.endswith(name.split(".")[-1])][:3]
            hint = f" (modules with that suffix: {close})" if close else ""
            raise ValueError(
                f"module '{name}' from the mask/subspace is not in the model{hint}; mask names must be full module "
                "names as in model.named_modules(), relative to the model you pass to get_peft_model"
            )
        base = _base_linear(modules[name])
        if not _is_linear(base):
            raise ValueError(
                f"module '{name}' is a {type(base).__name__}, not a Linear layer; SparseOPD adapts torch.nn.Linear "
                "(and bitsandbytes Linear8bitLt / Linear4bit) only: remove it from the mask"
            )
        out_f, in_f = base.out_features, base.in_features
        if mask is not None and name in mask and mask.shape(name) != (out_f, in_f):
            raise ValueError(
                f"mask for module '{name}' has shape {mask.shape(name)} but the weight is {(out_f, in_f)}; "
                "build the mask from this model's checkpoints"
            )
        if entry.basis is not None:
            b = entry.basis
            if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.shape[0] != in_f or b.shape[1] < 1:
                shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
                raise ValueError(
                    f"subspace basis for module '{name}' must be (in_features={in_f}, r) with r >= 1, got {shape}"
                )
            if not b.dtype.is_floating_point or not torch.isfinite(b).all():
                raise ValueError(f"subspace basis for module '{name}' must be finite floats (got {b.dtype} / NaN/inf)")


def _metadata(config, plan: dict[str, ModulePlan], modules: dict[str, nn.Module], loading: bool) -> dict:
    shapes, fingerprints, warned = {}, {}, False
    for name in plan:
        base = _base_linear(modules[name])
        shapes[name] = [base.out_features, base.in_features]
        quantized = bnb.quantized_kind(base) is not None
        fp = weight_fingerprint(base.weight, full=config.fingerprint_full and not quantized)
        fp["shape"] = shapes[name]
        expected = config.fingerprint.get(name) if loading else None
        if expected and config.check_fingerprint:
            if quantized:
                expected = {"shape": expected.get("shape")}
                if not warned:
                    warnings.warn(
                        "quantized base: the adapter fingerprint is checked on weight shapes only", stacklevel=4
                    )
                    warned = True
            diff = fingerprint_mismatch(expected, fp)
            if diff:
                raise ValueError(
                    f"base model mismatch at module '{name}': {diff}. This adapter was trained on a different base; "
                    "load the matching base model, or pass check_fingerprint=False "
                    "(PeftModel.from_pretrained(..., config=...) / SparseOPDConfig) to load it anyway"
                )
        fingerprints[name] = config.fingerprint.get(name) if (loading and config.fingerprint.get(name)) else fp
    if loading:
        return {"module_shapes": shapes, "fingerprint": fingerprints}
    nnz = {n: p.nnz for n, p in plan.items() if p.nnz}
    rank = {n: p.rank for n, p in plan.items() if p.rank}
    return summarize_metadata(shapes, nnz, rank, fingerprints)


def summarize_metadata(
    shapes: dict[str, list[int]], nnz: dict[str, int], rank: dict[str, int], fingerprints: dict[str, dict]
) -> dict:
    """The metadata fields of a ``SparseOPDConfig`` from per-module weight shapes ``[out, in]``, coordinate counts,
    subspace ranks and fingerprints: those four plus ``density`` (overall, over the masked modules) and
    ``density_by_type`` (per module type)."""
    total = sum(shapes[n][0] * shapes[n][1] for n in nnz) or 1
    rows = {n: {"nnz": nnz[n], "numel": shapes[n][0] * shapes[n][1]} for n in nnz}
    by_type = {kind: agg["density"] for kind, agg in stats_by_type(rows).items() if agg["numel"]}
    return {
        "module_nnz": dict(sorted(nnz.items())),
        "module_rank": dict(sorted(rank.items())),
        "module_shapes": dict(sorted(shapes.items())),
        "fingerprint": dict(sorted(fingerprints.items())),
        "density": sum(nnz.values()) / total if nnz else None,
        "density_by_type": by_type,
    }
