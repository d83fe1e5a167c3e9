"""Tokenizer compatibility check between an OPD student and its teacher.

OPD compares the two models' log-probabilities token by token, so both must map every string to the same ids: the
vocab dicts must be equal (not just the same size), special tokens and EOS must agree, and a few probe strings must
encode identically. Models may carry padded embedding rows beyond the tokenizer's length (common for GPU-friendly
vocab sizes); only models with *fewer* rows than the tokenizer has ids are rejected.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from transformers import PreTrainedTokenizerBase

__all__ = ["check_tokenizer_compat", "model_vocab_rows"]

PROBES = ("Hello, world! 123+456=579", " two  spaces\tand\nnewline", "ÄÖÜ ß 中文 🙂")
_SPECIAL_ATTRS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _fmt_tokens(items: list, limit: int = 8) -> str:
    shown = ", ".join(repr(x) for x in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def model_vocab_rows(model: torch.nn.Module) -> Optional[int]:
    """Number of ids a causal LM can score: rows of its output embedding (else ``config.vocab_size``), or None."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.numel() > 0:
        out_features = getattr(head, "out_features", None)
        return int(out_features) if isinstance(out_features, int) else int(weight.shape[0])
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(vocab) if vocab is not None else None


def _check_model_rows(model: Optional[torch.nn.Module], n_ids: int, role: str) -> list[str]:
    if model is None:
        return []
    rows = model_vocab_rows(model)
    if rows is not None and rows < n_ids:
        return [
            f"the {role} model scores {rows} ids but the tokenizer has {n_ids} (len(tokenizer)); resize its "
            f"embeddings with model.resize_token_embeddings({n_ids}) or use the model's own tokenizer"
        ]
    return []


def check_tokenizer_compat(
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: Optional[PreTrainedTokenizerBase] = None,
    student_model: Optional[torch.nn.Module] = None,
    teacher_model: Optional[torch.nn.Module] = None,
) -> None:
    """Raise a ``ValueError`` listing every difference between the student's and the teacher's tokenization.

    Checks: the vocab dicts (``get_vocab()``: tokens only on one side, tokens with different ids), the special
    tokens (BOS / EOS / PAD / UNK strings and ids, additional special tokens), the EOS id, the encoding of a few
    probe strings, and that each model scores at least ``len(tokenizer)`` ids (extra padded rows are fine).

    Args:
        student_tokenizer: the student's tokenizer (the one the trainer uses to build rollouts).
        teacher_tokenizer: the teacher's tokenizer; None means "the same tokenizer" (only the models are checked).
        student_model, teacher_model: optional causal LMs whose vocabulary rows are checked.

    Raises:
        ValueError: one message naming every difference and how to fix it.
    """
    problems: list[str] = []
    n_ids = len(student_tokenizer)
    if student_tokenizer.eos_token_id is None:
        problems.append("the student tokenizer has no EOS token; set tokenizer.eos_token (rollouts stop at EOS)")
    if teacher_tokenizer is not None and teacher_tokenizer is not student_tokenizer:
        sv, tv = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        only_s = sorted(set(sv) - set(tv), key=lambda k: sv[k])
        only_t = sorted(set(tv) - set(sv), key=lambda k: tv[k])
        moved = sorted((k for k in set(sv) & set(tv) if sv[k] != tv[k]), key=lambda k: sv[k])
        if only_s:
            problems.append(f"{len(only_s)} token(s) only in the student vocab: {_fmt_tokens(only_s)}")
        if only_t:
            problems.append(f"{len(only_t)} token(s) only in the teacher vocab: {_fmt_tokens(only_t)}")
        if moved:
            pairs = [f"{k!r}: student id {sv[k]} vs teacher id {tv[k]}" for k in moved[:8]]
            problems.append(
                f"{len(moved)} token(s) have different ids: " + "; ".join(pairs) + (" ..." if len(moved) > 8 else "")
            )
        if len(teacher_tokenizer) != n_ids:
            problems.append(f"tokenizer lengths differ: student {n_ids} vs teacher {len(teacher_tokenizer)}")
        for attr in _SPECIAL_ATTRS:
            s_tok, t_tok = getattr(student_tokenizer, attr), getattr(teacher_tokenizer, attr)
            s_id, t_id = getattr(student_tokenizer, attr + "_id"), getattr(teacher_tokenizer, attr + "_id")
            if (s_tok, s_id) != (t_tok, t_id):
                name = attr.replace("_token", "").upper()
                problems.append(f"{name} differs: student {s_tok!r} (id {s_id}) vs teacher {t_tok!r} (id {t_id})")
        s_extra = sorted(str(t) for t in student_tokenizer.all_special_tokens)
        t_extra = sorted(str(t) for t in teacher_tokenizer.all_special_tokens)
        if s_extra != t_extra:
            problems.append(
                f"special tokens differ: only student {sorted(set(s_extra) - set(t_extra))}, only teacher "
                f"{sorted(set(t_extra) - set(s_extra))}"
            )
        if not problems:  # same vocab: make sure the pipelines (normaliser, pre-tokenizer, BOS handling) agree too
            for probe in PROBES:
                a, b = student_tokenizer(probe)["input_ids"], teacher_tokenizer(probe)["input_ids"]
                if a != b:
                    problems.append(f"the probe {probe!r} encodes differently: student {a} vs teacher {b}")
                    break
    problems += _check_model_rows(student_model, n_ids, "student")
    problems += _check_model_rows(teacher_model, n_ids, "teacher")
    for role, model in (("student", student_model), ("teacher", teacher_model)):
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) if model is not None else None
        ids = set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
        if ids and student_tokenizer.eos_token_id is not None and student_tokenizer.eos_token_id not in ids:
            warnings.warn(
                f"the {role} model's generation_config.eos_token_id={eos} does not include the tokenizer's EOS "
                f"{student_tokenizer.eos_token!r} (id {student_tokenizer.eos_token_id}); rollouts stop at the "
                "tokenizer's EOS",
                stacklevel=2,
            )
    if problems:
        raise ValueError(
            "student and teacher tokenization are incompatible for on-policy distillation (log-probabilities are "
            "compared id by id):\n  - " + "\n  - ".join(problems) + "\nUse a teacher that shares the student's "
            "tokenizer (same vocab, special tokens and EOS); padded embedding rows are allowed."
        )
