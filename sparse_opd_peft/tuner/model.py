"""``SparseOPDModel``: the peft ``BaseTuner`` that injects sparse OPD adapters and packs them on save."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ..positions import pack_coordinates
from ..visibility import visibility_summary
from .config import CONFIG_FORMAT_VERSION
from .layer import Linear, SparseOPDLayer
from .plan import build_plan, summarize_metadata
from .storage import ADAPTER_PARAMS, VALUE_DTYPES

VISIBILITY_WARN_SHARE = 0.5


def _split_key(key: str) -> tuple[str, str, str]:
    """``"<module>.<param>[.<adapter>]"`` -> (module, param, rest) for our param names; ("", "", "") otherwise."""
    for param in ADAPTER_PARAMS:
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


def refresh_metadata(model: nn.Module, config, adapter_name: str) -> None:
    """Set ``config``'s ``module_nnz`` / ``module_rank`` / ``module_shapes`` / ``fingerprint`` / densities from the
    SparseOPD layers of ``model`` that hold ``adapter_name`` (no-op when there are none, e.g. a bare state dict)."""
    shapes, nnz, rank, fingerprints = {}, {}, {}, {}
    for layer in (m for m in model.modules() if isinstance(m, SparseOPDLayer)):
        fp = layer.sparse_opd_fingerprint.get(adapter_name)
        if fp is None:
            continue
        name = layer.module_name
        shapes[name], fingerprints[name] = [layer.out_features, layer.in_features], fp
        if adapter_name in layer.sparse_opd_indices:
            nnz[name] = int(layer.sparse_opd_indices[adapter_name].numel())
        if adapter_name in layer.sparse_opd_basis:
            rank[name] = int(layer.sparse_opd_basis[adapter_name].shape[1])
    if shapes:
        for key, value in summarize_metadata(shapes, nnz, rank, fingerprints).items():
            setattr(config, key, value)


class SparseOPDModel(BaseTuner):
    """peft tuner for :class:`~sparse_opd_peft.SparseOPDConfig` (use through ``peft.get_peft_model``)."""

    prefix: str = "sparse_opd_"
    tuner_layer_cls = SparseOPDLayer
    target_module_mapping: dict = {}

    # ------------------------------------------------------------------ injection
    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        """peft's ``inject_adapter``, with the plan (coordinates and bases per module) built and validated against
        ``model`` first, so bad input raises before any module is replaced. The config's inputs are only read; its
        metadata fields are (re)derived from ``model`` once the adapter is in place (see :func:`build_plan`)."""
        config = self.peft_config[adapter_name]
        plan, meta = build_plan(config, model)
        self._sparse_opd_plan = (plan, meta.get("fingerprint", {}))
        try:
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        finally:
            self._sparse_opd_plan = None
        for key, value in meta.items():
            setattr(config, key, value)

    def _prepare_adapter_config(self, peft_config, model_config: dict):
        return peft_config

    def _check_target_module_exists(self, peft_config, key: str) -> bool:
        planned = getattr(self, "_sparse_opd_plan", None)
        if planned is not None:
            return key in planned[0]
        return BaseTuner._check_target_module_exists(peft_config, key)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key):
        plan, fingerprints = getattr(self, "_sparse_opd_plan", None) or ({}, {})
        if current_key not in plan:
            raise ValueError(
                f"module '{current_key}' is not in the SparseOPD adapter '{adapter_name}' (its mask / subspace / "
                "module_nnz); a state_dict passed for injection must name the adapter's own modules only"
            )
        entry = plan[current_key]
        kwargs = {
            "indices": entry.indices,
            "nnz": entry.nnz,
            "basis": entry.basis,
            "rank": entry.rank,
            "init_weights": peft_config.init_weights,
            "inference_mode": peft_config.inference_mode,
            "grad_path": peft_config.grad_path,
            "block_bytes": peft_config.grad_block_bytes,
            "fingerprint": fingerprints.get(current_key),
        }
        if isinstance(target, SparseOPDLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        new_module = Linear(target, adapter_name, module_name=current_key, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str = "linear"
    ) -> None:
        """Add adapter ``adapter_name`` with ``ΔW = Σ_i weights[i] · ΔW_{adapters[i]}``, exactly.

        Per module, the new adapter's coordinates are the union of the adapters' coordinates (``values`` of float32,
        summed where coordinates are shared) and, where adapters have subspaces, its basis is theirs side by side
        (in, Σ r_i) with ``coeff`` (out, Σ r_i) = their coefficients scaled by the weights. Like peft's LoRA, the new
        adapter is added inactive; ``model.set_adapter(adapter_name)`` uses it.

        Raises:
            ValueError: unknown or non-SparseOPD adapters, a name in use, ``len(weights) != len(adapters)``,
                non-finite weights, a ``combination_type`` other than ``"linear"``, adapters with ``modules_to_save``.
        """
        from .combine import combine_adapters

        combine_adapters(self, list(adapters), list(weights), adapter_name, combination_type)

    # ------------------------------------------------------------------ save / load
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """Pack coordinates in the smallest form of :func:`.storage.pack_coordinates` (bitmask, int32 indices or a
        uint8 Elias-Fano / delta-varint stream) and cast values to ``config.save_dtype``.
        First the config's metadata is re-derived from this model's layers (:func:`refresh_metadata`), so the
        ``adapter_config.json`` written next describes this adapter even when its config object built others."""
        refresh_metadata(model, config, adapter_name)
        config.format_version = CONFIG_FORMAT_VERSION  # what is written now, also for an adapter loaded from format 1
        raw = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        save_dtype = VALUE_DTYPES[config.save_dtype]
        out = {}
        for key, value in raw.items():
            module, param, rest = _split_key(key)
            if is_dtensor(value):
                raise ValueError(
                    f"adapter '{adapter_name}' is sharded ({key} is an FSDP2 DTensor): save_pretrained cannot write "
                    "shards; call sparse_opd_peft.distributed.save_sharded_adapter(model, directory) on every rank"
                )
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
        """Check every tensor of the file (names, shapes, dtypes, finiteness, coordinates; no base weights) and
        decode the coordinates before peft maps the keys onto the model. On error the adapter this load injected is
        removed again, so the base model is left unwrapped (:func:`.files.undo_fresh_adapter`)."""
        from .files import check_loaded_state, undo_fresh_adapter

        try:
            decoded = check_loaded_state(model, config, adapter_name, state_dict)
        except (ValueError, TypeError):
            undo_fresh_adapter(model, adapter_name)
            raise
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, decoded)

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

    @contextmanager
    def _checked_merge(self, layers: dict[str, SparseOPDLayer], adapter_names: Optional[list[str]]) -> Iterator[None]:
        """Check every layer before any layer merges, then hand each layer what its check built for the merge that
        runs inside this context (peft's loop calling each layer's ``merge``).

        A merge that would write NaN / inf anywhere (NaN values, a float16 overflow) raises ``ValueError`` naming the
        module and the fix before any weight is touched, with or without ``safe_merge``. Each layer's check builds
        each adapter's ΔW once (:meth:`SparseOPDLayer._check_merge`); the layer's ``merge`` then writes without
        checking again. Nothing is held from the check pass to the writes: a sparse-only adapter's write reads its
        values (:meth:`SparseOPDLayer._coord_delta`), and no dense ΔW of any layer outlives its check, so an adapter
        with a subspace, or on a bitsandbytes base, is built once more for its write. Only the model-level path trusts a
        previous check: a layer merged outside this context (or asked for other adapters than were checked) checks
        itself, and so does every layer when two adapted layers share one base weight (a write could then change what
        another layer's check saw).
        """
        weights = [getattr(layer.get_base_layer(), "weight", None) for layer in layers.values()]
        ptrs = [w.data_ptr() for w in weights if isinstance(w, torch.Tensor) and w.device.type != "meta"]
        shared = len(ptrs) != len(set(ptrs))  # one base weight under two adapted layers: each write re-checks
        try:
            for layer in layers.values():
                names = adapter_names if adapter_names is not None else layer.active_adapters
                names = [n for n in names if n not in layer.merged_adapters]
                checked = layer._check_merge(names, keep_dense=False)
                layer._sparse_opd_checked_merge = None if shared else checked
            yield
        finally:
            for layer in layers.values():
                layer._sparse_opd_checked_merge = None

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """peft's ``merge_adapter`` plus a visibility / requantization report (warns when most of a delta is lost).
        Non-finite results are refused up front, with or without ``safe_merge`` (see :meth:`_checked_merge`)."""
        layers = self._sparse_layers()
        with self._checked_merge(layers, adapter_names):
            for layer in layers.values():
                layer.last_merge_report = {}
            super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
        self._report_merge(layers, adapter_names)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        layers = self._sparse_layers()
        with self._checked_merge(layers, adapter_names) if merge else nullcontext():
            for layer in layers.values():
                layer.last_merge_report = {}
            model = super()._unload_and_optionally_merge(
                merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
            )
        if merge:
            self._report_merge(layers, adapter_names)
        return model


def is_dtensor(value) -> bool:
    """Whether ``value`` is a ``torch.distributed.tensor.DTensor`` (a shard of an FSDP2 / tensor-parallel model)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)
