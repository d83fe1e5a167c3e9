"""The model card (``README.md``) of a SparseOPD adapter.

:func:`save_adapter` (``sparse_opd_peft.save_adapter``) writes it with the adapter: peft's own card (tags, base model,
framework versions) plus a section between ``<!-- sparse_opd:card -->`` markers: base model and fingerprint, targeted
modules, density overall and per module type, mask provenance, bf16 visibility, diagnostics summary, training
recipe, file size and a usage snippet. Text outside the markers (the user's own) is kept on re-save.
:func:`write_model_card` adds / refreshes that section in any saved directory. Nothing of peft is patched: a plain
``model.save_pretrained`` writes peft's generic card, ``save_adapter`` / ``push_adapter`` write ours.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from .atomic import write_text_atomic
from .module_types import MODULE_TYPES, layer_index, module_type
from .tuner.files import adapter_file_bytes

CARD_BEGIN, CARD_END = "<!-- sparse_opd:card -->", "<!-- /sparse_opd:card -->"
USAGE_BEGIN, USAGE_END = "<!-- sparse_opd:usage -->", "<!-- /sparse_opd:usage -->"
PLACEHOLDER_REPO = "your-org/your-sparse-opd-adapter"
RECIPE_KEYS = ("loss", "teacher", "steps", "optimizer")
DIAGNOSTIC_KEYS = (
    "source", "tuned", "n_matrices", "bf16_sparsity", "abs_sparsity", "relative_norm", "nss", "principal_angle_deg",
    "principal_overlap", "low_magnitude_overlap", "stable_rank", "top16_energy_share", "ffn_energy_share",
    "attention_energy_share",
)  # fmt: skip
_LAYER_SLOT = re.compile(r"((?:^|\.)(?:layers|h|blocks|layer)\.)(\d+)(?=\.|$)")


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
    out = {}
    for key in DIAGNOSTIC_KEYS:
        value = summary.get(key)
        if isinstance(value, float) and value != value:  # NaN -> None (JSON)
            value = None
        if key in summary:
            out[key] = value if isinstance(value, (int, float, str, type(None))) else str(value)
    if not out:
        raise ValueError(f"diagnostics holds none of the summary keys {DIAGNOSTIC_KEYS}; pass diagnose(...)'s result")
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


# ---------------------------------------------------------------------------------------------------- measuring
def fingerprint_digest(fingerprint: Mapping[str, Mapping]) -> str:
    """Short (16 hex) digest of a whole adapter fingerprint ``{module: {"shape", "dtype", "sample_sha256", ...}}``."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def _visibility_by_type(visibility: Mapping) -> dict[str, float]:
    rows: dict[str, list[int]] = {}
    for name, row in visibility.get("modules", {}).items():
        acc = rows.setdefault(module_type(name), [0, 0])
        acc[0] += row["coords"]
        acc[1] += row["visible"]
    return {t: v / c for t, (c, v) in rows.items() if c}


# ---------------------------------------------------------------------------------------------------- rendering
def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.3g}%"


def _num(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:.4g}"
    return f"`{x}`" if isinstance(x, str) else f"`{json.dumps(x)}`"


