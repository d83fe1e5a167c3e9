"""``SparseOPDModel.add_weighted_adapter``: a weighted sum of SparseOPD adapters as one new adapter, exactly."""

from __future__ import annotations

import math

import torch

from .config import SparseOPDConfig
from .layer import SparseOPDLayer


def _check(tuner, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str) -> None:
    if combination_type != "linear":
        raise ValueError(
            f"add_weighted_adapter: combination_type={combination_type!r} is not supported by SparseOPD; use "
            "'linear' (ΔW = Σ weights[i] ΔW_i, exact on the union of the adapters' coordinates)"
        )
    if not adapters:
        raise ValueError("add_weighted_adapter: pass at least one adapter name in `adapters`")
    if len(weights) != len(adapters):
        raise ValueError(f"add_weighted_adapter: {len(adapters)} adapters but {len(weights)} weights; pass one each")
    if any(not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) for w in weights):
        raise ValueError(f"add_weighted_adapter: weights must be finite numbers, got {weights!r}")
    if adapter_name in tuner.peft_config:
        raise ValueError(f"add_weighted_adapter: adapter '{adapter_name}' already exists; choose a new name")
    for name in adapters:
        config = tuner.peft_config.get(name)
        if config is None:
            raise ValueError(f"add_weighted_adapter: no adapter named '{name}' (have {sorted(tuner.peft_config)})")
        if not isinstance(config, SparseOPDConfig):
            raise ValueError(f"add_weighted_adapter: adapter '{name}' is a {config.peft_type} adapter, not SparseOPD")
        if config.modules_to_save:
            raise ValueError(
                f"add_weighted_adapter: adapter '{name}' has modules_to_save={config.modules_to_save}, which cannot "
                "be summed (they are full copies of modules); combine adapters without modules_to_save"
            )


def combine_adapters(tuner, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str):
    """See :meth:`SparseOPDModel.add_weighted_adapter`. Builds the union mask / side-by-side bases, injects them
    as a new adapter through the usual path (so it is validated, fingerprinted and saved like any other) and
    fills ``values`` (nnz,) and ``coeff`` (out, Σ r) in float32."""
    from ..masks import SparseMask

    _check(tuner, adapters, weights, adapter_name, combination_type)
    layers = {n: m for n, m in tuner.model.named_modules() if isinstance(m, SparseOPDLayer)}
    entries, bases, parts = {}, {}, {}
    for name, layer in layers.items():
        present = [
            (a, w)
            for a, w in zip(adapters, weights, strict=True)
            if a in layer.sparse_opd_values or a in layer.sparse_opd_coeff
        ]
        for a, _ in present:
            layer._check_loaded(a)
        sparse = [(a, w) for a, w in present if a in layer.sparse_opd_values]
        sub = [(a, w) for a, w in present if a in layer.sparse_opd_coeff]
        if sparse:
            union = torch.unique(torch.cat([layer.sparse_opd_indices[a].long().cpu() for a, _ in sparse]))
            entries[name] = ((layer.out_features, layer.in_features), union)
        if sub:
            bases[name] = torch.cat([layer.sparse_opd_basis[a].float().cpu() for a, _ in sub], dim=1)
        if present:
            parts[name] = (sparse, sub)
    if not parts:
        raise ValueError(f"add_weighted_adapter: the adapters {adapters} adapt no module")
    first = tuner.peft_config[adapters[0]]
    provenance = {"combined_from": list(adapters), "weights": [float(w) for w in weights], "combination": "linear"}
    config = SparseOPDConfig(
        mask=SparseMask.from_indices(entries, provenance) if entries else None,
        subspace=bases or None,
        save_dtype=first.save_dtype,
        check_fingerprint=first.check_fingerprint,
        fingerprint_full=first.fingerprint_full,
        grad_path=first.grad_path,
        grad_block_bytes=first.grad_block_bytes,
        base_model_name_or_path=first.base_model_name_or_path,
        task_type=first.task_type,
        inference_mode=first.inference_mode,
    )
    tuner.peft_config[adapter_name] = config
    try:
        tuner.inject_adapter(tuner.model, adapter_name)
    except BaseException:
        tuner.peft_config.pop(adapter_name, None)
        raise
    if not entries:
        tuner.peft_config[adapter_name].mask_metadata = provenance
    with torch.no_grad():
        for name, (sparse, sub) in parts.items():
            layer = layers[name]
            if sparse:
                target = layer.sparse_opd_values[adapter_name]
                union = layer.sparse_opd_indices[adapter_name].long()
                total = torch.zeros(union.numel(), dtype=torch.float32, device=union.device)
                for a, w in sparse:
                    pos = torch.searchsorted(union, layer.sparse_opd_indices[a].long().to(union.device))
                    total.index_add_(0, pos, float(w) * layer.sparse_opd_values[a].detach().float().to(union.device))
                target.copy_(total.to(target.dtype))
            if sub:
                target = layer.sparse_opd_coeff[adapter_name]
                coeff = torch.cat([float(w) * layer.sparse_opd_coeff[a].detach().float() for a, w in sub], dim=1)
                target.copy_(coeff.to(device=target.device, dtype=target.dtype))
