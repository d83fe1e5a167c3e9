"""Saving an adapter from a sharded (FSDP2) model.

Under ``torch.distributed.fsdp.fully_shard`` (FSDP2) every parameter of a wrapped module, the SparseOPD ``values``
(nnz,) and ``coeff`` (out, r) included, becomes a ``DTensor`` sharded along dim 0 (``Shard(0)``): each rank holds
about 1/world_size of it. ``model.save_pretrained`` then fails inside safetensors ("Attempted to access the data
pointer on an invalid python storage"), for any peft method. The adapter must first be gathered into full tensors
(a collective: every rank calls it), then written once, by rank 0:

>>> save_sharded_adapter(model, "out/adapter")      # on every rank; rank 0 writes

The directory is the one :func:`sparse_opd_peft.save_adapter` writes for an unsharded model (``adapter_config.json``,
``adapter_model.safetensors``, ``README.md``; same format, written atomically), so ``PeftModel.from_pretrained(base,
"out/adapter")`` loads it into an ordinary, unsharded base model. Only the model card's bf16-visibility table is not
measured (it needs the base weights, which stay sharded).

Tested on CPU with 2 processes over gloo (FSDP2 per decoder block + root, ``tests/test_fsdp.py``); FSDP1 and
DeepSpeed ZeRO-3 are not supported by these helpers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["is_sharded", "save_sharded_adapter", "sharded_adapter_state_dict"]


def is_sharded(model: nn.Module) -> bool:
    """True when any parameter of ``model`` is a ``torch.distributed.tensor.DTensor`` (FSDP2 / tensor parallel)."""
    from .tuner.model import is_dtensor

    return any(is_dtensor(p) for p in model.parameters())


def _adapter_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Name fragments of the adapter's own parameters: the tuner's prefix (``sparse_opd_``, ``lora_``, ...) and
    peft's ``modules_to_save`` copies."""
    tuner = getattr(model, "base_model", None)
    from .tuner.peft_type import PREFIX

    prefix = getattr(tuner, "prefix", None) or PREFIX
    return (prefix, ".modules_to_save.")


def _check_peft_model(model: Any, caller: str) -> None:
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(
            f"{caller}: expected the PeftModel returned by get_peft_model (after fully_shard, the same object), got "
            f"{type(model).__name__}; with accelerate pass accelerator.unwrap_model(model)"
        )


def sharded_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict that ``model.save_pretrained(..., state_dict=...)`` needs, gathered from the
    FSDP2 shards with ``torch.distributed.checkpoint.state_dict.get_model_state_dict(model,
    StateDictOptions(full_state_dict=True, cpu_offload=True))``.

    A collective: every rank must call it, in the same order as its other collectives. When every adapter parameter
    is trainable, frozen parameters (the base weights) are skipped (``ignore_frozen_params=True``), so only the
    adapter's parameters and the model's buffers (the coordinates among them) are gathered; when an adapter is
    frozen (an inactive adapter, ``inference_mode``), the whole model is gathered.

    Args:
        model: the ``PeftModel`` after ``fully_shard`` (or an unsharded one, for which this is ``state_dict()`` on
            CPU).

    Returns:
        On rank 0: ``{fully qualified name: tensor}`` on CPU, e.g. ``...q_proj.sparse_opd_values.default`` (nnz,)
        float32 and ``...q_proj.sparse_opd_indices.default`` (nnz,) int32 / int64, names as in
        ``model.state_dict()``. On the other ranks: ``{}``.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    _check_peft_model(model, "sharded_adapter_state_dict")
    marks = _adapter_prefixes(model)
    frozen_adapter = any(not p.requires_grad and any(m in n for m in marks) for n, p in model.named_parameters())
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=not frozen_adapter)
    return get_model_state_dict(model, options=options)


def _flag_device() -> torch.device:
    """Device for the small status tensor all-reduced after the save (NCCL needs a CUDA tensor)."""
    import torch.distributed as dist

    if "nccl" in str(dist.get_backend()).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def save_sharded_adapter(model: nn.Module, directory: str | os.PathLike, **kwargs: Any) -> Path:
    """Save the adapter(s) of a sharded (FSDP2) ``PeftModel`` as an ordinary adapter directory.

    Call it on every rank (it gathers the shards with :func:`sharded_adapter_state_dict`); rank 0 then writes
    ``directory`` with the package's atomic save (:func:`sparse_opd_peft.tuner.files.save_adapter`: peft's
    ``save_pretrained`` into a temporary sibling swapped in as a whole; same files and format as
    :func:`sparse_opd_peft.save_adapter`), and every rank returns once it is written. A model that is not sharded
    is saved with :func:`sparse_opd_peft.save_adapter` by rank 0 (or by the only process).

    Args:
        model: the ``PeftModel`` after ``fully_shard`` (with accelerate: ``accelerator.unwrap_model(model)``).
        directory: the adapter directory to write (replaced as a whole if it exists).
        **kwargs: passed to ``save_pretrained`` (``selected_adapters``, ``safe_serialization``, ...); not
            ``state_dict`` or ``is_main_process``, which this function sets.

    Returns:
        ``directory`` as a ``Path`` (on every rank).

    Raises:
        TypeError: ``model`` is not a ``PeftModel``, or ``state_dict`` / ``is_main_process`` were passed.
        RuntimeError: the write failed on rank 0 (raised on every rank; rank 0 raises the original error).
    """
    import torch.distributed as dist

    _check_peft_model(model, "save_sharded_adapter")
    for key in ("state_dict", "is_main_process"):
        if key in kwargs:
            raise TypeError(f"save_sharded_adapter: do not pass {key}=; it gathers the state and writes on rank 0")
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    sharded = is_sharded(model)
    if sharded and not distributed:
        raise RuntimeError("save_sharded_adapter: the model holds DTensor shards but no process group is initialized")
    state = sharded_adapter_state_dict(model) if sharded else None
    error: Optional[BaseException] = None
    if rank == 0:
        try:
            from .model_card import _SavesWithCard
            from .tuner.files import save_adapter as save_atomically

            # sharded: peft's save of the gathered state, then the card from the written files (bf16 visibility is
            # not measured, the base weights stay sharded); else exactly sparse_opd_peft.save_adapter
            gathered = {"state_dict": state, "is_main_process": True}
            saver = _SavesWithCard(model, gathered, from_files=True) if sharded else _SavesWithCard(model)
            save_atomically(saver, directory, **kwargs)
        except Exception as err:  # noqa: BLE001 - re-raised below, after the other ranks learned of it
            error = err
    if distributed:
        failed = torch.tensor([0 if error is None else 1], device=_flag_device())
        dist.all_reduce(failed)
        if error is None and int(failed.item()):
            raise RuntimeError(f"save_sharded_adapter: rank 0 failed to write {directory}; see rank 0's error")
    if error is not None:
        raise error
    return Path(directory)
