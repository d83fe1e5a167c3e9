"""``SparseOPDModel``: the peft ``BaseTuner`` that injects sparse OPD adapters and packs them on save."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ..visibility import visibility_summary
from .config import RUNTIME_ONLY_FIELDS
from .layer import Linear, SparseOPDLayer
from .plan import build_plan
from .storage import pack_coordinates, unpack_coordinates

_SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_KEYS = ("sparse_opd_values", "sparse_opd_indices", "sparse_opd_bitmask", "sparse_opd_coeff", "sparse_opd_basis")
VISIBILITY_WARN_SHARE = 0.5


def _split_key(key: str) -> tuple[str, str, str]:
    """``"<module>.<param>[.<adapter>]"`` -> (module, param, rest) for our param names; ("", "", "") otherwise."""
    for param in _KEYS:
        marker = f".{param}"
        if marker in key:
            module, _, rest = key.partition(marker)
            return module, param, rest
    return "", "", ""


def _module_name(prefixed: str) -> str:
    return prefixed.removeprefix("base_model.model.")


def bf16_visibility(model: nn.Module, adapter_name: Optional[str] = None) -> dict:
    """Share of adapter coordinates whose delta survives a bf16 merge, per module and overall.

    Args:
        model: any model containing sparse OPD layers (a ``PeftModel`` or the tuner's model).
        adapter_name: adapter to report (default: the first active adapter of each layer).

    Returns:
        ``{"coords", "visible", "share", "modules": {module_name: {"coords", "visible", "share"}}}`` where a
        coordinate is visible iff ``bf16(w0 + δ) != bf16(w0)`` as bit patterns.
    """
    rows = {}
    for name, module in model.named_modules():
        if isinstance(module, SparseOPDLayer):
            adapter = adapter_name or module.active_adapters[0]
            if adapter in module.sparse_opd_values or adapter in module.sparse_opd_coeff:
                rows[_module_name(name)] = module.delta_visibility(adapter)
    return visibility_summary(rows)


class SparseOPDModel(BaseTuner):
    """peft tuner for :class:`~sparse_opd_peft.SparseOPDConfig` (use through ``peft.get_peft_model``)."""

    prefix: str = "sparse_opd_"
    tuner_layer_cls = SparseOPDLayer
    target_module_mapping: dict = {}

    # ------------------------------------------------------------------ injection
    def _prepare_adapter_config(self, peft_config, model_config: dict):
        return peft_config

    def _prepare_model(self, peft_config, model: nn.Module) -> None:
        """Validate mask / subspace / fingerprint against ``model``; only then record metadata on the config."""
        plan, meta = build_plan(peft_config, model)
        for key, value in meta.items():
            setattr(peft_config, key, value)
        peft_config.target_modules = sorted(plan)
        for field_name in RUNTIME_ONLY_FIELDS:
            setattr(peft_config, field_name, None)
        peft_config._sparse_opd_plan = plan

    @staticmethod
    def _check_target_module_exists(peft_config, key: str) -> bool:
        plan = getattr(peft_config, "_sparse_opd_plan", None)
        if plan is not None:
            return key in plan
        return BaseTuner._check_target_module_exists(peft_config, key)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key):
        entry = peft_config._sparse_opd_plan[current_key]
        kwargs = {
            "indices": entry.indices,
            "nnz": entry.nnz,
            "basis": entry.basis,
            "rank": entry.rank,
            "init_weights": peft_config.init_weights,
            "inference_mode": peft_config.inference_mode,
            "grad_path": peft_config.grad_path,
            "block_bytes": peft_config.grad_block_bytes,
        }
        if isinstance(target, SparseOPDLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        new_module = Linear(target, adapter_name, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _post_injection_hook(self, model: nn.Module, config, adapter_name: str) -> None:
        config.__dict__.pop("_sparse_opd_plan", None)  # free the indices held by the plan

    # ------------------------------------------------------------------ save / load
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """Pack coordinates (bitmask when density >= 1/32, else int32) and cast values to ``config.save_dtype``."""
        raw = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        save_dtype = _SAVE_DTYPES[config.save_dtype]
        out = {}
        for key, value in raw.items():
            module, param, rest = _split_key(key)
            if param in ("sparse_opd_values", "sparse_opd_coeff"):
                out[key] = value.detach().to(save_dtype)
            elif param == "sparse_opd_indices":
                out_f, in_f = config.module_shapes[_module_name(module)]
                kind, packed = pack_coordinates(value.detach(), out_f * in_f)
                out[f"{module}.sparse_opd_{'bitmask' if kind == 'bitmask' else 'indices'}{rest}"] = packed
            else:
                out[key] = value
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Unpack and validate coordinates before peft maps the keys onto the model."""
        return super()._remap_adapter_state_dict_for_load(
            model, config, adapter_name, unpack_state_dict(config, state_dict)
        )

    # ------------------------------------------------------------------ reports and merging
    def bf16_visibility(self, adapter_name: Optional[str] = None) -> dict:
        """See :func:`bf16_visibility`."""
        return bf16_visibility(self.model, adapter_name)

    def _sparse_layers(self) -> dict[str, SparseOPDLayer]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, SparseOPDLayer)}

    def _report_merge(self, layers: dict[str, SparseOPDLayer], adapter_names: Optional[list[str]]) -> dict:
        report = {}
        for name, layer in layers.items():
            for adapter, row in layer.last_merge_report.items():
                if adapter_names is None or adapter in adapter_names:
                    report.setdefault(adapter, {})[name] = row
        low = []
        for adapter, rows in report.items():
            for name, row in rows.items():
                share = row.get("survived_energy_share", row.get("visible", 0) / max(row["coords"], 1))
                row["share"] = share
                if share < VISIBILITY_WARN_SHARE:
                    low.append(f"{name} ({adapter}): {share:.1%}")
        if low:
            shown = ", ".join(low[:8]) + (f" and {len(low) - 8} more" if len(low) > 8 else "")
            warnings.warn(
                f"merging lost most of the adapter delta in {len(low)} module(s): {shown}. The merged weights' dtype "
                "cannot represent these updates (bf16 rounding or requantization); keep the adapter unmerged or "
                "merge into a float32 copy of the base",
                stacklevel=3,
            )
        self.last_merge_report = report
        return report

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """peft's ``merge_adapter`` plus a visibility / requantization report (warns when most of a delta is lost)."""
        layers = self._sparse_layers()
        for layer in layers.values():
            layer.last_merge_report = {}
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
        self._report_merge(layers, adapter_names)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        layers = self._sparse_layers()
        for layer in layers.values():
            layer.last_merge_report = {}
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        if merge:
            self._report_merge(layers, adapter_names)
        return model


