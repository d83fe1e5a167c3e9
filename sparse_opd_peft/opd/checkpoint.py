"""Checkpoint I/O of the OPD trainer: trainable-state snapshots for trajectory diagnostics and resumable state."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

__all__ = ["STATE_FILE", "read_training_state", "save_trainable_state", "save_training_state", "trainable_state_dict"]

STATE_FILE = "opd_trainer_state.json"


def trainable_state_dict(
    model: torch.nn.Module, state_dict: Optional[dict[str, torch.Tensor]] = None
) -> dict[str, torch.Tensor]:
    """The trainable state for trajectory diagnostics.

    A PEFT model gives its adapter state (``get_peft_model_state_dict``: e.g. ``sparse_opd_values`` 1-D float32, or
    LoRA's ``lora_A`` / ``lora_B``); a plain model the 2-D weights ``(out, in)`` of every trainable ``nn.Linear``,
    named as in ``model.state_dict()`` so the diagnostics can pair them with the source checkpoint.

    Args:
        model: the bare (unwrapped) student.
        state_dict: a full state dict to select from (e.g. ``accelerator.get_state_dict`` under FSDP / DeepSpeed);
            default ``model.state_dict()``.

    Returns:
        ``{name: tensor}`` on CPU, contiguous copies in the parameters' dtypes.
    """
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model, state_dict=state_dict)
    else:
        names = {
            f"{name}.weight" if name else "weight"
            for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and mod.weight.requires_grad
        }
        full = state_dict if state_dict is not None else model.state_dict()
        state = {k: v for k, v in full.items() if k in names}
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def save_trainable_state(accelerator: Any, model: torch.nn.Module, path: str | Path, step: int) -> None:
    """Write :func:`trainable_state_dict` of a prepared ``model`` to ``path`` (safetensors, metadata ``step``).
    Call on every process (gathering is collective under FSDP / DeepSpeed); the main process writes."""
    full = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        state = trainable_state_dict(accelerator.unwrap_model(model), full)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path), metadata={"step": str(step)})
    accelerator.wait_for_everyone()


def save_training_state(accelerator: Any, output_dir: str | Path, payload: dict[str, Any]) -> None:
    """``accelerator.save_state`` (weights, optimizer, RNG) plus ``payload`` as JSON, written to ``output_dir.tmp``
    and then renamed, so an interrupted save never replaces a good state. Call on every process."""
    out = Path(output_dir)
    tmp = out.with_name(out.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(payload, indent=1, default=float))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    accelerator.wait_for_everyone()


def read_training_state(input_dir: str | Path) -> dict[str, Any]:
    """The JSON payload of a :func:`save_training_state` directory.

    Raises:
        ValueError: when ``input_dir`` is not such a directory.
    """
    path = Path(input_dir)
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"{path} is not an OPDTrainer state directory (no {STATE_FILE}); pass a checkpoint_dir/state")
    return json.loads((path / STATE_FILE).read_text())
