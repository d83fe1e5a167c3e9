"""Continual post-training helpers: run a stage with a method, measure churn and mask overlap between stages.

A *stage* trains the current model on one task with OPD (:func:`sparse_opd_peft.toy.opd_run`), with one of
three methods:

* ``"full"``: every parameter of the (merged) current model;
* ``"lora"``: peft LoRA on the given target Linear modules;
* ``"sparse"``: our :class:`~sparse_opd_peft.SparseOPDConfig` adapter on a mask, optionally with ``exclude``
  (the churn budget: coordinates an earlier stage trained).

Adapters of successive stages are either kept as separate named peft adapters (``mode="separate"``: all stages
active, earlier ones frozen; the effective weight is ``W0 + Σ ΔW_stage``) or merged in turn
(``mode="merged"``: each stage is merged with ``merge_and_unload`` before the next one is added, so a later
adapter's base is the previous stages' merged model).

Metrics: :func:`bf16_churn` (share of weight entries whose bfloat16 value differs from a reference model's),
:func:`changed_coordinates` (those entries as a mask), :func:`mask_overlap` (IoU and overlap shares of two masks
with the expectation for independent uniform random masks of the same per-module sizes) and
:func:`budgeted_topk_mask` (top-k ``|ΔW|`` of a probe run, with at most a given share of an earlier mask reused).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from .diagnostics.sources import is_block_linear, module_name
from .masks import SparseMask
from .visibility import bf16_bits

__all__ = [
    "METHODS",
    "MODES",
    "StageOutput",
    "adapter_names",
    "bf16_churn",
    "block_linear_names",
    "budgeted_topk_mask",
    "changed_coordinates",
    "dir_bytes",
    "lora_rank_for",
    "mask_overlap",
    "merged_copy",
    "probe_mask",
    "run_stage",
    "weight_tensors",
]

METHODS = ("full", "lora", "sparse")
MODES = ("separate", "merged")

MaskLike = Union[SparseMask, Mapping[str, torch.Tensor]]
WeightsLike = Union[nn.Module, Mapping[str, torch.Tensor]]


def _is_peft(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merged_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every active peft adapter merged in (``merge_and_unload``), in eval mode and
    with all parameters trainable; a plain model is just copied. ``model`` itself is not changed."""
    out = copy.deepcopy(model)
    if _is_peft(out):
        out = out.merge_and_unload()
    out.requires_grad_(True)
    return out.eval()


def block_linear_names(model: nn.Module) -> list[str]:
    """Module names of the Linear layers inside numbered transformer blocks (the mask builders' default
    selection: no embeddings, norms or ``lm_head``), as in the unwrapped model's ``named_modules()``.
    A peft model is read through a merged copy."""
    if _is_peft(model):
        model = merged_copy(model)
    return [module_name(n) for n, p in model.named_parameters() if is_block_linear(n, p.shape)]


def weight_tensors(
    model: WeightsLike, which: Literal["block_linear", "all"] = "block_linear"
) -> dict[str, torch.Tensor]:
    """Effective weights of ``model`` (peft adapters merged into a copy), detached, on CPU.

    Args:
        model: an ``nn.Module`` (plain or ``PeftModel``) or an already extracted ``{name: tensor}`` dict (returned
            as is).
        which: ``"block_linear"``: ``{module_name: (out, in) weight}`` of the blocks' Linear layers;
            ``"all"``: ``{parameter name: tensor}`` of every floating-point parameter.
    """
    if isinstance(model, Mapping):
        return dict(model)
    if which not in ("block_linear", "all"):
        raise ValueError(f"which must be 'block_linear' or 'all', got {which!r}")
    plain = merged_copy(model) if _is_peft(model) else model
    out = {}
    for name, p in plain.named_parameters():
        if not p.dtype.is_floating_point:
            continue
        if which == "all":
            out[name] = p.detach().cpu()
        elif is_block_linear(name, p.shape):
            out[module_name(name)] = p.detach().cpu()
    return out


