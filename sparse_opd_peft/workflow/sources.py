"""Checked sources (model, tokenizer and adapter directories or Hub ids) and output directories of the workflows."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@[\w./-]+)?")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def quiet_library_warnings() -> None:
    """Keep stderr for our own output: hide transformers' per-load progress bars ("Loading weights", "Writing model
    shards") and a deprecation notice that peft triggers in transformers 5 on every ``PeftModel``; neither is
    actionable for a command-line user and both would break the one-line ``error:`` output."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)


def torch_dtype(name: str):
    """``"fp32" | "bf16" | "fp16"`` (:data:`sparse_opd_peft.choices.MODEL_DTYPES`) -> ``torch.dtype``."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def resolve_source(source: str, what: str, kind: str = "model") -> tuple[str, Optional[str]]:
    """``(local path or Hub id, revision)`` of a model / tokenizer / adapter argument, checked without network.

    A path that exists must be a directory holding ``config.json`` (model), tokenizer files (tokenizer) or
    ``adapter_config.json`` (adapter); anything else must look like a Hub id ``org/name[@revision]``.
    """
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(
                f"{what} {source} is a file; pass a directory written by save_pretrained or a Hub id"
            )
        need = {"model": ("config.json",), "tokenizer": _TOKENIZER_FILES, "adapter": ("adapter_config.json",)}[kind]
        if not any((path / f).is_file() for f in need):
            hint = ""
            if kind == "adapter" and (path / "config.json").is_file():
                hint = " (it holds a full model: load it with AutoModelForCausalLM, there is no adapter to read)"
            raise FileNotFoundError(f"{what} {source}: no {' / '.join(need)} in this directory{hint}")
        return str(path), None
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or not _HUB_ID.fullmatch(source):
        raise FileNotFoundError(
            f"{what} {source}: no such directory (and not a Hub id of the form org/name[@revision])"
        )
    name, _, revision = source.partition("@")
    return name, revision or None


def has_tokenizer(source: str) -> bool:
    """False only for a local directory without tokenizer files (a Hub id may have them: try to load it)."""
    path = Path(source).expanduser()
    return not path.is_dir() or any((path / f).is_file() for f in _TOKENIZER_FILES)


def load_causal_lm(source: str, what: str, dtype: Any, trust_remote_code: bool):
    """``AutoModelForCausalLM.from_pretrained`` of a checked source (safetensors weights only, never pickle)."""
    from transformers import AutoModelForCausalLM

    ref, revision = resolve_source(source, what)
    return AutoModelForCausalLM.from_pretrained(
        ref, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
    )


def load_tokenizer(source: str, what: str, trust_remote_code: bool):
    """``AutoTokenizer.from_pretrained`` of a checked source."""
    from transformers import AutoTokenizer

    ref, revision = resolve_source(source, what, "tokenizer")
    return AutoTokenizer.from_pretrained(ref, revision=revision, trust_remote_code=trust_remote_code)


def adapter_dir(adapter: str) -> Path:
    """Local directory of an adapter argument: a directory, or a Hub id fetched with ``snapshot_download`` (the
    local cache when ``HF_HUB_OFFLINE=1``)."""
    ref, revision = resolve_source(adapter, "ADAPTER", "adapter")
    if Path(ref).is_dir():
        return Path(ref)
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(ref, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.md"]))
    except Exception as err:  # noqa: BLE001 - hub / cache errors of any kind: one line
        raise FileNotFoundError(
            f"ADAPTER {adapter}: not a local directory and not available from the Hub or the local cache "
            f"({type(err).__name__}: {' '.join(str(err).split())[:200]})"
        ) from None
    return Path(resolve_source(str(path), "ADAPTER", "adapter")[0])


def read_adapter_config(directory: Path) -> dict:
    """The JSON of ``directory/adapter_config.json``, checked: readable JSON object with a ``peft_type`` this peft
    knows, and for a SPARSE_OPD adapter well-formed fields (``format_version``, ``save_dtype``, module metadata).

    Raises:
        ValueError / FileNotFoundError: naming the file, the field and the fix.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from ..tuner.files import check_adapter_config_fields, read_adapter_config_json

    path = directory / "adapter_config.json"
    data = read_adapter_config_json(path)
    kind = data["peft_type"]
    if not isinstance(kind, str) or kind not in {str(getattr(k, "value", k)) for k in PEFT_TYPE_TO_CONFIG_MAPPING}:
        raise ValueError(
            f"{path}: unknown peft_type {kind!r}; this peft knows {', '.join(sorted(map(str, PEFT_TYPE_TO_CONFIG_MAPPING)))}"
            " (upgrade peft for a newer method, or re-save the adapter)"
        )
    if kind == "SPARSE_OPD":
        check_adapter_config_fields(data, str(path))
    return data


def check_out_dir(out: Path, overwrite: bool) -> None:
    """``--out`` must be a new or empty directory, unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; pass a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--out {out} exists and is not empty; pass --overwrite to replace it or choose another --out"
        )


def missing_ancestors(path: Path) -> list[Path]:
    """``path`` and its parents that do not exist yet, outermost last."""
    out, p = [], path.absolute()
    while not p.exists():
        out.append(p)
        p = p.parent
    return out


def remove_created(created: list[Path]) -> None:
    """Remove the directories :func:`missing_ancestors` listed (removing the outermost, last, removes them all)."""
    import shutil

    if created:
        shutil.rmtree(created[-1], ignore_errors=True)


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out``; on success it replaces ``out`` as a whole, on failure it is
    removed together with any parent directory created for it (:func:`sparse_opd_peft.atomic.staged_directory`)."""
    from ..atomic import staged_directory

    with staged_directory(out) as tmp:
        yield tmp


def write_json(path: Path, data: Any) -> None:
    """Write JSON (indent 1, ``str`` for other objects) through a temporary file and an atomic rename."""
    from ..atomic import write_json_atomic

    write_json_atomic(path, data, indent=1, default=str)
