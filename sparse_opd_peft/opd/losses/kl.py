"""Vocabulary-wide objectives on (N, T, V) logits: token log-probabilities, the exact reverse KL, the teacher's
top-k log-probabilities and the reverse KL against them (tail mass as one bucket). Each runs in blocks of about
``chunk_size`` positions under activation checkpointing, so the memory beyond the logits is ``O(chunk_size · V)``.
(:mod:`.head` computes the same values from hidden states and an ``lm_head`` without any (N, T, V) tensor.)
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._common import _blocks, _blockwise, _check_mask, _log1mexp, _upcast

__all__ = ["full_reverse_kl", "teacher_topk_logprobs", "token_logprobs", "topk_reverse_kl"]


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, vocab_size: Optional[int] = None, chunk_size: int = 256
) -> torch.Tensor:
    """Log-probabilities of given tokens: ``log_softmax(logits[..., :vocab_size])`` gathered at ``tokens``.

    Args:
        logits: ``(N, T, V')`` float logits of any float dtype; ``logits[:, t]`` predicts ``tokens[:, t]``.
        tokens: ``(N, T)`` int64 ids (< ``vocab_size``).
        vocab_size: softmax over the first ``vocab_size`` entries only (the tokenizer's length; padded embedding
            rows of the model are excluded). Default: all ``V'``.
        chunk_size: positions per block.

    Returns:
        ``(N, T)`` float32 log-probabilities (differentiable w.r.t. ``logits``).
    """
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"token_logprobs: logits must be (N, T, V) and tokens (N, T); got {tuple(logits.shape)} and {tuple(tokens.shape)}"
        )
    v = logits.shape[-1] if vocab_size is None else int(vocab_size)
    if v > logits.shape[-1]:
        raise ValueError(f"token_logprobs: vocab_size={v} exceeds the logits' last dimension {logits.shape[-1]}")

    def fn(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = _upcast(z[..., :v])
        return z.gather(-1, y.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)

    return _blockwise(fn, tokens.shape[0], tokens.shape[1], chunk_size, logits, tokens)


def full_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    vocab_size: Optional[int] = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Exact per-position reverse KL ``KL(p_s || p_T) = Σ_v p_s(v) (log p_s(v) - log p_T(v))``.

    Args:
        student_logits: ``(N, T, V_s)`` float (differentiable).
        teacher_logits: ``(N, T, V_T)`` float of any dtype (treated as constant), same device as the student's.
        mask: ``(N, T)`` bool; positions outside it return 0.
        vocab_size: both distributions over the first ``vocab_size`` ids (default: ``min(V_s, V_T)``).
        chunk_size: positions per block (bounded memory in forward and backward).

    Returns:
        ``(N, T)`` float32 KL values, 0 where ``mask`` is False.
    """
    if student_logits.shape[:2] != teacher_logits.shape[:2] or student_logits.dim() != 3 or teacher_logits.dim() != 3:
        raise ValueError(
            f"full_reverse_kl: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must both be (N, T, V) with the same N and T"
        )
    _check_mask(mask, tuple(student_logits.shape[:2]), "full_reverse_kl")
    v = min(student_logits.shape[-1], teacher_logits.shape[-1]) if vocab_size is None else int(vocab_size)
    if v > min(student_logits.shape[-1], teacher_logits.shape[-1]):
        raise ValueError(f"full_reverse_kl: vocab_size={v} exceeds a logits' last dimension")
    teacher_logits = teacher_logits.detach()

    def fn(zs: torch.Tensor, zt: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        ls = torch.log_softmax(_upcast(zs[..., :v]), dim=-1)
        lt = torch.log_softmax(_upcast(zt[..., :v]), dim=-1).to(ls.dtype)
        return (ls.exp() * (ls - lt)).sum(-1) * m

    return _blockwise(fn, mask.shape[0], mask.shape[1], chunk_size, student_logits, teacher_logits, mask)


def teacher_topk_logprobs(
    teacher_logits: torch.Tensor, k: int, vocab_size: Optional[int] = None, chunk_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher side of :func:`topk_reverse_kl`: its ``k`` largest log-probabilities and their token ids per
    position, all that a teacher served by another process (e.g. an inference server returning top-k log-probs)
    needs to send. Computed in blocks of ``chunk_size`` positions, so no ``(N, T, V)`` float32 tensor is built.

    Args:
        teacher_logits: ``(N, T, V')`` float logits of any dtype (treated as constant).
        k: entries per position, ``1 <= k <= vocab_size``.
        vocab_size: the softmax covers the first ``vocab_size`` ids (default all ``V'``).
        chunk_size: positions per block.

    Returns:
        ``(logprobs, ids)``: ``(N, T, k)`` float32 (float64 for float64 logits) log-probabilities in descending order
        and ``(N, T, k)`` int64 distinct token ids.
    """
    if teacher_logits.dim() != 3:
        raise ValueError(f"teacher_topk_logprobs: logits must be (N, T, V), got {tuple(teacher_logits.shape)}")
    v = teacher_logits.shape[-1] if vocab_size is None else int(vocab_size)
    if v > teacher_logits.shape[-1]:
        raise ValueError(f"teacher_topk_logprobs: vocab_size={v} exceeds the logits' last dimension")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= v:
        raise ValueError(f"teacher_topk_logprobs: k must be an integer in [1, {v}] (the vocabulary), got {k!r}")
    n, t = teacher_logits.shape[:2]
    dtype = torch.promote_types(teacher_logits.dtype, torch.float32)
    out_lp = torch.empty((n, t, k), dtype=dtype, device=teacher_logits.device)
    out_id = torch.empty((n, t, k), dtype=torch.long, device=teacher_logits.device)
    with torch.no_grad():
        for rs, ts in _blocks(n, t, chunk_size):
            lp = torch.log_softmax(_upcast(teacher_logits[rs, ts, :v]), dim=-1)
            top = lp.topk(k, dim=-1)
            out_lp[rs, ts], out_id[rs, ts] = top.values, top.indices
    return out_lp, out_id


def topk_reverse_kl(
    student_logits: torch.Tensor,
    teacher_topk_lp: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    mask: torch.Tensor,
    vocab_size: Optional[int] = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Reverse KL of the student against a teacher known only by its top-k log-probabilities, the rest of the
    vocabulary pooled into one tail bucket:

        ``KL_k = Σ_{v∈K} p_s(v) (log p_s(v) - log p_T(v)) + q_s (log q_s - log q_T)``

    with ``K`` the teacher's top-k ids at the position, ``q_s = 1 - Σ_{v∈K} p_s(v)`` (computed as a log-sum-exp of
    the student's logits outside ``K``, so it stays accurate when tiny) and ``q_T = 1 - Σ_{v∈K} p_T(v)`` (floored at
    the machine epsilon of the log-probs' dtype, the resolution of ``1 - Σ``). ``KL_k`` is the exact KL between the
    two (k+1)-bucket distributions, so ``0 <= KL_k <= KL(p_s || p_T)`` and ``k = V`` gives :func:`full_reverse_kl`.
    Its gradient moves the student's mass inside ``K`` toward the teacher's, and its tail mass as a whole.
    Computed in blocks of ``chunk_size`` positions under activation checkpointing (no ``(N, T, V)`` float32 tensor
    in the forward or the backward pass).

    Args:
        student_logits: ``(N, T, V_s)`` float (differentiable).
        teacher_topk_lp: ``(N, T, k)`` float teacher log-probabilities (from :func:`teacher_topk_logprobs` or a
            server; constant).
        teacher_topk_ids: ``(N, T, k)`` int64 distinct token ids of those log-probabilities (< ``vocab_size``).
        mask: ``(N, T)`` bool; positions outside it return 0.
        vocab_size: the student's softmax covers the first ``vocab_size`` ids (default ``V_s``).
        chunk_size: positions per block.

    Returns:
        ``(N, T)`` float32 (float64 for float64 logits) values, 0 where ``mask`` is False.
    """
    if student_logits.dim() != 3 or teacher_topk_lp.dim() != 3 or teacher_topk_lp.shape != teacher_topk_ids.shape:
        raise ValueError(
            f"topk_reverse_kl: student logits must be (N, T, V) and the teacher's top-k log-probs and ids (N, T, k); "
            f"got {tuple(student_logits.shape)}, {tuple(teacher_topk_lp.shape)}, {tuple(teacher_topk_ids.shape)}"
        )
    if teacher_topk_lp.shape[:2] != student_logits.shape[:2]:
        raise ValueError(
            f"topk_reverse_kl: the teacher's top-k tensors {tuple(teacher_topk_lp.shape)} and the student logits "
            f"{tuple(student_logits.shape)} must share N and T"
        )
    _check_mask(mask, tuple(student_logits.shape[:2]), "topk_reverse_kl")
    v = student_logits.shape[-1] if vocab_size is None else int(vocab_size)
    k = teacher_topk_lp.shape[-1]
    if v > student_logits.shape[-1] or not 1 <= k <= v:
        raise ValueError(
            f"topk_reverse_kl: need k <= vocab_size <= the logits' last dimension; got k={k}, vocab_size={v}"
        )
    ids = teacher_topk_ids.to(student_logits.device)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= v):
        raise ValueError(
            f"topk_reverse_kl: teacher top-k ids must lie in [0, {v}), got [{int(ids.min())}, {int(ids.max())}]"
        )
    lt_all = teacher_topk_lp.detach().to(student_logits.device)

    def fn(zs: torch.Tensor, lt: torch.Tensor, idx: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        ls = torch.log_softmax(_upcast(zs[..., :v]), dim=-1)
        lt = lt.to(ls.dtype)
        ls_k = ls.gather(-1, idx)
        head = (ls_k.exp() * (ls_k - lt)).sum(-1)
        if k == v:
            return head * m
        log_qs = ls.scatter(-1, idx, float("-inf")).logsumexp(-1)
        floor = math.log(torch.finfo(lt.dtype).eps)
        log_qt = _log1mexp(lt.logsumexp(-1)).clamp(min=floor)
        return (head + log_qs.exp() * (log_qs - log_qt)) * m

    return _blockwise(fn, mask.shape[0], mask.shape[1], chunk_size, student_logits, lt_all, ids, mask)
