"""Adapter files on disk: locate ``adapter_model.safetensors``, validate it up front, save atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from .storage import load_safetensors_checked

WEIGHTS_NAME = "adapter_model.safetensors"


def locate_adapter_weights(model_id: str, subfolder: Optional[str], hub_kwargs: dict) -> Optional[Path]:
    """Path of the adapter's safetensors file: in a local directory, or in the local Hub cache / downloaded by
    ``huggingface_hub`` for a repo id. None when it cannot be found (peft then reports the problem itself)."""
    local = Path(model_id) / (subfolder or "") / WEIGHTS_NAME
    if Path(model_id).is_dir():
        if not local.is_file():
            raise FileNotFoundError(
                f"{local}: missing; an adapter directory needs {WEIGHTS_NAME} next to adapter_config.json"
            )
        return local
    try:
        from huggingface_hub import hf_hub_download

        keys = ("revision", "cache_dir", "token", "local_files_only")
        return Path(
            hf_hub_download(
                model_id, WEIGHTS_NAME, subfolder=subfolder, **{k: hub_kwargs[k] for k in keys if k in hub_kwargs}
            )
        )
    except Exception:  # noqa: BLE001 - any hub failure: let peft's own loader raise its usual error
        return None


def validate_adapter_file(config, path: str | os.PathLike) -> None:
    """Decode and check every module's coordinates and values of a saved adapter against ``config``.

    Raises:
        ValueError: corrupt / truncated file, out-of-range, duplicate or unsorted coordinates, missing modules,
            ``values`` length different from the mask's nnz (each names the file and module).
    """
    from .model import unpack_state_dict

    tensors, _ = load_safetensors_checked(path)
    unpack_state_dict(config, tensors, source=str(path))


def save_adapter(model, directory: str | os.PathLike, **kwargs) -> Path:
    """``model.save_pretrained(directory, **kwargs)`` made atomic: files are written into a temporary sibling
    directory and moved into place with ``os.replace`` only once every file was written."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        model.save_pretrained(tmp, **kwargs)
        directory.mkdir(exist_ok=True)
        for root, _, files in os.walk(tmp):
            rel = Path(root).relative_to(tmp)
            (directory / rel).mkdir(parents=True, exist_ok=True)
            for name in files:
                os.replace(Path(root) / name, directory / rel / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