def _bf16_changed(reference: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    if reference.shape != tensor.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(tensor.shape)}")
    return bf16_bits(reference.float()) != bf16_bits(tensor.float())


def bf16_churn(
    reference: WeightsLike, model: WeightsLike, which: Literal["block_linear", "all"] = "block_linear"
) -> dict[str, Any]:
    """Share of weight entries whose bfloat16 value differs between ``reference`` and ``model``.

    An entry counts as changed iff ``bf16(w_model) != bf16(w_reference)`` as bit patterns (both rounded to
    nearest-even from their own dtype), i.e. the change would survive storing both models in bf16.

    Args:
        reference: the anchor (``nn.Module`` or ``{name: tensor}``); model: the trained model (plain or peft;
            adapters are merged into a float32 copy first).
        which: ``"block_linear"`` (the Linear weights the adapters target) or ``"all"`` parameters; names
            present in only one of the two are ignored.

    Returns:
        ``{"changed": int, "total": int, "share": changed / total, "modules": {name: {"changed", "total",
        "share"}}}``.
    """
    ref, new = weight_tensors(reference, which), weight_tensors(model, which)
    rows = {}
    for name, w0 in ref.items():
        if name not in new:
            continue
        changed = int(_bf16_changed(w0, new[name]).sum())
        rows[name] = {"changed": changed, "total": w0.numel(), "share": changed / max(w0.numel(), 1)}
    changed = sum(r["changed"] for r in rows.values())
    total = sum(r["total"] for r in rows.values())
    return {"changed": changed, "total": total, "share": changed / total if total else 0.0, "modules": rows}


def changed_coordinates(reference: WeightsLike, model: WeightsLike) -> Optional[SparseMask]:
    """The block-Linear entries whose bf16 value differs between ``reference`` and ``model``, as a
    :class:`SparseMask` (modules without a change are left out); ``None`` when nothing changed."""
    ref, new = weight_tensors(reference), weight_tensors(model)
    masks = {}
    for name, w0 in ref.items():
        if name in new and w0.dim() == 2:
            m = _bf16_changed(w0, new[name])
            if m.any():
                masks[name] = m
    return SparseMask(masks, {"rule": "bf16_changed"}) if masks else None


def _as_mask(mask: MaskLike) -> SparseMask:
    return mask if isinstance(mask, SparseMask) else SparseMask(mask)


def mask_overlap(a: MaskLike, b: MaskLike) -> dict[str, float]:
    """Overlap of two masks over the union of their modules, with the random expectation.

    The expectation is that of independent uniform random masks with the same number of coordinates in every
    module: ``E|A∩B| = Σ_m nnz_A(m)·nnz_B(m) / numel(m)`` (modules present in one mask only contribute 0);
    the expected IoU is reported as ``E|A∩B| / (|A| + |B| − E|A∩B|)`` (ratio of expectations, exact in the
    large-mask limit).

    Returns:
        ``{"nnz_a", "nnz_b", "intersection", "iou", "share_of_a" (= |A∩B|/|A|), "share_of_b" (= |A∩B|/|B|),
        "random_intersection", "random_iou", "random_share_of_a", "random_share_of_b"}``.
    """
    a, b = _as_mask(a), _as_mask(b)
    inter = exp_inter = 0.0
    for name in a:
        if name in b:
            if a.shape(name) != b.shape(name):
                raise ValueError(f"module '{name}': shapes differ ({a.shape(name)} vs {b.shape(name)})")
            inter += float(torch.isin(a.indices(name), b.indices(name)).sum())
            exp_inter += a.nnz(name) * b.nnz(name) / a.numel(name)
    na, nb = a.nnz(), b.nnz()

    def ratio(x: float, y: float) -> float:
        return x / y if y else 0.0

    return {
        "nnz_a": na,
        "nnz_b": nb,
        "intersection": int(inter),
        "iou": ratio(inter, na + nb - inter),
        "share_of_a": ratio(inter, na),
        "share_of_b": ratio(inter, nb),
        "random_intersection": exp_inter,
        "random_iou": ratio(exp_inter, na + nb - exp_inter),
        "random_share_of_a": ratio(exp_inter, na),
        "random_share_of_b": ratio(exp_inter, nb),
    }


