"""Continual post-training experiments on the toy world: run a stage with a method, probe a stage's own mask.

A *stage* trains the current model on one task with OPD (:func:`sparse_opd_peft.lab.toy.opd_run`), with one of
three methods:

* ``"full"``: every parameter of the (merged) current model;
* ``"lora"``: peft LoRA on the given target Linear modules;
* ``"sparse"``: our :class:`~sparse_opd_peft.SparseOPDConfig` adapter on a mask, optionally with ``exclude``
  (the churn budget: coordinates an earlier stage trained).

Adapters of successive stages are either kept as separate named peft adapters (``mode="separate"``: all stages
active, earlier ones frozen; the effective weight is ``W0 + Σ ΔW_stage``) or merged in turn
(``mode="merged"``: each stage is merged with ``merge_and_unload`` before the next one is added, so a later
adapter's base is the previous stages' merged model).

The metrics and masks these experiments measure with (churn, mask overlap, the budgeted top-k mask) are library
code: :mod:`sparse_opd_peft.masks.churn` and :func:`sparse_opd_peft.masks.mask_overlap`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from ..masks import MaskLike, SparseMask, budgeted_topk_mask, merged_copy
from ..masks.churn import is_peft

__all__ = ["METHODS", "MODES", "StageOutput", "probe_mask", "run_stage"]

METHODS = ("full", "lora", "sparse")
MODES = ("separate", "merged")


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
    """Train one continual stage with OPD on ``cfg.task`` (:func:`sparse_opd_peft.lab.toy.opd_run`).

    ``current`` is consumed (adapters are injected into it in place; pass a copy to keep it). It is a plain model
    (the anchor, or earlier stages merged) or a ``PeftModel`` holding earlier stages' adapters.

    * ``method="full"``: all parameters of ``current`` (a peft model is merged first) are trained.
    * ``"lora"`` / ``"sparse"``: a new adapter ``adapter_name`` (LoRA of rank ``lora_rank`` on ``target_modules``,
      alpha ``lora_alpha`` or ``2·rank``; or ``SparseOPDConfig(mask=mask, exclude=exclude)``). If ``current``
      holds adapters: ``mode="separate"`` adds the new one next to them (all active, earlier ones frozen);
      ``mode="merged"`` merges them into the base first (``merge_and_unload``). After training, ``"merged"``
      merges the new adapter too, so :attr:`StageOutput.model` is a plain model.

    Args:
        world: a :class:`~sparse_opd_peft.lab.toy.ToyWorld`; cfg: a :class:`~sparse_opd_peft.lab.toy.ToyRunConfig`.
        save_dir: where to save this stage's artifact (``save_pretrained`` of the full model, or of the new adapter
            only: peft writes a non-default adapter into ``save_dir/<adapter_name>/``); its ``*.safetensors``
            bytes are :attr:`StageOutput.stage_bytes`. Without it, bytes are computed without writing.
    """
    from peft import get_peft_model

    from ..tuner import SparseOPDConfig
    from .toy.runs import opd_run

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if method == "full":
        model = current.merge_and_unload() if is_peft(current) else current
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
        if is_peft(current) and mode == "separate":
            earlier = adapter_names(current)
            if adapter_name in earlier:
                raise ValueError(f"adapter {adapter_name!r} already exists in the model ({earlier})")
            current.add_adapter(adapter_name, config)
            current.base_model.set_adapter([*earlier, adapter_name])
            for name, p in current.named_parameters():  # earlier stages stay fixed
                p.requires_grad_(f".{adapter_name}." in f"{name}." and _is_adapter_param(name))
            model = current
        else:
            base = current.merge_and_unload() if is_peft(current) else current
            model = get_peft_model(base, config, adapter_name=adapter_name)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trained, history, seconds = opd_run(model, world, cfg)
    trained.eval()
    stage_bytes = _save_stage(trained, method, adapter_name, save_dir)
    carry = trained
    if method != "full" and mode == "merged":
        carry = copy.deepcopy(trained).merge_and_unload().eval()
    return StageOutput(carry, trained, trainable, stage_bytes, seconds, history)


def _save_stage(trained: nn.Module, method: str, adapter_name: str, save_dir: Optional[Union[str, Path]]) -> int:
    """Bytes of the stage's artifact (the full model, or the new adapter only): the ``*.safetensors`` written to
    ``save_dir``, or computed without writing when it is None."""
    from ..model_card import save_adapter
    from ..safetensors_io import safetensors_nbytes
    from ..tuner.storage import adapter_file_bytes

    if save_dir is not None:
        save_dir = Path(save_dir)
        if method == "full":
            trained.save_pretrained(save_dir)
        else:
            save_adapter(trained, save_dir, selected_adapters=[adapter_name])
        return dir_bytes(save_dir)
    if method == "full":
        return safetensors_nbytes(trained.state_dict(), {"format": "pt"})
    return adapter_file_bytes(trained, adapter_name)


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
        "probe_steps": int(cfg.opd.steps),
        "probe_seconds": seconds,
        "nnz": mask.nnz(),
        "density": mask.density(),
        "reused": mask.metadata.get("reused"),
    }
    return mask, info


def matched_lora_rank(n_params: int, shapes: Mapping[str, tuple[int, int]]) -> int:
    """LoRA rank whose trainable-parameter count ``r · Σ(in + out)`` over the Linear ``shapes`` (``{name: (out,
    in)}``) is closest to ``n_params`` (at least 1): the lab's one rule for a LoRA matched to a sparse budget."""
    per_rank = sum(o + i for o, i in shapes.values())
    if per_rank == 0:
        raise ValueError("no target module")
    return max(1, int(round(n_params / per_rank)))


def lora_rank_for(model: nn.Module, target_modules: Sequence[str], n_params: int) -> int:
    """:func:`matched_lora_rank` over the ``target_modules`` of ``model`` (peft-wrapped ones: their base layer)."""
    modules = dict(model.named_modules())
    shapes = {}
    for name in target_modules:
        m = modules[name]
        base = m.get_base_layer() if hasattr(m, "get_base_layer") else m
        shapes[name] = (base.out_features, base.in_features)
    return matched_lora_rank(n_params, shapes)


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the peft adapters ``model`` holds (``[]`` for a plain model)."""
    return list(model.peft_config) if is_peft(model) else []


def dir_bytes(directory: Union[str, Path], pattern: str = "*.safetensors") -> int:
    """Total size in bytes of the files matching ``pattern`` under ``directory`` (recursive)."""
    return sum(p.stat().st_size for p in Path(directory).rglob(pattern) if p.is_file())
