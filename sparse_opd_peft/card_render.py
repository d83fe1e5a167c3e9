"""The markdown of a SparseOPD adapter's model-card section, rendered from its config alone (no model, no I/O).

:mod:`sparse_opd_peft.model_card` measures what needs the model (bf16 visibility, file size) and writes the card;
this module turns a ``SparseOPDConfig`` plus those measurements into the text between the card markers: base model
and fingerprint, targeted modules and density per module type, mask provenance, bf16 visibility, diagnostics, the
training recipe, files, and the usage snippet.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any, Optional

from .module_types import layer_index, module_type, stats_by_type

CARD_BEGIN, CARD_END = "<!-- sparse_opd:card -->", "<!-- /sparse_opd:card -->"
USAGE_BEGIN, USAGE_END = "<!-- sparse_opd:usage -->", "<!-- /sparse_opd:usage -->"
PLACEHOLDER_REPO = "your-org/your-sparse-opd-adapter"
RECIPE_KEYS = ("loss", "teacher", "steps", "optimizer")
_LAYER_SLOT = re.compile(r"((?:^|\.)(?:layers|h|blocks|layer)\.)(\d+)(?=\.|$)")


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
    counts = {n: {"nnz": int(config.module_nnz.get(n, 0)), "numel": out_f * in_f}
              for n, (out_f, in_f) in config.module_shapes.items()}  # fmt: skip
    stats = [(kind, agg) for kind, agg in stats_by_type(counts).items() if agg["modules"]]
    rows = [f"| {k} | {a['modules']} | {a['nnz']:,} | {a['numel']:,} | {_pct(a['density'])} |" for k, a in stats]
    total = [sum(a[key] for _, a in stats) for key in ("modules", "nnz", "numel")]
    rows.append(f"| **all** | {total[0]} | {total[1]:,} | {total[2]:,} | {_pct(total[1] / max(total[2], 1))} |")
    return rows


def render_usage(
    repo_id: Optional[str], base_model: Optional[str], extra_adapters: tuple[str, ...] = (), first: str = "default"
) -> str:
    """The usage snippet (between usage markers) for adapter repo / directory ``repo_id``: ``first`` is the adapter
    loaded first, ``extra_adapters`` the others (peft saves ``"default"`` at the root and any other adapter in a
    subfolder of its name)."""
    base = f'"{base_model}"' if base_model else "...  # the base model this adapter was trained on"
    where = "" if first == "default" else f', subfolder="{first}", adapter_name="{first}"'
    lines = [
        USAGE_BEGIN, "```python", "import sparse_opd_peft  # noqa: F401  (registers the SPARSE_OPD method with peft)",
        "from peft import " + ("AutoPeftModelForCausalLM, PeftModel" if first == "default" else "PeftModel"),
        "from transformers import AutoModelForCausalLM", "",
        f'adapter = "{repo_id or PLACEHOLDER_REPO}"  # Hub repo id or local directory of this adapter',
    ]  # fmt: skip
    if first == "default":
        lines += ["model = AutoPeftModelForCausalLM.from_pretrained(adapter)  # loads the base model recorded in the adapter",
                  "# or onto a base you loaded yourself (the base-model fingerprint is checked first):"]  # fmt: skip
    else:  # AutoPeftModel would pass subfolder= on to the base model's from_pretrained too
        lines += [
            f"# the adapter is in the subfolder {first}/: load the base yourself (the fingerprint is checked first)"
        ]
    lines += [
        f"base = AutoModelForCausalLM.from_pretrained({base})",
        f"model = PeftModel.from_pretrained(base, adapter{where})",
    ]
    lines += [
        f'model.load_adapter(adapter, adapter_name="{a}"' + ("" if a == "default" else f', subfolder="{a}"') + ")"
        for a in extra_adapters
    ]
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
    (``visibility``, ``file_bytes`` and ``base`` optional); ``"default"`` (saved at the root) is described first."""
    entries = sorted(entries, key=lambda e: e["name"] != "default")  # stable: the others keep their order
    first = entries[0]["config"]
    base = first.base_model_name_or_path or entries[0].get("base")
    nnz = sum(int(v) for v in first.module_nnz.values())
    lines = [CARD_BEGIN, f"# SparseOPD adapter{' of `' + base + '`' if base else ''}", "",
             "A sparse on-policy-distillation adapter (peft method `SPARSE_OPD`, package `sparse_opd_peft`): it trains "
             f"exactly {nnz:,} chosen coordinates of the base model's Linear weights (density {_pct(first.density)}) "
             "and nothing else, so merging it changes the base only there.", "", "## Usage", "",
             render_usage(repo_id, base, tuple(e["name"] for e in entries[1:]), entries[0]["name"]), ""]  # fmt: skip
    for entry in entries:
        sub = None if entry["name"] == "default" else entry["name"]
        if len(entries) > 1 or sub:
            lines += [f"## Adapter `{entry['name']}`" + (f" (subfolder `{sub}/`)" if sub else ""), ""]
        lines += [render_adapter_section(entry["config"], visibility=entry.get("visibility"),
                                         file_bytes=entry.get("file_bytes"), subfolder=sub, base_model=base,
                                         level=3 if len(entries) > 1 or sub else 2), ""]  # fmt: skip
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
