"""Tensor sources: read a model's weights one tensor at a time.

A source is a model directory (``model.safetensors`` or a sharded ``model.safetensors.index.json``), a single
``.safetensors`` file, a Hub id (``org/name`` or ``org/name@revision``, resolved with
``huggingface_hub.snapshot_download``; ``HF_HUB_OFFLINE=1`` uses the local cache only) or an in-memory plain
``torch.nn.Module`` (its ``named_parameters``; PEFT-wrapped models are not unwrapped - merge them first).
Tensors are read with ``safetensors.safe_open`` one at a time, so two whole models are never in memory.

Which weights are analysed: by default the 2-D ``*.weight`` tensors inside numbered transformer blocks
(``model.layers.<i>.``), excluding norms and embeddings - i.e. the blocks' Linear layers. ``modules`` narrows that:
a regex string (``re.search`` on the module name) or an explicit list of module names.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..module_types import layer_index

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")
_EXCLUDE = re.compile(r"(^|\.)(embed\w*|wte|wpe|lm_head|\w*norm\w*|ln_\w*)(\.|$)")


class TensorSource:
    """Read-only access to named tensors; subclasses implement ``_load``. Use as a context manager."""

    label: str = "?"

    def __init__(self) -> None:
        self._shapes: dict[str, tuple[int, ...]] = {}

    def names(self) -> list[str]:
        """All tensor names, in storage order."""
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` without loading it."""
        return self._shapes[name]

    def location(self, name: str) -> str:
        """Where tensor ``name`` lives (a file path, for error messages)."""
        return self.label

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (stored dtype, CPU for files). Raises ``KeyError`` for unknown names."""
        if name not in self._shapes:
            raise KeyError(f"{self.label}: no tensor named '{name}'")
        return self._load(name)

    def _load(self, name: str) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        """Release open file handles."""

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label!r}, {len(self._shapes)} tensors)"


class SafetensorsSource(TensorSource):
    """Tensors of one or more safetensors files (a directory, a sharded index or a single file)."""

    def __init__(self, path: str | os.PathLike, label: str | None = None):
        super().__init__()
        path = Path(path)
        self.label = label or str(path)
        self._files: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        for file, names in _shard_map(path).items():
            handle = self._open(file)
            for name in names if names is not None else handle.keys():
                try:
                    self._shapes[name] = tuple(handle.get_slice(name).get_shape())
                except SafetensorError as err:
                    raise ValueError(f"{file}: tensor '{name}' listed in the index is missing ({err})") from None
                self._files[name] = file

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as err:
                raise ValueError(
                    f"{file}: not a readable safetensors file ({err}); it is truncated or corrupt - re-save or "
                    "re-download it"
                ) from None
        return self._handles[file]

    def location(self, name: str) -> str:
        return str(self._files.get(name, self.label))

    def _load(self, name: str) -> torch.Tensor:
        try:
            return self._open(self._files[name]).get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise ValueError(
                f"{self._files[name]}: cannot read tensor '{name}' ({err}); re-save the checkpoint"
            ) from None

    def close(self) -> None:
        self._handles.clear()


def _shard_map(path: Path) -> dict[Path, list[str] | None]:
    """``{file: tensor names (None = all)}`` for a directory, an index json or a single safetensors file."""
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _read_index(path)
        return {path: None}
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if (path / "model.safetensors.index.json").is_file():
        return _read_index(path / "model.safetensors.index.json")
    if (path / "model.safetensors").is_file():
        return {path / "model.safetensors": None}
    files = sorted(path.glob("*.safetensors"))
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        return _read_index(indexes[0])
    if len(files) == 1:
        return {files[0]: None}
    other = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")]
    hint = f" (found {', '.join(other[:3])})" if other else ""
    raise FileNotFoundError(
        f"{path}: no model.safetensors or model.safetensors.index.json{hint}; save the model with "
        "`save_pretrained(dir)` (safetensors) or pass the .safetensors file"
    )


def _read_index(index: Path) -> dict[Path, list[str]]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index}: not a valid safetensors index ({err}); re-save the checkpoint") from None
    shards: dict[Path, list[str]] = {}
    for name, file in weight_map.items():
        shards.setdefault(index.parent / file, []).append(name)
    missing = [str(f) for f in shards if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: shard listed in {index} is missing; re-download the checkpoint")
    return shards


class ModuleSource(TensorSource):
    """Parameters of an in-memory ``torch.nn.Module`` (no copies; tensors stay on their device)."""

    def __init__(self, model: torch.nn.Module, label: str | None = None):
        super().__init__()
        self.label = label or f"<in-memory {type(model).__name__}>"
        if hasattr(model, "peft_config") or any(".base_layer." in n for n, _ in model.named_parameters()):
            raise ValueError(
                f"{self.label} is a PEFT-wrapped model; pass a plain model (e.g. model.merge_and_unload() or the base "
                "model), or save it and pass the directory"
            )
        self._params = dict(model.named_parameters())
        for name, p in self._params.items():
            if p.device.type == "meta":
                raise ValueError(f"{self.label}: parameter '{name}' is on the meta device; load real weights first")
            self._shapes[name] = tuple(p.shape)

    def _load(self, name: str) -> torch.Tensor:
        return self._params[name].detach()


def resolve_hub(repo_id: str) -> Path:
    """Local snapshot folder of a Hub model (``org/name`` or ``org/name@revision``), safetensors + json only.

    Honors ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE`` as set when called.
    """
    from huggingface_hub import snapshot_download

    repo, _, revision = repo_id.partition("@")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    try:
        folder = snapshot_download(
            repo,
            revision=revision or None,
            allow_patterns=["*.safetensors", "*.json"],
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
            local_files_only=offline,
        )
    except Exception as err:  # huggingface_hub raises many types (offline, 404, auth, network)
        raise FileNotFoundError(
            f"{repo_id}: not a local path and not available from the Hub or the local Hub cache "
            f"({type(err).__name__}); pass a model directory, or download it first (HF_HUB_OFFLINE=1 uses the cache)"
        ) from None
    return Path(folder)


def open_source(obj) -> TensorSource:
    """Open a model directory, a ``.safetensors`` file or index, a Hub id, an ``nn.Module`` or a ``TensorSource``."""
    if isinstance(obj, TensorSource):
        return obj
    if isinstance(obj, torch.nn.Module):
        return ModuleSource(obj)
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj).expanduser()
        if path.exists():
            return SafetensorsSource(path)
        if isinstance(obj, str) and _HUB_ID.match(obj):
            return SafetensorsSource(resolve_hub(obj), label=obj)
        raise FileNotFoundError(
            f"{obj}: no such file or directory; pass a model directory (model.safetensors), a .safetensors file or a "
            "Hub id (org/name)"
        )
    raise TypeError(f"cannot read weights from {type(obj).__name__}; pass a path, a Hub id or an nn.Module")


def module_name(param: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj``."""
    return param[: -len(".weight")] if param.endswith(".weight") else param


