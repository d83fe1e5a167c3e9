"""Map parameter / module names to module types (``ffn``, ``attention``, ``other``) and layer indices.

The defaults cover Qwen / Llama / Mistral / Gemma-style names (``model.layers.3.mlp.up_proj``,
``model.layers.3.self_attn.q_proj``) plus common GPT-2 / NeoX / Falcon spellings. Users with other
architectures pass an override: an ordered ``{regex: type}`` mapping that is tried before the defaults.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

MODULE_TYPES = ("ffn", "attention", "other")

_DEFAULT_RULES: tuple[tuple[str, str], ...] = (
    (r"(^|\.)(mlp|feed_forward|ffn|block_sparse_moe|experts)(\.|$)", "ffn"),
    (r"(^|\.)(gate_proj|up_proj|down_proj|fc1|fc2|w1|w2|w3|c_fc|dense_h_to_4h|dense_4h_to_h)$", "ffn"),
    (r"(^|\.)(self_attn|attention|attn|cross_attn)(\.|$)", "attention"),
    (r"(^|\.)(q_proj|k_proj|v_proj|o_proj|qkv_proj|query_key_value|c_attn|out_proj)$", "attention"),
)

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


def module_type(name: str, overrides: Mapping[str, str] | None = None) -> str:
    """Return ``"ffn"``, ``"attention"`` or ``"other"`` for a module or parameter name.

    Args:
        name: a dotted name such as ``model.layers.0.mlp.up_proj`` (a trailing ``.weight`` is ignored).
        overrides: optional ordered ``{regex: type}`` rules tried first (``re.search`` semantics).

    Raises:
        ValueError: when an override maps to a type outside ``MODULE_TYPES``.
    """
    base = name[: -len(".weight")] if name.endswith(".weight") else name
    for pattern, kind in list((overrides or {}).items()) + list(_DEFAULT_RULES):
        if kind not in MODULE_TYPES:
            raise ValueError(f"module type override {pattern!r} -> {kind!r}: type must be one of {MODULE_TYPES}")
        if re.search(pattern, base):
            return kind
    return "other"


def layer_index(name: str) -> int | None:
    """Return the transformer block index in a dotted name (``model.layers.7.mlp.up_proj`` -> 7), or None."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def stats_by_type(
    rows: Mapping[str, Mapping[str, int]],
    keys: tuple[str, ...] = ("nnz", "numel"),
    overrides: Mapping[str, str] | None = None,
) -> dict[str, dict]:
    """Per module type, the one place coordinate counts are aggregated by type.

    Args:
        rows: ``{module name: {"nnz": int, "numel": int, ...}}``; keys: the per-module counts to sum;
            overrides: module-type rules as in :func:`module_type`.

    Returns:
        ``{type: {"modules", *keys}}`` for every type in :data:`MODULE_TYPES`; when ``keys`` holds ``"nnz"`` and
        ``"numel"``, also ``"density"`` (nnz / numel, 0 without modules) and ``"share_of_nnz"`` (of all rows' nnz).
    """
    out = {t: {"modules": 0, **dict.fromkeys(keys, 0)} for t in MODULE_TYPES}
    for name, row in rows.items():
        agg = out[module_type(name, overrides)]
        agg["modules"] += 1
        for k in keys:
            agg[k] += row[k]
    if "nnz" not in keys or "numel" not in keys:
        return out
    total = sum(agg["nnz"] for agg in out.values())
    for agg in out.values():
        agg["density"] = agg["nnz"] / agg["numel"] if agg["numel"] else 0.0
        agg["share_of_nnz"] = agg["nnz"] / total if total else 0.0
    return out
