"""The model card (``README.md``) of a SparseOPD adapter.

:func:`save_adapter` (``sparse_opd_peft.save_adapter``) writes it with the adapter: peft's own card (tags, base model,
framework versions) plus a section between ``<!-- sparse_opd:card -->`` markers: base model and fingerprint, targeted
modules, density overall and per module type, mask provenance, bf16 visibility, diagnostics summary, training
recipe, file size and a usage snippet. Text outside the markers (the user's own) is kept on re-save.
:func:`write_model_card` adds / refreshes that section in any saved directory. Nothing of peft is patched: a plain
``model.save_pretrained`` writes peft's generic card, ``save_adapter`` / ``push_adapter`` write ours.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from .atomic import write_text_atomic
from .card_render import (
    CARD_BEGIN,
    CARD_END,
    PLACEHOLDER_REPO,
    RECIPE_KEYS,
    USAGE_BEGIN,
    USAGE_END,
    fingerprint_digest,
    human_bytes,
    render_adapter_section,
    render_card_block,
    render_usage,
    replace_block,
    set_card_repo,
)
from .diagnostics.catalog import card_keys
from .tuner.storage import adapter_file_bytes

__all__ = [  # the card's text is rendered in .card_render; its public names are importable from here too
    "CARD_BEGIN", "CARD_END", "USAGE_BEGIN", "USAGE_END", "PLACEHOLDER_REPO", "RECIPE_KEYS", "apply_card_data",
    "card_block_for_directory", "card_block_for_model", "fingerprint_digest", "human_bytes", "merge_card",
    "record_training", "render_adapter_section", "render_card_block", "render_usage", "replace_block",
    "save_adapter", "set_card_repo", "sparse_opd_adapters", "write_model_card",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------- recording
def sparse_opd_adapters(model) -> list[str]:
    """Names of the SparseOPD adapters of a ``PeftModel`` (or tuner) ``model``, in insertion order."""
    from .tuner.config import SparseOPDConfig

    configs = getattr(model, "peft_config", None) or {}
    return [name for name, cfg in configs.items() if isinstance(cfg, SparseOPDConfig)]


def _diagnostics_summary(diagnostics: Any) -> dict:
    """``DiagnosticsResult`` / its ``to_dict()`` / a summary dict -> the JSON-able Table-1 subset of the summary."""
    data = diagnostics.to_dict() if hasattr(diagnostics, "to_dict") else dict(diagnostics)
    summary = {**data.get("summary", data), **{k: data[k] for k in ("source", "tuned") if k in data}}
    out, keys = {}, card_keys()  # the metrics declared for the card in diagnostics.catalog
    for key in keys:
        value = summary.get(key)
        if isinstance(value, float) and value != value:  # NaN -> None (JSON)
            value = None
        if key in summary:
            out[key] = value if isinstance(value, (int, float, str, type(None))) else str(value)
    if not out:
        raise ValueError(f"diagnostics holds none of the summary keys {keys}; pass diagnose(...)'s result")
    return out


def record_training(model, recipe: Mapping[str, Any], adapter_name: str = "default", diagnostics: Any = None) -> dict:
    """Record the training recipe (and optionally a diagnostics summary) of a SparseOPD adapter for its model card.

    The recipe is merged into ``model.peft_config[adapter_name].training`` (JSON only), saved in
    ``adapter_config.json`` and rendered in ``README.md`` by the next :func:`save_adapter` / ``push_adapter``.

    Args:
        model: a ``PeftModel`` (or tuner) holding a SparseOPD adapter ``adapter_name``.
        recipe: JSON-able dict, e.g. ``{"loss": "sampled_token", "teacher": "Qwen/Qwen3-1.7B", "steps": 200,
            "optimizer": {"name": "adamw", "lr": 1e-4}}``; keys given again replace earlier values.
        adapter_name: which adapter.
        diagnostics: optional ``sparse_opd_peft.diagnostics.diagnose`` result (or its ``to_dict()`` / summary
            dict); its Table-1 summary is stored as ``training["diagnostics"]``.

    Returns:
        The adapter's full ``training`` dict after the update.

    Raises:
        ValueError: unknown / non-SparseOPD adapter, or a recipe that is not JSON data.
    """
    from .tuner.config import check_json_dict

    configs = getattr(model, "peft_config", None) or {}
    if adapter_name not in sparse_opd_adapters(model):
        raise ValueError(
            f"record_training: no SparseOPD adapter named {adapter_name!r} (adapters: {sorted(configs)}); pass "
            "adapter_name= of a SparseOPD adapter"
        )
    update = check_json_dict(dict(recipe), "record_training recipe")
    if diagnostics is not None:
        update["diagnostics"] = _diagnostics_summary(diagnostics)
    config = configs[adapter_name]
    config.training = {**(config.training or {}), **update}
    return config.training


def _hub_repo_id(name: Optional[str]) -> Optional[str]:
    """``name`` when it looks like a Hub repo id (not an existing local path), else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or os.path.exists(name) or name.count("/") > 1:
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def apply_card_data(card, base_model: Optional[str], tags: tuple[str, ...] = ()) -> None:
    """Set library / base model / tags of a ``huggingface_hub.ModelCard``; drop peft's empty base-model entries."""
    base = _hub_repo_id(base_model)
    card.data["library_name"] = "peft"
    old = [t for t in (card.data.get("tags") or []) if not t.startswith("base_model:adapter:")]
    extra = [f"base_model:adapter:{base}"] if base else []
    card.data["tags"] = sorted(set(old) | {"sparse_opd", "sparse-opd-peft", *tags, *extra})
    if base:
        card.data["base_model"] = base
    elif "base_model" in card.data.to_dict():
        card.data.pop("base_model")