def budgeted_topk_mask(
    source: WeightsLike,
    tuned: WeightsLike,
    density: float,
    previous: Optional[MaskLike] = None,
    reuse_share: Optional[float] = None,
) -> SparseMask:
    """Top-k ``|ΔW|`` mask (global over the block Linears) with a churn budget against an earlier mask.

    ``k = round(density · numel)`` coordinates are chosen; at most ``floor(reuse_share · |previous|)`` of them may
    be coordinates of ``previous`` (``reuse_share=0``: disjoint from it). The result is the exact maximiser of
    ``Σ|ΔW|`` under that constraint: the unconstrained top-k when it reuses few enough earlier coordinates,
    otherwise the top ``allowed`` earlier coordinates plus the top ``k − allowed`` others. Ties at the threshold are
    broken by ``torch.topk``. All |ΔW| are held in memory at once (fine for the toy world; for large models use
    :func:`~sparse_opd_peft.mask_builders.mask_from_checkpoints` and ``SparseOPDConfig(exclude=...)``).

    Args:
        source, tuned: models (plain or peft, merged first) or ``{module_name: weight}`` dicts.
        density: share of the block-Linear entries in (0, 1].
        previous: the earlier stage's mask (None: no budget). reuse_share: in [0, 1]; None: no budget.

    Returns:
        a :class:`SparseMask` whose metadata records the rule, density, budget and how many earlier coordinates
        it reuses.
    """
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if reuse_share is not None and not 0.0 <= float(reuse_share) <= 1.0:
        raise ValueError(f"reuse_share must be in [0, 1] or None, got {reuse_share!r}")
    w0, w1 = weight_tensors(source), weight_tensors(tuned)
    names = [n for n in w0 if n in w1]
    if not names:
        raise ValueError("source and tuned share no block Linear weight")
    shapes = {n: tuple(w0[n].shape) for n in names}
    sizes = [w0[n].numel() for n in names]
    scores = torch.cat([(w1[n].float() - w0[n].float()).abs().reshape(-1) for n in names])
    prev = _as_mask(previous) if previous is not None else None
    in_prev = torch.zeros(scores.numel(), dtype=torch.bool)
    if prev is not None:
        offset = 0
        for n, size in zip(names, sizes, strict=True):
            if n in prev:
                if prev.shape(n) != shapes[n]:
                    raise ValueError(f"previous mask module '{n}' has shape {prev.shape(n)}, weight is {shapes[n]}")
                in_prev[offset + prev.indices(n)] = True
            offset += size
    k = int(round(float(density) * scores.numel()))
    if k <= 0:
        raise ValueError(f"density {density} selects no coordinate of {scores.numel()}")
    selected = torch.topk(scores, k).indices
    if prev is not None and reuse_share is not None:
        allowed = int(math.floor(float(reuse_share) * int(in_prev.sum()) + 1e-9))
        if int(in_prev[selected].sum()) > allowed:
            n_out = int((~in_prev).sum())
            take_out = min(k - allowed, n_out)
            take_in = k - take_out  # > allowed only when the complement is too small: then it cannot be met
            if take_in > allowed:
                raise ValueError(
                    f"the churn budget cannot be met: {k} coordinates asked, only {n_out} outside the earlier mask and "
                    f"at most {allowed} inside it; lower the density or raise reuse_share"
                )
            parts = []
            if take_in:
                parts.append(torch.topk(scores.masked_fill(~in_prev, -1.0), take_in).indices)
            parts.append(torch.topk(scores.masked_fill(in_prev, -1.0), take_out).indices)
            selected = torch.cat(parts)
    flat = torch.zeros(scores.numel(), dtype=torch.bool)
    flat[selected] = True
    entries, offset = {}, 0
    for n, size in zip(names, sizes, strict=True):
        idx = flat[offset : offset + size].nonzero().squeeze(1)
        if idx.numel():
            entries[n] = (shapes[n], idx)
        offset += size
    meta = {
        "rule": "topk_budgeted",
        "density": float(density),
        "achieved_density": k / scores.numel(),
        "reuse_share": reuse_share,
        "reused": int(in_prev[selected].sum()),
        "previous_nnz": int(in_prev.sum()),
    }
    return SparseMask.from_indices(entries, meta)