def unpack_state_dict(config, state_dict: dict[str, torch.Tensor], source: str = "adapter_model.safetensors") -> dict:
    """Decode a saved adapter state dict: bitmask / int32 coordinates -> validated ``sparse_opd_indices`` tensors.

    Checks, per module of ``config.module_nnz``: coordinates present, in range, sorted, unique, count == nnz, and
    ``values`` of length nnz. Raises ``ValueError`` naming ``source`` and the module.
    """
    out, seen = {}, set()
    values_len = {}
    for key, value in state_dict.items():
        module, param, rest = _split_key(key)
        if param in ("sparse_opd_bitmask", "sparse_opd_indices"):
            name = _module_name(module)
            if name not in config.module_shapes:
                raise ValueError(f"{source}: coordinates for module '{name}', which the adapter config does not list")
            out_f, in_f = config.module_shapes[name]
            kind = "bitmask" if param == "sparse_opd_bitmask" else "indices"
            idx = unpack_coordinates(kind, value, out_f * in_f, f"{source} module '{name}'")
            expected = int(config.module_nnz.get(name, -1))
            if idx.numel() != expected:
                raise ValueError(
                    f"{source} module '{name}': {idx.numel()} coordinates but adapter_config.json says {expected}; "
                    "the file and its config do not belong together"
                )
            out[f"{module}.sparse_opd_indices{rest}"] = idx.to(torch.int32 if out_f * in_f < 2**31 else torch.int64)
            seen.add(name)
        else:
            if param == "sparse_opd_values":
                values_len[_module_name(module)] = int(value.numel())
            out[key] = value
    for name, nnz in config.module_nnz.items():
        if name not in seen:
            raise ValueError(
                f"{source}: no coordinates for module '{name}'; the file is incomplete, re-save the adapter"
            )
        if values_len.get(name) != nnz:
            raise ValueError(
                f"{source} module '{name}': values has length {values_len.get(name)} but the mask has {nnz} coordinates"
            )
    return out