def merge_card(existing: str, new: str) -> str:
    """Merge a freshly generated card ``new`` into an ``existing`` README: our block and metadata replace the old
    ones (tags are united), the rest of the existing text is kept."""
    from huggingface_hub import ModelCard

    old, cur = ModelCard(existing, ignore_metadata_errors=True), ModelCard(new, ignore_metadata_errors=True)
    begin, end = cur.text.find(CARD_BEGIN), cur.text.find(CARD_END)
    block = cur.text[begin : end + len(CARD_END)] if begin >= 0 and end > begin else cur.text
    for key, value in cur.data.to_dict().items():
        old.data[key] = sorted(set(old.data.get("tags") or []) | set(value)) if key == "tags" else value
    old.text = replace_block(old.text, block)
    return str(old.content)


def _weights_file(directory: str | os.PathLike, name: str) -> Path:
    """Where ``save_pretrained`` writes adapter ``name``'s weights: ``"default"`` at the root, others in a
    subfolder of their name."""
    return Path(directory) / ("" if name == "default" else name) / "adapter_model.safetensors"


def card_block_for_model(
    model,
    repo_id: Optional[str] = None,
    adapters: Optional[Sequence[str]] = None,
    directory: Optional[str | os.PathLike] = None,
) -> str:
    """Card block for the SparseOPD adapters ``adapters`` (default: all) of a ``PeftModel``: measures bf16
    visibility and the file size (that of the file ``directory`` holds when the model was just saved there, else
    computed from the model's state dict)."""
    from .tuner.model import bf16_visibility

    entries = []
    for name in sparse_opd_adapters(model) if adapters is None else adapters:
        weights = None if directory is None else _weights_file(directory, name)
        size = weights.stat().st_size if weights is not None and weights.is_file() else adapter_file_bytes(model, name)
        entries.append({"name": name, "config": model.peft_config[name], "base": _base_name(model),
                        "visibility": bf16_visibility(model, name), "file_bytes": size})  # fmt: skip
    return render_card_block(entries, repo_id)


def card_block_for_directory(directory: str | os.PathLike, configs: Mapping[str, Any], repo_id=None) -> str:
    """Card block for a saved adapter directory (``configs`` = ``{adapter_name: SparseOPDConfig}``; visibility is
    not measured since the base weights are not at hand)."""
    entries = []
    for name, config in configs.items():
        entries.append({"name": name, "config": config, "file_bytes": _weights_file(directory, name).stat().st_size})
    return render_card_block(entries, repo_id)


