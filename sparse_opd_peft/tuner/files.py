"""Adapter files on disk: locate ``adapter_model.safetensors``, validate it up front, save atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch

from ..atomic import write_text_atomic  # noqa: F401  (re-exported: the Hub / card code imports it here)
from .storage import load_safetensors_checked

WEIGHTS_NAME = "adapter_model.safetensors"


def _hub_revision(hub_kwargs: dict) -> str:
    return hub_kwargs.get("revision") or "main"


def describe_hub_miss(
    model_id: str, filename: str, subfolder: Optional[str], hub_kwargs: dict, err: BaseException
) -> str:
    """One clear message for a file of ``model_id`` that neither a local directory nor the Hub / Hub cache gave.

    Args:
        model_id: the local path or repo id the user passed.
        filename: the file that was looked for (``adapter_config.json`` or ``adapter_model.safetensors``).
        subfolder: optional subfolder inside the repo.
        hub_kwargs: the ``from_pretrained`` keyword arguments (``revision``, ``cache_dir``, ...).
        err: the exception ``huggingface_hub`` raised.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"'{model_id}' (revision {_hub_revision(hub_kwargs)})"
    name = f"{subfolder}/{filename}" if subfolder else filename
    cache = hub_kwargs.get("cache_dir") or constants.HF_HUB_CACHE
    if isinstance(err, HFValidationError):
        return (
            f"'{model_id}' is not a local adapter directory (no such directory) and not a valid Hub repo id "
            "(org/name); pass the directory written by save_adapter / model.save_pretrained, or a repo id"
        )
    if isinstance(err, LocalEntryNotFoundError):
        reason = (
            "HF_HUB_OFFLINE=1 forbids downloading it"
            if constants.HF_HUB_OFFLINE
            else "downloading it failed (no network?)"
        )
        if filename == "adapter_config.json":
            reason += " (and there is no local directory of that name)"
        return (
            f"{where}: {name} is not in the local Hugging Face cache ({cache}) and {reason}; download the adapter "
            f"once with network access (`hf download {model_id}`), point HF_HUB_CACHE / cache_dir= at the cache that "
            "holds it, or pass a local adapter directory"
        )
    if isinstance(err, RevisionNotFoundError):
        return f"{where}: no such branch, tag or commit on the Hub; check revision= (default 'main')"
    if isinstance(err, RepositoryNotFoundError):
        return (
            f"'{model_id}': no such Hub repo, or it is private / gated; check the repo id, or pass token= "
            "(or run `hf auth login`) for a private repo"
        )
    if isinstance(err, EntryNotFoundError):
        return f"{where}: the repo has no {name}; is it the repo of a peft adapter?"
    return f"{where}: could not get {name} from the Hub ({type(err).__name__}: {err})"


def locate_adapter_weights(model_id: str, subfolder: Optional[str], hub_kwargs: dict) -> Optional[Path]:
    """Path of the adapter's safetensors file: in a local directory, or in the local Hub cache / downloaded by
    ``huggingface_hub`` for a repo id (``revision``, ``cache_dir``, ``token``, ``local_files_only`` are honoured;
    ``HF_HUB_OFFLINE=1`` reads the cache only).

    Returns:
        The file path, or None when the Hub could not be asked (network failure): peft then reports it itself.

    Raises:
        FileNotFoundError: the directory / repo revision has ``adapter_config.json`` but no
            ``adapter_model.safetensors`` (SparseOPD adapters are stored as safetensors only, never pickle).
    """
    model_id = os.fspath(model_id)
    local = Path(model_id) / (subfolder or "") / WEIGHTS_NAME
    if Path(model_id).is_dir():
        if not local.is_file():
            raise FileNotFoundError(
                f"{local}: missing; an adapter directory needs {WEIGHTS_NAME} next to adapter_config.json"
            )
        return local
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    keys = ("revision", "cache_dir", "token", "local_files_only")
    try:
        return Path(
            hf_hub_download(
                model_id, WEIGHTS_NAME, subfolder=subfolder, **{k: hub_kwargs[k] for k in keys if k in hub_kwargs}
            )
        )
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            describe_hub_miss(model_id, WEIGHTS_NAME, subfolder, hub_kwargs, err)
            + f" (its adapter_config.json is cached, {WEIGHTS_NAME} is not: the download was interrupted or the "
            "repo lacks the file; SparseOPD adapters are safetensors only, re-upload with `sparse-opd push`)"
        ) from None
    except EntryNotFoundError:
        raise FileNotFoundError(
            f"'{model_id}' (revision {_hub_revision(hub_kwargs)}): the repo has adapter_config.json but no "
            f"{WEIGHTS_NAME}; SparseOPD adapters are stored as safetensors only: re-upload the adapter directory "
            "with `sparse-opd push DIR REPO_ID` or model.push_to_hub(REPO_ID)"
        ) from None
    except Exception:  # noqa: BLE001 - network and other hub failures: let peft's own loader raise its usual error
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
    directory and moved into place with ``os.replace`` only once every file was written. An existing
    ``README.md`` in ``directory`` is updated (its sparse_opd section replaced), not overwritten."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        readme = directory / "README.md"
        if readme.is_file():  # peft's model-card hook updates an existing card, keeping the user's own text
            shutil.copy2(readme, tmp / "README.md")
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


# safetensors writes tensors sorted by dtype (this order, descending), then by name; the header is padded to 8 bytes.
_SAFETENSORS_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "F16": torch.float16,
                       "BF16": torch.bfloat16, "I32": torch.int32, "F32": torch.float32, "F64": torch.float64,
                       "I64": torch.int64}  # fmt: skip


def safetensors_nbytes(tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> int:
    """Exact size in bytes of the file ``safetensors.torch.save_file(tensors, metadata=metadata)`` writes, computed
    from names, shapes and dtypes only (no copy of the data).

    Args:
        tensors: ``{name: tensor}`` of any shapes; dtypes bool, (u)int8/16/32/64, float16/bfloat16/32/64.
        metadata: the ``__metadata__`` strings (peft writes ``{"format": "pt"}``).
    """
    names = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
    if any(t.dtype not in names for t in tensors.values()):  # rare dtypes: let safetensors serialize in memory
        from safetensors.torch import save

        return len(save({k: v.contiguous() for k, v in tensors.items()}, metadata=dict(metadata or {}) or None))
    order = list(_SAFETENSORS_DTYPES)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, tensor in sorted(tensors.items(), key=lambda kv: (-order.index(names[kv[1].dtype]), kv[0])):
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": names[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return 8 + len(raw) + (-len(raw)) % 8 + offset


def adapter_file_bytes(model, adapter_name: str = "default") -> int:
    """Size in bytes of the ``adapter_model.safetensors`` that ``model.save_pretrained`` writes for ``adapter_name``
    (packed coordinates, values in ``save_dtype``), without writing it."""
    from peft.utils import get_peft_model_state_dict

    return safetensors_nbytes(get_peft_model_state_dict(model, adapter_name=adapter_name), {"format": "pt"})