def is_block_linear(name: str, shape: Sequence[int]) -> bool:
    """Default selection: a 2-D ``*.weight`` inside a numbered block that is not a norm or an embedding."""
    return (
        name.endswith(".weight")
        and len(shape) == 2
        and layer_index(name) is not None
        and not _EXCLUDE.search(module_name(name))
    )


def select_weights(source: TensorSource, modules: str | Iterable[str] | None = None) -> list[str]:
    """Parameter names (``*.weight``) to analyse in ``source``.

    Args:
        source: an open source. modules: None (block Linears), a regex (narrows the block Linears with
            ``re.search`` on the module name) or a list of exact module names (any 2-D weight, ``.weight`` optional).

    Raises:
        ValueError: when a listed module is missing or not 2-D, the regex is invalid, or nothing is selected.
    """
    if modules is None or isinstance(modules, str):
        try:
            pattern = re.compile(modules) if modules else None
        except re.error as err:
            raise ValueError(f"--modules {modules!r} is not a valid regular expression ({err})") from None
        names = [n for n in source.names() if is_block_linear(n, source.shape(n))]
        if pattern is not None:
            names = [n for n in names if pattern.search(module_name(n))]
        if not names:
            what = f"matching {modules!r}" if modules else "(2-D Linear weights inside numbered transformer blocks)"
            raise ValueError(f"{source.label}: no weights {what}; check the path or pass --modules with a regex")
        return names
    names = []
    for mod in modules:
        param = mod if mod.endswith(".weight") else f"{mod}.weight"
        if param not in source.names():
            raise ValueError(
                f"{source.label}: no module '{module_name(param)}'; list names as in model.named_modules()"
            )
        if len(source.shape(param)) != 2:
            raise ValueError(
                f"{source.label}: '{param}' has shape {source.shape(param)}; only 2-D weights are analysed"
            )
        names.append(param)
    if not names:
        raise ValueError("modules is an empty list; pass None for all block Linear layers")
    return names


def paired_weights(source: TensorSource, tuned: TensorSource, modules: str | Iterable[str] | None = None) -> list[str]:
    """Weights selected in ``source`` that ``tuned`` must also contain with the same shape.

    Raises:
        ValueError: naming the module and both files when a weight is missing or shapes differ, or when the default
            selections of the two checkpoints differ (different architectures).
    """
    names = select_weights(source, modules)
    if modules is None or isinstance(modules, str):
        known = set(names)
        extra = [n for n in select_weights(tuned, modules) if n not in known]
        if extra:
            raise ValueError(
                f"{tuned.label} has weight '{extra[0]}' that {source.label} lacks; the checkpoints have different "
                "architectures - compare checkpoints of the same model (or narrow with --modules)"
            )
    for n in names:
        if n not in tuned._shapes:
            raise ValueError(
                f"{tuned.label} lacks weight '{n}' present in {source.label}; the checkpoints have different "
                "architectures - compare checkpoints of the same model (or narrow with --modules)"
            )
        if tuned.shape(n) != source.shape(n):
            raise ValueError(
                f"{tuned.location(n)}: '{n}' has shape {tuned.shape(n)} but {source.location(n)} has "
                f"{source.shape(n)}; compare checkpoints of the same architecture"
            )
    return names
