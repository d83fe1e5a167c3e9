"""``SparseOPDLayer`` and its ``Linear``: trainable values at fixed coordinates (+ an optional fixed subspace).

Per adapter ``a`` of a Linear with weight (out, in):

* ``sparse_opd_values[a]``  - trainable 1-D parameter (nnz,), float32 while training, zero-initialised;
* ``sparse_opd_indices[a]`` - persistent buffer of sorted flat indices (nnz,), int32 (int64 if out·in >= 2³¹);
* ``sparse_opd_coeff[a]``   - trainable (out, r), zero-initialised (only with a subspace);
* ``sparse_opd_basis[a]``   - persistent fixed buffer (in, r), float32 (only with a subspace).

``ΔW = scatter(values) + coeff @ basisᵀ``. Plain Linear bases compute ``x (W + ΔW)ᵀ + b`` through one custom
autograd function; bitsandbytes 8-bit / 4-bit bases compute ``base(x) + x ΔWᵀ``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..visibility import visible_update
from . import bnb
from .sparse_matmul import DeltaSpec, accumulate_dtype, dense_delta, sparse_delta_linear
from .storage import index_dtype


@dataclass
class _CheckedMerge:
    """What :meth:`SparseOPDLayer._check_merge` hands to the write: the adapters it checked (in merge order) and per
    adapter the dense (out, in) float32 ΔW it built and kept for the write (an adapter with a subspace, or any adapter
    on a bitsandbytes base), or None (a sparse-only adapter's write reads its values; any other builds ΔW again)."""

    names: tuple[str, ...]
    deltas: tuple[Optional[torch.Tensor], ...]


class SparseOPDLayer(BaseTunerLayer):
    """Adapter state shared by every layer type (see module docstring)."""

    adapter_layer_names = ("sparse_opd_values", "sparse_opd_coeff")
    other_param_names = (
        "sparse_opd_indices",
        "sparse_opd_basis",
        "sparse_opd_grad_path",
        "sparse_opd_block_bytes",
        "sparse_opd_fingerprint",
    )

    def __init__(self, base_layer: nn.Module, module_name: str = "", **kwargs) -> None:
        self.base_layer = base_layer
        self.module_name = module_name or type(base_layer).__name__
        # adapters created from metadata alone whose coordinates / basis the adapter file has not filled in yet
        self._sparse_opd_pending: set[str] = set()
        self._sparse_opd_hooks_checked = False
        self.sparse_opd_values = nn.ParameterDict({})
        self.sparse_opd_coeff = nn.ParameterDict({})
        self.sparse_opd_indices = BufferDict(persistent=True)
        self.sparse_opd_basis = BufferDict(persistent=True)
        self.sparse_opd_grad_path: dict[str, str] = {}
        self.sparse_opd_block_bytes: dict[str, int] = {}
        self.sparse_opd_fingerprint: dict[str, dict] = {}  # base-weight fingerprint recorded for each adapter
        self._merge_backup: dict[str, Any] = {}
        # set by SparseOPDModel for the length of one model-level merge (see SparseOPDModel._checked_merge)
        self._sparse_opd_checked_merge: Optional[_CheckedMerge] = None
        self.last_merge_report: dict[str, dict] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features
        if isinstance(self, nn.Module):
            self._register_load_state_dict_pre_hook(_mark_loaded, with_module=True)

    @property
    def numel(self) -> int:
        """Number of entries of the base weight (out * in)."""
        return self.out_features * self.in_features

    def update_layer(
        self,
        adapter_name: str,
        indices: Optional[torch.Tensor] = None,
        nnz: int = 0,
        basis: Optional[torch.Tensor] = None,
        rank: int = 0,
        init_weights: bool = True,
        inference_mode: bool = False,
        grad_path: str = "auto",
        block_bytes: int = 64 * 2**20,
        fingerprint: Optional[dict] = None,
    ) -> None:
        """Create adapter ``adapter_name``.

        Args:
            indices: validated sorted flat int64 indices (nnz,), or None to allocate a placeholder of length ``nnz``
                that ``load_state_dict`` fills (loading a saved adapter); until then the adapter refuses to run.
            nnz: number of coordinates when ``indices`` is None.
            basis: fixed (in, r) float basis, or None for a placeholder of rank ``rank`` (or no subspace if 0).
            init_weights: zeros (identity adapter) when True, small random values otherwise.
            grad_path / block_bytes: this adapter's backward settings (see :class:`SparseOPDConfig`).
            fingerprint: the base weight's fingerprint recorded for this adapter (saved in its metadata).
        """
        pending = False
        weight = self.get_base_layer().weight
        device = weight.device if weight.device.type != "meta" else torch.device("cpu")
        if indices is not None:
            nnz = int(indices.numel())
        if nnz:
            if indices is None:
                indices, pending = torch.zeros(nnz, dtype=torch.long), True
            self.sparse_opd_indices[adapter_name] = indices.to(device=device, dtype=index_dtype(self.numel))
            values = torch.zeros(nnz, dtype=torch.float32, device=device)
            if not init_weights:
                values.normal_(std=1e-2)
            self.sparse_opd_values[adapter_name] = nn.Parameter(values)
        if basis is not None:
            rank = int(basis.shape[1])
        if rank:
            if basis is None:
                basis, pending = torch.zeros(self.in_features, rank), True
            self.sparse_opd_basis[adapter_name] = basis.to(device=device, dtype=torch.float32).contiguous()
            coeff = torch.zeros(self.out_features, rank, dtype=torch.float32, device=device)
            if not init_weights:
                coeff.normal_(std=1e-2)
            self.sparse_opd_coeff[adapter_name] = nn.Parameter(coeff)
        self.sparse_opd_grad_path[adapter_name] = grad_path
        self.sparse_opd_block_bytes[adapter_name] = block_bytes
        self.sparse_opd_fingerprint[adapter_name] = dict(
            fingerprint or {"shape": [self.out_features, self.in_features]}
        )
        if pending:
            self._sparse_opd_pending.add(adapter_name)
        else:
            self._sparse_opd_pending.discard(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """Move this adapter's tensors to the base layer's device. Values / coeff follow peft's dtype rule (they are
        upcast to float32 afterwards by ``autocast_adapter_dtype``); indices and the basis never change dtype."""
        weight = self.get_base_layer().weight
        target = device or weight.device
        if target.type == "meta":
            return
        for container in (self.sparse_opd_indices, self.sparse_opd_basis):
            if adapter_name in container:
                container[adapter_name] = container[adapter_name].to(target)
        float_base = weight.dtype.is_floating_point
        for container in (self.sparse_opd_values, self.sparse_opd_coeff):
            if adapter_name in container:
                param = container[adapter_name]
                if param.device.type == "meta":  # low_cpu_mem_usage: load_state_dict(assign=True) fills it
                    continue
                dtype = weight.dtype if float_base else param.dtype
                container[adapter_name] = nn.Parameter(param.data.to(target, dtype=dtype), param.requires_grad)

    def _check_loaded(self, adapter_name: str) -> None:
        if adapter_name in self._sparse_opd_pending:
            raise ValueError(
                f"module '{self.module_name}': adapter '{adapter_name}' was built from adapter metadata alone "
                "(module_nnz / module_rank, as in adapter_config.json, with no mask) and its coordinates were never "
                "loaded; load it with PeftModel.from_pretrained(base, DIR) / model.load_adapter(DIR, adapter_name), "
                "or build it from a config that has mask= / subspace= / target_modules="
            )

    def _delta_parts(self, adapter_names: list[str]) -> tuple[tuple[DeltaSpec, ...], tuple[torch.Tensor, ...]]:
        specs, tensors = [], []
        for name in adapter_names:
            sparse, sub = name in self.sparse_opd_values, name in self.sparse_opd_coeff
            if not (sparse or sub):
                continue
            self._check_loaded(name)
            path = self.sparse_opd_grad_path.get(name, "auto")
            specs.append(DeltaSpec(sparse, sub, path, self.sparse_opd_block_bytes.get(name, 64 * 2**20)))
            if sparse:
                tensors += [self.sparse_opd_values[name], self.sparse_opd_indices[name]]
            if sub:
                tensors += [self.sparse_opd_coeff[name], self.sparse_opd_basis[name]]
        return tuple(specs), tuple(tensors)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense float32 ΔW (out, in) of one adapter (a temporary; the layer never stores it)."""
        specs, tensors = self._delta_parts([adapter_name])
        if not specs:
            raise KeyError(f"adapter '{adapter_name}' is not present in this layer")
        with torch.no_grad():
            return dense_delta((self.out_features, self.in_features), specs, tuple(t.detach() for t in tensors))

    def delta_visibility(self, adapter_name: str) -> dict:
        """bf16 visibility of one adapter's delta: ``{"coords": n, "visible": k}`` where a coordinate is visible iff
        ``bf16(w0 + δ) != bf16(w0)`` (bit patterns); coordinates are the mask's (all entries with a subspace)."""
        w0 = bnb.dequantize(self.get_base_layer()).reshape(-1)
        delta = self.get_delta_weight(adapter_name).reshape(-1)
        if adapter_name in self.sparse_opd_coeff:
            coords = torch.arange(w0.numel(), device=w0.device)
        else:
            coords = self.sparse_opd_indices[adapter_name].long()
        visible = visible_update(w0[coords], delta[coords])
        return {"coords": int(coords.numel()), "visible": int(visible.sum())}

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold adapters into the base weight: ``W <- dtype(float32(W) + ΔW)``, one rounding.

        The original entries at the touched coordinates (the whole weight with a subspace, or the quantized
        parameter for bitsandbytes bases) are kept so that :meth:`unmerge` is bit-exact.
        ``self.last_merge_report[adapter]`` records the bf16 visibility (float bases) or the share of the delta
        that survived requantization (bitsandbytes bases).

        Every merge is checked first, ``safe_merge`` or not (see :meth:`check_merge`): a non-finite result raises and
        writes nothing. Called directly, the layer checks itself and builds each adapter's ΔW once, for the check:
        a sparse-only adapter's write reads its values, the dense ΔW of at most one adapter with a subspace (or on a
        bitsandbytes base) is kept from the check to the write, and any other is built once more for the write. Within a model-level merge the model has checked every layer first
        (:meth:`SparseOPDModel._checked_merge`) and this layer writes what that check handed it, without checking
        again.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [n for n in adapter_names if n in self.sparse_opd_values or n in self.sparse_opd_coeff]
        checked, self._sparse_opd_checked_merge = getattr(self, "_sparse_opd_checked_merge", None), None
        if checked is None or checked.names != tuple(adapter_names):
            # always (safe_merge or not): a non-finite merge writes nothing
            checked = self._check_merge(adapter_names, keep_dense=True)
        self._write_merge(checked)

    def check_merge(self, adapter_names: list[str]) -> None:
        """Raise ``ValueError`` (naming the module, the adapter and the fix) if merging ``adapter_names`` in turn
        would write a non-finite weight entry that was finite before: NaN / inf adapter values, or a sum that
        overflows the weight's dtype (float16: |W + ΔW| > 65504). Nothing is modified."""
        self._check_merge(adapter_names, keep_dense=False)

    def _check_merge(self, adapter_names: list[str], keep_dense: bool) -> _CheckedMerge:
        """:meth:`check_merge`, building each adapter's ΔW once, and return the checked adapters with the ΔWs to keep
        for the write (:class:`_CheckedMerge`).

        The check follows the write: entries rounded after each adapter, or once for a group of sparse-only adapters
        (:meth:`_write_merge`), every intermediate state checked (unmerge passes through them). ``keep_dense``: keep
        the dense ΔW of the last adapter whose write needs one (a subspace, or a bitsandbytes base), so at most one
        dense ΔW outlives the check; a sparse-only adapter's write needs none (:meth:`_coord_delta`).
        """
        base = self.get_base_layer()
        quantized = bnb.quantized_kind(base) is not None
        work = bnb.dequantize(base) if quantized else base.weight.detach()
        names = [n for n in adapter_names if n in self.sparse_opd_values or n in self.sparse_opd_coeff]
        group = self._merges_as_group(names, quantized)
        dense = [quantized or n in self.sparse_opd_coeff for n in names]  # the write needs the dense ΔW
        keep_dense_at = max((i for i, d in enumerate(dense) if d), default=-1) if keep_dense else -1
        kept: list[Optional[torch.Tensor]] = []
        running = work.to(accumulate_dtype(work.dtype))
        for index, name in enumerate(names):
            delta = self.get_delta_weight(name)
            moved = delta.to(work.device)
            running = running + moved
            new = running if quantized else running.to(work.dtype)
            if not (quantized or group):
                running = new.to(running.dtype)  # rounded after each adapter, as that write does
            bad = ~torch.isfinite(new) & torch.isfinite(work)
            if bool(bad.any()):
                count = int(bad.sum())
                if not bool(torch.isfinite(moved).all()):
                    why = "the adapter's values are NaN / inf (training diverged); retrain or drop this adapter"
                else:
                    why = (
                        f"W + ΔW overflows {work.dtype} (largest finite value {torch.finfo(work.dtype).max:g}); "
                        "merge into a float32 copy of the base (model.float()) or keep the adapter unmerged"
                    )
                raise ValueError(
                    f"merging adapter '{name}' into module '{self.module_name}' would write {count} non-finite weight "
                    f"entr{'y' if count == 1 else 'ies'}: {why}. Nothing was merged; the weights are unchanged"
                )
            work = new
            kept.append(delta if index == keep_dense_at else None)
            del delta, moved, new, bad
        return _CheckedMerge(tuple(names), tuple(kept))

    def _merges_as_group(self, names: list[str], quantized: bool) -> bool:
        """Several sparse-only adapters merged together into a float base: one rounding (:meth:`_merge_sparse_group`)."""
        return not quantized and len(names) > 1 and not any(n in self.sparse_opd_coeff for n in names)

    def _coord_delta(self, name: str) -> torch.Tensor:
        """``ΔW.view(-1)[coords]`` (nnz,) float32 of a sparse-only adapter without building ΔW: its values in float32,
        ``+ 0`` as the dense scatter into zeros gives (``-0.0`` becomes ``0.0``)."""
        return self.sparse_opd_values[name].detach().to(torch.float32) + 0.0

    def _write_merge(self, checked: _CheckedMerge) -> None:
        """Write the adapters of a passed check in turn, with the ΔWs it kept (building the others again).

        Several sparse-only adapters merged together into a float base are written with one rounding,
        ``dtype(float32(W) + ΔW_1 + ΔW_2 ...)`` (:meth:`_merge_sparse_group`), exactly what the unmerged forward
        computes with them active; any other merge rounds after each adapter."""
        base = self.get_base_layer()
        quantized = bnb.quantized_kind(base) is not None
        if self._merges_as_group(list(checked.names), quantized):
            self._merge_sparse_group(base, checked)
            return
        for name, kept in zip(checked.names, checked.deltas, strict=True):
            if quantized:
                self._merge_quantized(name, base, kept if kept is not None else self.get_delta_weight(name))
            else:
                self._merge_dense(name, base, kept)
            self.merged_adapters.append(name)

    def delete_adapter(self, adapter_name: str) -> None:
        """peft's ``delete_adapter`` plus this layer's own per-adapter records (merge report, pending loads)."""
        super().delete_adapter(adapter_name)
        self.last_merge_report.pop(adapter_name, None)
        self._sparse_opd_pending.discard(adapter_name)

    def _merge_dense(self, name: str, base: nn.Module, kept: Optional[torch.Tensor]) -> None:
        """``kept``: the check's dense ΔW of an adapter with a subspace, or None (built again; a sparse-only adapter
        reads its values, :meth:`_coord_delta`)."""
        weight = base.weight
        flat = weight.data.view(-1)
        if name in self.sparse_opd_coeff:
            coords = None
            backup = weight.data.clone()
            d = (kept if kept is not None else self.get_delta_weight(name)).view(-1)
        else:
            coords = self.sparse_opd_indices[name].long()
            backup = flat[coords].clone()
            d = self._coord_delta(name)
        old = backup.reshape(-1).to(torch.float32)
        new = (old + d).to(weight.dtype)
        visible = visible_update(old, d)
        if coords is None:
            weight.data.copy_(new.view_as(weight))
        else:
            flat[coords] = new
        self._merge_backup[name] = (coords, backup)
        self.last_merge_report[name] = {"coords": int(visible.numel()), "visible": int(visible.sum())}

    def _merge_sparse_group(self, base: nn.Module, checked: _CheckedMerge) -> None:
        """Merge several sparse-only adapters with one rounding per entry: the sum (float32, float64 for a float64
        base: the forward's accumulation dtype) runs over the adapters in order (as the forward's patched entries
        do) and is rounded once. Each adapter's backup holds the entries at
        its coordinates as a merge of the adapters before it alone would have left them (``dtype(float32(W) +
        ΔW_1 + ... + ΔW_{i-1})``), so :meth:`unmerge`, which restores the backups in reverse order, passes through
        those states and ends at the original weight bit for bit."""
        weight = base.weight
        flat = weight.data.view(-1)
        coords = {n: self.sparse_opd_indices[n].long() for n in checked.names}
        union, inverse = torch.unique(torch.cat(list(coords.values())), return_inverse=True)
        running = flat[union].to(accumulate_dtype(weight.dtype))  # W at the union, then + ΔW_i in turn
        start = 0
        for name in checked.names:
            idx = coords[name]
            d = self._coord_delta(name)
            where = inverse[start : start + idx.numel()]
            start += idx.numel()
            backup = running[where].to(weight.dtype)  # the state before this adapter, rounded once
            old = backup.to(torch.float32)
            visible = visible_update(old, d)
            running.index_add_(0, where, d.to(running.dtype))
            self._merge_backup[name] = (idx, backup)
            self.last_merge_report[name] = {"coords": int(visible.numel()), "visible": int(visible.sum())}
            self.merged_adapters.append(name)
        flat[union] = running.to(weight.dtype)

    def _merge_quantized(self, name: str, base: nn.Module, delta: torch.Tensor) -> None:
        before = bnb.dequantize(base)
        backup = bnb.requantize(base, before + delta.to(before.device))
        realized = bnb.dequantize(base) - before
        d = delta.to(realized.device)
        energy = float((realized * d).sum() / (d * d).sum().clamp_min(1e-30))
        if name in self.sparse_opd_coeff:
            changed, coords = realized.ne(0), self.numel
        else:
            idx = self.sparse_opd_indices[name].long()
            changed, coords = realized.view(-1)[idx].ne(0), int(idx.numel())
        self._merge_backup[name] = ("quantized", backup)
        self.last_merge_report[name] = {
            "coords": coords,
            "changed": int(changed.sum()),
            "survived_energy_share": energy,
            "relative_error": float((realized - d).norm() / d.norm().clamp_min(1e-30)),
        }

    def unmerge(self) -> None:
        """Undo merges in reverse order, restoring the saved original entries bit-exactly."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            coords, backup = self._merge_backup.pop(name)
            if isinstance(coords, str):
                bnb.restore(base, backup)
            elif coords is None:
                base.weight.data.copy_(backup)
            else:
                base.weight.data.view(-1)[coords] = backup


def _mark_loaded(module: SparseOPDLayer, state_dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook: an adapter whose coordinates (and basis) are in ``state_dict`` is loaded."""
    for name in list(module._sparse_opd_pending):
        has_idx = name not in module.sparse_opd_values or f"{prefix}sparse_opd_indices.{name}" in state_dict
        has_basis = name not in module.sparse_opd_coeff or f"{prefix}sparse_opd_basis.{name}" in state_dict
        if has_idx and has_basis:
            module._sparse_opd_pending.discard(name)


def _warn_about_base_layer_hooks(layer: SparseOPDLayer) -> None:
    """Warn (once per layer) that hooks on a plain Linear base layer do not run: the adapter computes
    ``x (W + ΔW)ᵀ + b`` from the base layer's weight without calling it (as peft's SHiRA does)."""
    base = layer.get_base_layer()
    if any((base._forward_hooks, base._forward_pre_hooks, base._backward_hooks, base._backward_pre_hooks)):
        warnings.warn(
            f"module '{layer.module_name}': its base layer has forward / backward (pre) hooks, which the SparseOPD "
            "adapter does not run (it computes x (W + ΔW)ᵀ + b from the base weight without calling the base layer); "
            "register the hooks on the adapted module instead (the same path, after get_peft_model)",
            stacklevel=3,
        )


class Linear(nn.Module, SparseOPDLayer):
    """Sparse OPD adapter around ``torch.nn.Linear`` or a bitsandbytes ``Linear8bitLt`` / ``Linear4bit``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, module_name: str = "", **kwargs) -> None:
        super().__init__()
        SparseOPDLayer.__init__(self, base_layer, module_name=module_name)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x: (..., in) -> (..., out); the base layer's output plus every active adapter's ``x ΔWᵀ``."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        specs, tensors = self._delta_parts(list(self.active_adapters))
        if not specs:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        shape = (self.out_features, self.in_features)
        if bnb.quantized_kind(base) is not None:  # the base layer runs (its hooks too); the delta is added
            result = self.base_layer(x, *args, **kwargs)
            delta_in = x.to(result.dtype) if x.dtype != result.dtype else x
            return result + sparse_delta_linear(delta_in, None, None, specs, tensors, shape)
        if not self._sparse_opd_hooks_checked:
            self._sparse_opd_hooks_checked = True
            _warn_about_base_layer_hooks(self)
        return sparse_delta_linear(x, base.weight, base.bias, specs, tensors, shape)

    def __repr__(self) -> str:
        return "sparse_opd." + super().__repr__()
