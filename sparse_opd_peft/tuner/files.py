"""Adapter files on disk: locate ``adapter_model.safetensors``, check it (and ``adapter_config.json``) in full
before anything is loaded, undo a failed load, and save an adapter directory atomically as a whole."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch

from ..atomic import normalize_modes, staged_directory
from ..safetensors_io import load_safetensors_checked
from .storage import ADAPTER_FORMAT_VERSION, VALUE_DTYPES, decode_adapter_state, parse_adapter_key

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


CONFIG_NAME = "adapter_config.json"
_RESAVE = "the config is damaged or was edited by hand: re-save the adapter (save_adapter / model.save_pretrained)"


def read_adapter_config_json(path: str | os.PathLike) -> dict:
    """The JSON object of an ``adapter_config.json`` file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not UTF-8 JSON, not a JSON object, or no ``peft_type`` (each naming the file and the fix).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; an adapter directory holds {CONFIG_NAME}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); {_RESAVE}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a JSON {type(data).__name__}, not an object; {_RESAVE}")
    if not data.get("peft_type"):
        raise ValueError(f"{path}: no peft_type; not a peft adapter config (pass the directory of a peft adapter)")
    return data


def check_adapter_config_fields(data: Mapping, source: str) -> None:
    """Check the raw JSON fields of a SPARSE_OPD ``adapter_config.json`` that ``SparseOPDConfig`` would otherwise turn
    into a traceback: ``format_version`` (an integer), ``save_dtype``, and the metadata of
    :func:`check_adapter_metadata`.

    Raises:
        ValueError: naming ``source``, the field and the fix.
    """
    version = data.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(
            f"{source}: field format_version must be an integer (1 .. {ADAPTER_FORMAT_VERSION}), got {version!r}; "
            f"{_RESAVE}"
        )
    if data.get("save_dtype", "float32") not in VALUE_DTYPES:
        raise ValueError(
            f"{source}: field save_dtype must be one of {sorted(VALUE_DTYPES)}, got {data.get('save_dtype')!r}; "
            f"{_RESAVE}"
        )
    _check_metadata(data, source)


def check_adapter_metadata(config, source: str) -> None:
    """Check the per-module metadata of a loaded ``SparseOPDConfig``: ``module_shapes`` (name -> two positive ints),
    ``module_nnz`` (0 .. out·in), ``module_rank`` (0 .. in) of listed modules, ``fingerprint`` (name -> dict), and at
    least one module to adapt.

    Raises:
        ValueError: naming ``source`` (the config file), the field, the module and the fix.
    """
    _check_metadata(
        {k: getattr(config, k, None) for k in ("module_shapes", "module_nnz", "module_rank", "fingerprint")}, source
    )