def lora_rank_for(model: nn.Module, target_modules: Sequence[str], n_params: int) -> int:
    """LoRA rank whose trainable-parameter count ``r · Σ(in + out)`` over ``target_modules`` is closest to
    ``n_params`` (at least 1)."""
    modules = dict(model.named_modules())
    per_rank = 0
    for name in target_modules:
        m = modules[name]
        base = m.get_base_layer() if hasattr(m, "get_base_layer") else m
        per_rank += base.in_features + base.out_features
    if per_rank == 0:
        raise ValueError("no target module")
    return max(1, int(round(n_params / per_rank)))


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the peft adapters ``model`` holds (``[]`` for a plain model)."""
    return list(model.peft_config) if _is_peft(model) else []


def dir_bytes(directory: Union[str, Path], pattern: str = "*.safetensors") -> int:
    """Total size in bytes of the files matching ``pattern`` under ``directory`` (recursive)."""
    return sum(p.stat().st_size for p in Path(directory).rglob(pattern) if p.is_file())


@dataclass
class StageOutput:
    """Result of :func:`run_stage`.

    Attributes:
        model: what the next stage starts from: the trained plain model (``full``), the ``PeftModel`` holding
            every stage's adapter (``separate``) or the merged plain model (``merged``).
        trained: the trained model as returned by the trainer (a ``PeftModel`` for adapters).
        trainable: number of trained parameters.
        stage_bytes: bytes of this stage's saved artifact (adapter files, or the full checkpoint for ``full``).
        seconds: training wall time. history: per-step trainer metrics.
    """

    model: nn.Module
    trained: nn.Module
    trainable: int
    stage_bytes: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def _lora_config(rank: int, targets: Sequence[str], alpha: Optional[float]):
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=0.0, target_modules=list(targets)
    )


def run_stage(
    current: nn.Module,
    world: Any,
    cfg: Any,
    method: str,
    *,
    mode: str = "separate",
    adapter_name: str = "default",
    mask: Optional[MaskLike] = None,
    exclude: Optional[MaskLike] = None,
    lora_rank: Optional[int] = None,
    lora_alpha: Optional[float] = None,
    target_modules: Optional[Sequence[str]] = None,
    save_dir: Optional[Union[str, Path]] = None,
) -> StageOutput:
    """Train one continual stage with OPD on ``cfg.task`` (:func:`sparse_opd_peft.toy.opd_run`).

    ``current`` is consumed (adapters are injected into it in place; pass a copy to keep it). It is a plain model
    (the anchor, or earlier stages merged) or a ``PeftModel`` holding earlier stages' adapters.

    * ``method="full"``: all parameters of ``current`` (a peft model is merged first) are trained.
    * ``"lora"`` / ``"sparse"``: a new adapter ``adapter_name`` (LoRA of rank ``lora_rank`` on ``target_modules``,
      alpha ``lora_alpha`` or ``2·rank``; or ``SparseOPDConfig(mask=mask, exclude=exclude)``). If ``current``
      holds adapters: ``mode="separate"`` adds the new one next to them (all active, earlier ones frozen);
      ``mode="merged"`` merges them into the base first (``merge_and_unload``). After training, ``"merged"``
      merges the new adapter too, so :attr:`StageOutput.model` is a plain model.

    Args:
        world: a :class:`~sparse_opd_peft.toy.ToyWorld`; cfg: a :class:`~sparse_opd_peft.toy.ToyRunConfig`.
        save_dir: where to save this stage's artifact (``save_pretrained`` of the full model, or of the new adapter
            only: peft writes a non-default adapter into ``save_dir/<adapter_name>/``); its ``*.safetensors``
            bytes are :attr:`StageOutput.stage_bytes`. Without it, bytes are computed without writing.
    """
    from peft import get_peft_model

    from .toy.runs import opd_run
    from .tuner import SparseOPDConfig, save_adapter
    from .tuner.files import adapter_file_bytes, safetensors_nbytes

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if method == "full":
        model = current.merge_and_unload() if _is_peft(current) else current
        model.requires_grad_(True)
    else:
        if method == "sparse":
            if mask is None:
                raise ValueError("method='sparse' needs mask=")
            config = SparseOPDConfig(mask=mask, exclude=exclude)
        else:
            if not lora_rank or not target_modules:
                raise ValueError("method='lora' needs lora_rank= and target_modules=")
            config = _lora_config(lora_rank, target_modules, lora_alpha)
        if _is_peft(current) and mode == "separate":
            earlier = adapter_names(current)
            if adapter_name in earlier:
                raise ValueError(f"adapter {adapter_name!r} already exists in the model ({earlier})")
            current.add_adapter(adapter_name, config)
            current.base_model.set_adapter([*earlier, adapter_name])
            for name, p in current.named_parameters():  # earlier stages stay fixed
                p.requires_grad_(f".{adapter_name}." in f"{name}." and _is_adapter_param(name))
            model = current
        else:
            base = current.merge_and_unload() if _is_peft(current) else current
            model = get_peft_model(base, config, adapter_name=adapter_name)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trained, history, seconds = opd_run(model, world, cfg)
    trained.eval()
    if save_dir is not None:
        save_dir = Path(save_dir)
        if method == "full":
            trained.save_pretrained(save_dir)
        else:
            save_adapter(trained, save_dir, selected_adapters=[adapter_name])
        stage_bytes = dir_bytes(save_dir)
    elif method == "full":
        stage_bytes = safetensors_nbytes(trained.state_dict(), {"format": "pt"})
    else:
        stage_bytes = adapter_file_bytes(trained, adapter_name)
    carry = trained
    if method != "full" and mode == "merged":
        carry = copy.deepcopy(trained).merge_and_unload().eval()
    return StageOutput(carry, trained, trainable, stage_bytes, seconds, history)


def _is_adapter_param(name: str) -> bool:
    return any(key in name for key in ("lora_", "sparse_opd_"))


def probe_mask(
    current: nn.Module,
    world: Any,
    cfg: Any,
    density: float,
    previous: Optional[MaskLike] = None,
    reuse_share: Optional[float] = None,
) -> tuple[SparseMask, dict[str, Any]]:
    """The stage's own mask: a short full-parameter OPD probe run (``cfg``, e.g. 50 steps) from a merged copy of
    ``current``, then :func:`budgeted_topk_mask` of ``|W_probe − W_current|``.

    Returns:
        ``(mask, {"probe_steps", "probe_seconds", "nnz", "density", "reused"})``; ``current`` is not changed.
    """
    from .toy.runs import opd_run

    start = merged_copy(current)
    probe, _, seconds = opd_run(merged_copy(start), world, cfg)
    mask = budgeted_topk_mask(start, probe, density, previous, reuse_share)
    info = {
        "probe_steps": int(cfg.steps),
        "probe_seconds": seconds,
        "nnz": mask.nnz(),
        "density": mask.density(),
        "reused": mask.metadata.get("reused"),
    }
    return mask, info