def write_model_card(
    model,
    output_dir: str | os.PathLike,
    fresh: Optional[bool] = None,
    *,
    adapters: Optional[Sequence[str]] = None,
    from_files: bool = False,
) -> Path:
    """Add / refresh the SparseOPD section of ``output_dir/README.md`` for a ``PeftModel`` just saved there.

    Args:
        model: the ``PeftModel`` holding SparseOPD adapter(s) (bf16 visibility is measured on it).
        output_dir: the directory ``model.save_pretrained`` wrote (its README.md is peft's card).
        fresh: True when there was no README before that save: peft's generic template text is then replaced by the
            section. Default: True when the README has no SparseOPD section yet and no text of its own.
        adapters: the SparseOPD adapters the section describes (default: all of the model's); the first one's base
            model goes into the card's metadata.
        from_files: build the section from the files saved in ``output_dir``
            (:func:`card_block_for_directory`: file sizes as written, bf16 visibility not measured) instead of
            measuring the model; for a sharded model, whose base weights are not at hand
            (:func:`sparse_opd_peft.distributed.save_sharded_adapter`).

    Returns:
        The README path.

    Raises:
        ValueError: no SparseOPD adapter to describe, or ``adapters`` names one the model does not have as SparseOPD.
    """
    import peft
    from huggingface_hub import ModelCard, ModelCardData

    from ._version import __version__

    known = sparse_opd_adapters(model)
    names = known if adapters is None else list(adapters)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"write_model_card: {unknown} are not SparseOPD adapters of this model (it has {known}); pass some of those"
        )
    if not names:
        raise ValueError(f"write_model_card: no SparseOPD adapter to describe (adapters: {adapters})")
    path = Path(output_dir) / "README.md"
    if not path.is_file():
        ModelCard.from_template(ModelCardData()).save(path)
        fresh = True
    card = ModelCard.load(path, ignore_metadata_errors=True)
    if fresh is None:
        fresh = CARD_BEGIN not in card.text and "More Information Needed" in card.text
    if from_files:
        block = card_block_for_directory(output_dir, {name: model.peft_config[name] for name in names})
    else:
        block = card_block_for_model(model, adapters=names, directory=output_dir)
    if fresh:
        card.text = f"{block}\n\n### Framework versions\n\n- PEFT {peft.__version__}\n- sparse_opd_peft {__version__}\n"
    else:
        card.text = replace_block(card.text, block)
    apply_card_data(card, model.peft_config[names[0]].base_model_name_or_path or _base_name(model))
    write_text_atomic(path, str(card.content))
    return path


class _SavesWithCard:
    """What :func:`save_adapter` (and :func:`sparse_opd_peft.distributed.save_sharded_adapter`) hands to the atomic
    saver: ``save_pretrained`` = peft's save (with ``save_kwargs`` added, e.g. a gathered ``state_dict``), then our
    card (``from_files``: from the written files, as :func:`write_model_card`)."""

    def __init__(self, model, save_kwargs: Optional[Mapping[str, Any]] = None, from_files: bool = False) -> None:
        self.model, self.save_kwargs, self.from_files = model, dict(save_kwargs or {}), from_files

    def save_pretrained(self, directory: str | os.PathLike, **kwargs) -> None:
        fresh = not (Path(directory) / "README.md").is_file()
        self.model.save_pretrained(directory, **self.save_kwargs, **kwargs)
        selected = kwargs.get("selected_adapters")
        names = [n for n in sparse_opd_adapters(self.model) if selected is None or n in selected]
        if not names:
            return
        try:
            write_model_card(self.model, directory, fresh, adapters=names, from_files=self.from_files)
        except Exception as err:  # noqa: BLE001 - a card problem must never lose the adapter being saved
            warnings.warn(f"could not write the SparseOPD model card ({type(err).__name__}: {err})", stacklevel=3)


def save_adapter(model, directory: str | os.PathLike, **kwargs) -> Path:
    """Save a ``PeftModel`` with SparseOPD adapter(s) and its model card, atomically.

    ``model.save_pretrained(directory, **kwargs)`` (``adapter_config.json``, ``adapter_model.safetensors``, named
    adapters in subfolders) plus :func:`write_model_card`, all staged in a temporary sibling directory that replaces
    ``directory`` in one swap (:func:`sparse_opd_peft.tuner.files.save_adapter`). A failure to write the card is a
    warning, never a lost adapter.

    Returns:
        ``directory`` as a ``Path``.
    """
    from .tuner.files import save_adapter as save_atomically

    return save_atomically(_SavesWithCard(model), directory, **kwargs)


def _base_name(model) -> Optional[str]:
    return getattr(getattr(model, "base_model", None), "model", model).__dict__.get("name_or_path") or None