def human_bytes(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"``; ``300`` -> ``"300 B"``."""
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{n} B" if unit == "B" else f"{value:.3g} {unit}"


def _ranges(values: list[int]) -> str:
    values, parts, start = sorted(values), [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


def _module_groups(config) -> list[tuple[str, str, int, int]]:
    """Module names grouped over layers: ``[(pattern, layers, nnz, numel)]``."""
    groups: dict[str, list] = {}
    for name, (out_f, in_f) in sorted(config.module_shapes.items()):
        pattern = _LAYER_SLOT.sub(r"\g<1>*", name, count=1)
        g = groups.setdefault(pattern, [[], 0, 0])
        if layer_index(name) is not None:
            g[0].append(layer_index(name))
        g[1] += int(config.module_nnz.get(name, 0))
        g[2] += out_f * in_f
    return [(p, _ranges(g[0]) or "-", g[1], g[2]) for p, g in groups.items()]


def _type_rows(config) -> list[str]:
    rows, total = [], [0, 0, 0]
    for kind in MODULE_TYPES:
        names = [n for n in config.module_shapes if module_type(n) == kind]
        if names:
            nnz = sum(int(config.module_nnz.get(n, 0)) for n in names)
            numel = sum(config.module_shapes[n][0] * config.module_shapes[n][1] for n in names)
            rows.append(f"| {kind} | {len(names)} | {nnz:,} | {numel:,} | {_pct(nnz / numel)} |")
            total = [total[0] + len(names), total[1] + nnz, total[2] + numel]
    rows.append(f"| **all** | {total[0]} | {total[1]:,} | {total[2]:,} | {_pct(total[1] / max(total[2], 1))} |")
    return rows


def render_usage(repo_id: Optional[str], base_model: Optional[str], extra_adapters: tuple[str, ...] = ()) -> str:
    """The usage snippet (between usage markers) for adapter repo / directory ``repo_id``."""
    base = f'"{base_model}"' if base_model else "...  # the base model this adapter was trained on"
    lines = [
        USAGE_BEGIN, "```python", "import sparse_opd_peft  # noqa: F401  (registers the SPARSE_OPD method with peft)",
        "from peft import AutoPeftModelForCausalLM, PeftModel", "from transformers import AutoModelForCausalLM", "",
        f'adapter = "{repo_id or PLACEHOLDER_REPO}"  # Hub repo id or local directory of this adapter',
        "model = AutoPeftModelForCausalLM.from_pretrained(adapter)  # loads the base model recorded in the adapter",
        "# or onto a base you loaded yourself (the base-model fingerprint is checked first):",
        f"base = AutoModelForCausalLM.from_pretrained({base})", "model = PeftModel.from_pretrained(base, adapter)",
    ]  # fmt: skip
    lines += [f'model.load_adapter(adapter, adapter_name="{a}", subfolder="{a}")' for a in extra_adapters]
    lines += ["merged = model.merge_and_unload()  # a plain transformers model: W <- W + ΔW, one rounding", "```",
              "Needs `pip install sparse_opd_peft`; `sparse-opd inspect ADAPTER` describes a downloaded copy.",
              USAGE_END]  # fmt: skip
    return "\n".join(lines)


def render_adapter_section(
    config, *, visibility: Optional[Mapping] = None, file_bytes: Optional[int] = None, subfolder: Optional[str] = None,
    level: int = 2, base_model: Optional[str] = None,
) -> str:  # fmt: skip
    """Markdown sections describing one SparseOPD adapter from its config (plus measured visibility / file size).

    Args:
        config: the adapter's ``SparseOPDConfig`` (metadata only is read).
        visibility: ``bf16_visibility(model, name)`` output, or None when the base weights are not at hand.
        file_bytes: size of ``adapter_model.safetensors``.
        subfolder: the adapter's subfolder (peft saves non-default adapters under their name).
        level: heading level of the sections.
        base_model: base model name when ``config.base_model_name_or_path`` is not set yet.
    """
    h = "#" * level
    base = config.base_model_name_or_path or base_model
    nnz = sum(int(v) for v in config.module_nnz.values())
    fp = config.fingerprint or {}
    dtypes = sorted({str(v.get("dtype")) for v in fp.values()})
    full = any(v.get("full_sha256") for v in fp.values())
    out = [f"{h} Base model", "", f"- Base model: `{base}`" if base else "- Base model: not recorded",
           f"- Fingerprint: `{fingerprint_digest(fp)}` over {len(fp)} weights (SHA-256 of the bf16 bit patterns of "
           f"{'every entry' if full else 'a fixed strided sample'}; base dtype {', '.join(dtypes) or 'n/a'}). "
           "`PeftModel.from_pretrained` refuses a base whose weights differ; pass a config with "
           "`check_fingerprint=False` to override.", "",
           f"{h} Targeted modules and density", "",
           f"{nnz:,} trained coordinates in {len(config.module_shapes)} Linear weights, density {_pct(config.density)} "
           "of their entries. Module types: FFN = MLP projections, attention = q/k/v/o projections.", "",
           "| module type | weights | trained coordinates | weight entries | density |", "|---|---:|---:|---:|---:|",
           *_type_rows(config), "", "| modules | layers | coordinates | density |", "|---|---|---:|---:|"]  # fmt: skip
    out += [f"| `{p}` | {layers} | {n:,} | {_pct(n / numel)} |" for p, layers, n, numel in _module_groups(config)]
    if config.module_rank:
        ranks = sorted(set(config.module_rank.values()))
        out += ["", f"Plus a fixed subspace (rank {', '.join(map(str, ranks))}) on {len(config.module_rank)} modules: "
                "ΔW += coeff @ basisᵀ."]  # fmt: skip
    meta = config.mask_metadata or {}
    out += ["", f"{h} How the mask was made", ""]
    first = [k for k in ("source", "tuned", "predictor", "rule", "density", "achieved_density") if k in meta]
    out += [f"- {k}: {_num(meta[k])}" for k in first + sorted(set(meta) - set(first)) if k != "diagnostics"]
    if not meta:
        out.append("Not recorded (the mask was given as plain tensors, without provenance metadata).")
    out += ["", f"{h} bf16 visibility of the trained delta", ""]
    if visibility and visibility.get("coords"):
        by_type = ", ".join(f"{t} {_pct(s)}" for t, s in _visibility_by_type(visibility).items())
        out.append(f"{_pct(visibility['share'])} of the {visibility['coords']:,} trained coordinates change their "
                   f"bf16 weight when merged (`bf16(W0 + ΔW) != bf16(W0)`); by type: {by_type}. Measured when the "
                   "card was written (0% means the adapter was still at its zero initialisation).")  # fmt: skip
    else:
        out.append("Not measured (the card was written without the base weights).")
    training = dict(config.training or {})
    diagnostics = training.pop("diagnostics", None) or meta.get("diagnostics")
    if diagnostics:
        out += ["", f"{h} Diagnostics of the checkpoint pair", "", "| metric | value |", "|---|---:|"]
        out += [f"| {k} | {_num(v)} |" for k, v in diagnostics.items()]
    out += ["", f"{h} Training recipe", ""]
    out += [f"- {k}: {_num(training[k]) if k in training else 'not recorded'}" for k in RECIPE_KEYS]
    out += [f"- {k}: {_num(v)}" for k, v in training.items() if k not in RECIPE_KEYS]
    if not training:
        out.append("\n(Record it with `sparse_opd_peft.record_training(model, {...})` before saving.)")
    weights = f"{subfolder}/adapter_model.safetensors" if subfolder else "adapter_model.safetensors"
    size = f"{file_bytes:,} bytes ({human_bytes(file_bytes)})" if file_bytes is not None else "n/a"
    out += ["", f"{h} Files", "", "| file | size | content |", "|---|---:|---|",
            f"| `{weights}` | {size} | values ({config.save_dtype}) and coordinates (bitmask or int32 indices) |",
            f"| `{weights.replace('adapter_model.safetensors', 'adapter_config.json')}` | small | JSON metadata: "
            "per-module nnz and shapes, densities, mask provenance, fingerprint, recipe |"]  # fmt: skip
    return "\n".join(out)


def render_card_block(entries: list[dict], repo_id: Optional[str] = None) -> str:
    """The whole marked card block for ``entries`` = ``[{"name", "config", "visibility", "file_bytes", "base"}]``
    (``visibility``, ``file_bytes`` and ``base`` optional)."""
    first = entries[0]["config"]
    base = first.base_model_name_or_path or entries[0].get("base")
    nnz = sum(int(v) for v in first.module_nnz.values())
    lines = [CARD_BEGIN, f"# SparseOPD adapter{' of `' + base + '`' if base else ''}", "",
             "A sparse on-policy-distillation adapter (peft method `SPARSE_OPD`, package `sparse_opd_peft`): it trains "
             f"exactly {nnz:,} chosen coordinates of the base model's Linear weights (density {_pct(first.density)}) "
             "and nothing else, so merging it changes the base only there.", "", "## Usage", "",
             render_usage(repo_id, base, tuple(e["name"] for e in entries[1:])), ""]  # fmt: skip
    for entry in entries:
        sub = None if entry["name"] == "default" else entry["name"]
        if len(entries) > 1:
            lines += [f"## Adapter `{entry['name']}`" + (f" (subfolder `{sub}/`)" if sub else ""), ""]
        lines += [render_adapter_section(entry["config"], visibility=entry.get("visibility"),
                                         file_bytes=entry.get("file_bytes"), subfolder=sub, base_model=base,
                                         level=3 if len(entries) > 1 else 2), ""]  # fmt: skip
    return "\n".join(lines + [CARD_END])


def set_card_repo(text: str, repo_id: str) -> str:
    """Point the usage snippet of a card text at ``repo_id`` (done on push; the text is otherwise unchanged)."""
    begin, end = text.find(USAGE_BEGIN), text.find(USAGE_END)
    if begin < 0 or end < begin:
        return text
    usage = re.sub(r'(?m)^adapter = "[^"\n]*"', lambda _: f'adapter = "{repo_id}"', text[begin:end])
    return text[:begin] + usage + text[end:]


def replace_block(text: str, block: str) -> str:
    """``text`` with its marked sparse_opd block replaced by ``block`` (inserted at the top when absent)."""
    begin, end = text.find(CARD_BEGIN), text.find(CARD_END)
    if begin >= 0 and end > begin:
        return text[:begin] + block + text[end + len(CARD_END) :]
    return block + "\n\n" + text.lstrip("\n")


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


def card_block_for_model(model, repo_id: Optional[str] = None) -> str:
    """Card block for every SparseOPD adapter of a ``PeftModel``: measures bf16 visibility and the file size."""
    from .tuner.model import bf16_visibility

    entries = []
    for name in sparse_opd_adapters(model):
        entries.append({"name": name, "config": model.peft_config[name], "base": _base_name(model),
                        "visibility": bf16_visibility(model, name), "file_bytes": adapter_file_bytes(model, name)})  # fmt: skip
    return render_card_block(entries, repo_id)


def card_block_for_directory(directory: str | os.PathLike, configs: Mapping[str, Any], repo_id=None) -> str:
    """Card block for a saved adapter directory (``configs`` = ``{adapter_name: SparseOPDConfig}``; visibility is
    not measured since the base weights are not at hand)."""
    directory = Path(directory)
    entries = []
    for name, config in configs.items():
        weights = directory / ("" if name == "default" else name) / "adapter_model.safetensors"
        entries.append({"name": name, "config": config, "file_bytes": weights.stat().st_size})
    return render_card_block(entries, repo_id)


def write_model_card(model, output_dir: str | os.PathLike, fresh: Optional[bool] = None) -> Path:
    """Add / refresh the SparseOPD section of ``output_dir/README.md`` for a ``PeftModel`` just saved there.

    Args:
        model: the ``PeftModel`` holding SparseOPD adapter(s) (bf16 visibility is measured on it).
        output_dir: the directory ``model.save_pretrained`` wrote (its README.md is peft's card).
        fresh: True when there was no README before that save: peft's generic template text is then replaced by the
            section. Default: True when the README has no SparseOPD section yet and no text of its own.

    Returns:
        The README path.
    """
    import peft
    from huggingface_hub import ModelCard, ModelCardData

    from ._version import __version__

    path = Path(output_dir) / "README.md"
    if not path.is_file():
        ModelCard.from_template(ModelCardData()).save(path)
        fresh = True
    card = ModelCard.load(path, ignore_metadata_errors=True)
    if fresh is None:
        fresh = CARD_BEGIN not in card.text and "More Information Needed" in card.text
    block = card_block_for_model(model)
    if fresh:
        card.text = f"{block}\n\n### Framework versions\n\n- PEFT {peft.__version__}\n- sparse_opd_peft {__version__}\n"
    else:
        card.text = replace_block(card.text, block)
    apply_card_data(card, model.peft_config[sparse_opd_adapters(model)[0]].base_model_name_or_path or _base_name(model))
    write_text_atomic(path, str(card.content))
    return path


class _SavesWithCard:
    """What :func:`save_adapter` hands to the atomic saver: ``save_pretrained`` = peft's save, then our card."""

    def __init__(self, model) -> None:
        self.model = model

    def save_pretrained(self, directory: str | os.PathLike, **kwargs) -> None:
        fresh = not (Path(directory) / "README.md").is_file()
        self.model.save_pretrained(directory, **kwargs)
        if not sparse_opd_adapters(self.model):
            return
        try:
            write_model_card(self.model, directory, fresh)
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