def _is_int(v, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _check_metadata(data: Mapping, source: str) -> None:
    fields = {k: data.get(k) if data.get(k) is not None else {} for k in
              ("module_shapes", "module_nnz", "module_rank", "fingerprint")}  # fmt: skip
    for key, value in fields.items():
        if not isinstance(value, Mapping):
            raise ValueError(f"{source}: field {key} must be an object {{module name: ...}}, got {value!r}; {_RESAVE}")
    shapes = fields["module_shapes"]
    for name, shape in shapes.items():
        if not isinstance(shape, (list, tuple)) or len(shape) != 2 or not all(_is_int(v, 1) for v in shape):
            raise ValueError(
                f"{source}: field module_shapes['{name}'] must be [out_features, in_features] (two positive "
                f"integers), got {shape!r}; {_RESAVE}"
            )
    for key, limit in (("module_nnz", lambda s: s[0] * s[1]), ("module_rank", lambda s: s[1])):
        for name, value in fields[key].items():
            if name not in shapes:
                raise ValueError(f"{source}: field {key} lists module '{name}', which module_shapes lacks; {_RESAVE}")
            if not _is_int(value, 0) or value > limit(shapes[name]):
                raise ValueError(
                    f"{source}: field {key}['{name}'] must be an integer in [0, {limit(shapes[name])}] for a "
                    f"{shapes[name][0]}x{shapes[name][1]} weight, got {value!r}; {_RESAVE}"
                )
    for name, value in fields["fingerprint"].items():
        if not isinstance(value, Mapping):
            raise ValueError(f"{source}: field fingerprint['{name}'] must be an object, got {value!r}; {_RESAVE}")
    if not any(fields["module_nnz"].values()) and not any(fields["module_rank"].values()):
        raise ValueError(f"{source}: fields module_nnz / module_rank name no module to adapt; {_RESAVE}")


def validate_adapter_file(config, path: str | os.PathLike) -> None:
    """Check a saved adapter in full against ``config`` before the base model is touched: the config's metadata,
    then every tensor's name, shape, dtype and finiteness and every module's coordinates
    (:func:`.storage.decode_adapter_state`).

    Raises:
        ValueError: corrupt / truncated file, foreign tensors (base weights), bad coordinates, missing or mis-shaped
            values / coeff / basis, NaN / inf, damaged metadata (each names the file and module).
    """
    path = Path(path)
    check_adapter_metadata(config, str(path.with_name(CONFIG_NAME)))
    tensors, _ = load_safetensors_checked(path)
    decode_adapter_state(config, tensors, str(path), allowed=_modules_to_save_keys(config, tensors))


def _modules_to_save_keys(config, state_dict: Mapping) -> set[str]:
    """Keys of ``state_dict`` that hold peft ``modules_to_save`` copies the config asks for (saved under the plain
    module name, or under ``<module>.modules_to_save.<adapter>.`` once peft mapped them for loading)."""
    names = config.modules_to_save or []
    if not names:
        return set()
    out = set()
    for key in state_dict:
        if parse_adapter_key(key)[1]:
            continue
        stem = key.removeprefix("base_model.model.")
        module = stem.split(".modules_to_save.")[0] if ".modules_to_save." in stem else stem.rsplit(".", 1)[0]
        if any(module == n or module.endswith("." + n) for n in names):
            out.add(key)
    return out


def _adapter_layers(model: torch.nn.Module, adapter_name: str) -> dict:
    """``{module name: SparseOPDLayer}`` of the layers of ``model`` holding ``adapter_name``."""
    from .layer import SparseOPDLayer

    return {
        n.removeprefix("base_model.model."): m
        for n, m in model.named_modules()
        if isinstance(m, SparseOPDLayer) and (adapter_name in m.sparse_opd_values or adapter_name in m.sparse_opd_coeff)
    }


def _is_placeholder(t: torch.Tensor) -> bool:
    return t.device.type == "meta" or not bool(t.ne(0).any())


def adapter_is_fresh(model: torch.nn.Module, adapter_name: str) -> bool:
    """True when ``adapter_name`` was just injected for a load and the file has not filled it yet: a layer still
    marks it pending (``SparseOPDLayer._sparse_opd_pending``), or, for layers that keep no such record, every
    coordinate / basis buffer is still the all-zero placeholder (real coordinates are strictly increasing, a real
    basis is nonzero)."""
    layers = list(_adapter_layers(model, adapter_name).values())
    if any(adapter_name in getattr(layer, "_sparse_opd_pending", ()) for layer in layers):
        return True
    if layers and all(hasattr(layer, "_sparse_opd_pending") for layer in layers):
        return False
    for layer in layers:
        for container in (layer.sparse_opd_indices, layer.sparse_opd_basis):
            if adapter_name in container and not _is_placeholder(container[adapter_name]):
                return False
    return True


def check_loaded_state(
    model: torch.nn.Module, config, adapter_name: str, state_dict: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The check of ``SparseOPDModel._remap_adapter_state_dict_for_load``: :func:`check_adapter_metadata`, then
    :func:`.storage.decode_adapter_state`; loading into a name that already holds another adapter (``load_adapter``
    with a name in use) is refused.

    Args:
        model: the ``PeftModel`` (or a model with injected layers) being loaded into.
        config: ``model.peft_config[adapter_name]``.
        adapter_name: the adapter the file is loaded into.
        state_dict: the file's ``{key: tensor}`` (after peft's ``modules_to_save`` key mapping).

    Returns:
        The state dict with coordinates decoded to ``sparse_opd_indices`` (1-D int32 / int64, sorted).

    Raises:
        ValueError / TypeError: naming the file, module, tensor or adapter name and the fix.
    """
    source = "adapter_model.safetensors"
    fresh = adapter_is_fresh(model, adapter_name)
    try:
        check_adapter_metadata(config, CONFIG_NAME)
        decoded = decode_adapter_state(config, state_dict, source, allowed=_modules_to_save_keys(config, state_dict))
        if not fresh:
            for name, layer in _adapter_layers(model, adapter_name).items():
                key = next((k for k in decoded if parse_adapter_key(k) == (name, "sparse_opd_indices")), None)
                have = layer.sparse_opd_indices[adapter_name] if adapter_name in layer.sparse_opd_indices else None
                if have is not None and (key is None or not torch.equal(decoded[key].long(), have.long().cpu())):
                    raise ValueError(f"module '{name}': the file's coordinates differ from the adapter's")
    except ValueError as err:
        if fresh:
            raise
        raise ValueError(
            f"adapter name '{adapter_name}' is already in use in this model and the file is not that adapter ({err}); "
            f"load it beside it under a new name (model.load_adapter(path, adapter_name='other')) or "
            f"model.delete_adapter('{adapter_name}') first"
        ) from None
    return decoded


def undo_fresh_adapter(model: torch.nn.Module, adapter_name: str) -> None:
    """Remove ``adapter_name`` after a failed load injected it: with no other adapter the model is unloaded (every
    SparseOPD layer replaced by its base layer), else the adapter is deleted and layers left without adapter are
    replaced by their base layer. A no-op when the adapter is not fresh (:func:`adapter_is_fresh`)."""
    from peft.tuners.tuners_utils import BaseTuner
    from peft.utils import _get_submodules

    tuner = getattr(model, "base_model", model)
    if not isinstance(tuner, BaseTuner) or adapter_name not in tuner.peft_config:
        return
    if not adapter_is_fresh(model, adapter_name):
        return
    if set(tuner.peft_config) == {adapter_name}:
        tuner.unload()
        tuner.peft_config.pop(adapter_name, None)
        return
    tuner.delete_adapter(adapter_name)
    from .layer import SparseOPDLayer

    empty = [n for n, m in tuner.model.named_modules() if isinstance(m, SparseOPDLayer) and not
             (m.sparse_opd_values or m.sparse_opd_coeff)]  # fmt: skip
    for name in empty:
        parent, target, child = _get_submodules(tuner.model, name)
        setattr(parent, child, target.get_base_layer())


def save_adapter(model, directory: str | os.PathLike, **kwargs) -> Path:
    """``model.save_pretrained(directory, **kwargs)`` made atomic as a whole: every file is written into a temporary
    sibling directory, which then replaces ``directory`` in one swap (:func:`sparse_opd_peft.atomic.replace_dir`), so
    ``directory`` holds either the old adapter or the new one, never a mix. An existing ``README.md`` is updated (its
    sparse_opd section replaced), not overwritten, and files of the old directory that the save does not write (the
    user's own) are kept. On failure ``directory`` is unchanged and no temporary directory is left behind.

    Returns:
        ``directory`` as a ``Path``.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file; save_adapter writes a directory: pass a directory path")
    with staged_directory(directory, normalize=False) as tmp:
        readme = directory / "README.md"
        if readme.is_file():  # peft's model-card hook updates an existing card, keeping the user's own text
            shutil.copy2(readme, tmp / "README.md")
        model.save_pretrained(tmp, **kwargs)
        normalize_modes(tmp)  # what we wrote gets the umask's modes; the user's own files keep theirs
        if directory.is_dir():
            for entry in directory.iterdir():
                if not (tmp / entry.name).exists() and not entry.is_symlink():
                    copy = shutil.copytree if entry.is_dir() else shutil.copy2
                    copy(entry, tmp / entry.name)
    return directory
