"""``sparse-opd merge`` as a library function: fold an adapter into its base and save a plain transformers model."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .report import merge_summary, sparse_adapter_config
from .sources import (
    adapter_dir,
    check_out_dir,
    has_tokenizer,
    load_causal_lm,
    load_tokenizer,
    read_adapter_config,
    resolve_source,
    staged_dir,
    torch_dtype,
)


@dataclass
class MergeResult:
    """What :func:`merge_adapter` wrote: ``out``, its ``dtype`` (e.g. ``"bfloat16"``), whether a tokenizer was saved,
    the adapter's peft ``kind``, a one-line ``summary`` and ``lost``: the "merging lost ..." warnings worth showing
    (only when the merged model is bf16)."""

    out: Path
    dtype: str
    tokenizer: bool
    kind: str
    summary: str
    lost: list[str] = field(default_factory=list)


def _stored_dtype(ref: str, revision: Optional[str], trust_remote_code: bool):
    import torch
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(ref, revision=revision, trust_remote_code=trust_remote_code)
    value = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def _adapter_config(directory: Path, skip_fingerprint_check: bool):
    """``(peft_type, config)`` of a checked adapter directory."""
    kind = read_adapter_config(directory)["peft_type"]
    if kind == "SPARSE_OPD":
        config = sparse_adapter_config(directory, "ADAPTER")
        config.check_fingerprint = not skip_fingerprint_check
        return kind, config
    from peft import PeftConfig

    return kind, PeftConfig.from_pretrained(str(directory))


def _base_and_tokenizer(base: str, target, tokenizer: Optional[str], trust_remote_code: bool):
    """Load the base model (in its stored dtype when no cast is asked or it is stored in ``target``, else in float32
    so that the merge rounds once) and its tokenizer (``tokenizer``, else the base's if it has one)."""
    import torch

    ref, revision = resolve_source(base, "BASE")
    keep = target is None or _stored_dtype(ref, revision, trust_remote_code) == target
    base_model = load_causal_lm(base, "BASE", "auto" if keep else torch.float32, trust_remote_code)
    tok = None
    if tokenizer or has_tokenizer(base):
        try:
            tok = load_tokenizer(tokenizer or base, "--tokenizer" if tokenizer else "BASE", trust_remote_code)
        except (OSError, ValueError):
            if tokenizer or Path(base).expanduser().is_dir():
                raise
    return base_model, tok


def merge_adapter(
    base: str,
    adapter: str,
    out: Path,
    *,
    dtype: str = "auto",
    tokenizer: Optional[str] = None,
    skip_fingerprint_check: bool = False,
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> MergeResult:
    """Fold ``adapter`` (directory or Hub id; any peft method) into ``base`` and save the merged model (safetensors,
    plus the tokenizer) to ``out`` atomically. ``dtype``: ``"auto"`` (the base's) or one of
    :data:`sparse_opd_peft.choices.MODEL_DTYPES`; the merge is ``W <- dtype(float32(W) + ΔW)``, one rounding from
    the base's stored weights. Warnings other than "merging lost ..." are re-emitted."""
    import torch
    from peft import PeftModel

    check_out_dir(out, overwrite)
    directory = adapter_dir(adapter)
    kind, config = _adapter_config(directory, skip_fingerprint_check)
    target = None if dtype == "auto" else torch_dtype(dtype)
    base_model, tok = _base_and_tokenizer(base, target, tokenizer, trust_remote_code)
    try:
        model = PeftModel.from_pretrained(base_model, str(directory), config=config)
    except ValueError as err:
        if "base model mismatch" in str(err):
            raise ValueError(f"{err} (sparse-opd merge: --skip-fingerprint-check)") from None
        raise
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = model.merge_and_unload()
    report = getattr(model.base_model, "last_merge_report", None) if kind == "SPARSE_OPD" else None
    if target is not None:
        merged = merged.to(target)
    out_dtype = next(merged.parameters()).dtype
    with staged_dir(out) as tmp:
        merged.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
    lost = []
    for w in caught:
        if not str(w.message).startswith("merging lost"):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif out_dtype == torch.bfloat16:
            lost.append(str(w.message))
    summary = merge_summary(report) if report is not None else f"merged a {kind} adapter (no visibility report)"
    if out_dtype != torch.bfloat16 and report is not None:
        summary += " (matters when the weights are cast to bf16)"
    return MergeResult(out, str(out_dtype).removeprefix("torch."), tok is not None, kind, summary, lost)
