"""Vocabulary-wide objectives straight from hidden states and an ``lm_head``, never holding an ``(M, V)`` tensor.

The student's logits ``z = h Wᵀ + b`` are built ``chunk_size`` positions at a time; each block yields the student's
log-probability of the sampled token and, against a teacher, the reverse KL (full vocabulary, or the teacher's
top-k plus a tail bucket). The gradients with respect to ``h`` are formed in the same pass, where the block's
probabilities already exist, from the closed forms

    d log p_s(y) / dz_u = 1[u = y] - p_s(u)
    d KL / dz_u        = p_s(u) (ℓ_b(u) - KL)          (ℓ_b(u): the log-ratio log P_s(b) - log P_T(b) of u's bucket;
                                                     every token its own bucket for the full KL)

and kept as ``(M, H)`` "unit" gradients ``(dF/dz) W``; the backward pass scales them by the incoming per-position
gradient. Memory is ``O(chunk_size · V)`` plus ``O(M · H)``, and nothing is recomputed unless the ``lm_head`` itself
is trained (then its gradient is accumulated block by block in a second pass). Positions are rows ``M`` (the caller
selects the completion tokens of an (N, T) batch, so padding costs nothing).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ._common import _log1mexp

__all__ = ["HeadOutputs", "head_logits_fn", "head_objectives", "head_teacher_signal", "project_blocks"]

TeacherLogitsFn = Callable[[int, int], torch.Tensor]  # (start, end) -> fresh (end - start, V) teacher logits


@dataclass
class HeadOutputs:
    """Per-position results of :func:`head_objectives` (``M`` rows, float32, float64 for float64 hidden states).

    Attributes:
        logprobs: ``(M,)`` student ``log p_s(y)`` (differentiable when ``"logprobs"`` is in ``grad``).
        divergence: ``(M,)`` reverse KL (full, or top-k with the tail bucket) or None without a teacher
            (differentiable when ``"divergence"`` is in ``grad``).
        gap: ``(M,)`` detached teacher log-ratio at the sampled token, ``log p_s(y) - log p_T(y)`` (full teacher), or
            its bucket's ``ℓ_b(y)`` (top-k teacher: the token's own log-ratio inside ``K``, the tail's outside); None
            without a teacher.
    """

    logprobs: torch.Tensor
    divergence: Optional[torch.Tensor]
    gap: Optional[torch.Tensor]


def project_blocks(
    hidden: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], vocab_size: int, chunk: int
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, end, z)`` blocks of logits ``z = hidden[start:end] W[:V]ᵀ + b[:V]`` as a fresh float32 (float64 for
    float64 input) ``(end - start, vocab_size)`` tensor the caller may overwrite.

    Args:
        hidden: ``(M, H)`` hidden states, or ``(M, V')`` logits when ``weight`` is None.
        weight: ``(V', H)`` lm_head weight, or None (``hidden`` are the logits).
        bias: ``(V',)`` or None.
        vocab_size: the first ``vocab_size`` ids form the softmax.
        chunk: rows per block (>= 1).
    """
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk}")
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    for s in range(0, hidden.shape[0], chunk):
        e = min(hidden.shape[0], s + chunk)
        yield s, e, _project(hidden, weight, bias, s, e, vocab_size).to(dtype, copy=weight is None)


def head_logits_fn(
    hidden: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    device: torch.device,
    vocab_size: int,
) -> TeacherLogitsFn:
    """A teacher for :func:`head_objectives`: ``(start, end) -> (end - start, vocab_size)`` logits of rows
    ``hidden[start:end]`` as a fresh tensor on ``device`` (the caller may overwrite it).

    Args:
        hidden: ``(M, H)`` teacher hidden states (projected on the weight's device, in its dtype), or ``(M, V')``
            logits when ``weight`` is None.
        weight: ``(V', H)`` the teacher's lm_head weight, or None.
        bias: ``(V',)`` or None.
        device: where the blocks go (the student's device).
        vocab_size: the first ``vocab_size`` ids.
    """

    def fn(s: int, e: int) -> torch.Tensor:
        return _project(hidden, weight, bias, s, e, vocab_size).to(device, copy=weight is None)

    return fn


def _project(
    hidden: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], s: int, e: int, v: int
) -> torch.Tensor:
    """``(e - s, v)`` logits of rows ``s:e``: ``hidden`` itself when ``weight`` is None (a view: copy before writing),
    else ``hidden[s:e] @ weight[:v]ᵀ + bias[:v]`` on the weight's device, in its dtype."""
    if weight is None:
        return hidden[s:e, :v]
    h = hidden[s:e].to(device=weight.device, dtype=weight.dtype)
    return F.linear(h, weight[:v], None if bias is None else bias[:v])


def _log_softmax_(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_softmax(z), softmax(z))`` of ``(b, V)`` logits, the first written into ``z``. The log-normaliser comes
    from the softmax's own largest probability, ``log Σ exp z = max z - log max p`` (one pass over the block fewer
    than a separate log-sum-exp). Student and teacher log-probs both go through here, so identical models give
    exactly equal values."""
    p = z.softmax(-1)
    return z.sub_(z.amax(-1, keepdim=True) - p.amax(-1, keepdim=True).log()), p


@torch.no_grad()
def head_teacher_signal(
    hidden: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    tokens: torch.Tensor,
    vocab_size: int,
    chunk_size: int,
    topk: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The teacher's log-probabilities of ``tokens`` and optionally its ``topk`` largest log-probabilities with their
    ids, block by block (no ``(M, V)`` tensor).

    Args:
        hidden: ``(M, H)`` teacher hidden states (or ``(M, V')`` logits with ``weight`` None).
        weight, bias: the teacher's lm_head ``(V', H)`` / ``(V',)`` or None.
        tokens: ``(M,)`` int64 ids on ``hidden``'s device.
        vocab_size: softmax over the first ``vocab_size`` ids.
        chunk_size: rows per block.
        topk: k, or None.

    Returns:
        ``(token_logprobs (M,), topk_logprobs (M, k) or None, topk_ids (M, k) int64 or None)``, float32.
    """
    lp = torch.empty(tokens.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32), device=tokens.device)
    top_lp = top_id = None
    if topk is not None:
        top_lp = lp.new_empty((tokens.shape[0], topk))
        top_id = torch.empty((tokens.shape[0], topk), dtype=torch.long, device=tokens.device)
    for s, e, z in project_blocks(hidden, weight, bias, vocab_size, chunk_size):
        z = _log_softmax_(z.to(tokens.device))[0]
        lp[s:e] = z.gather(-1, tokens[s:e, None]).squeeze(-1)
        if topk is not None:
            top = z.topk(topk, dim=-1)
            top_lp[s:e], top_id[s:e] = top.values, top.indices
    return lp, top_lp, top_id


class _Spec:
    """Non-tensor arguments of :class:`_HeadFunction` (tensors here need no gradient)."""

    def __init__(self, tokens, vocab_size, chunk, teacher_fn, topk, grad):
        self.tokens, self.vocab_size, self.chunk = tokens, vocab_size, chunk
        self.teacher_fn, self.topk, self.grad = teacher_fn, topk, grad


def _block(z: torch.Tensor, s: int, e: int, spec: _Spec, sink: Callable[[str, torch.Tensor], None]) -> tuple:
    """One block: ``z`` ``(b, V)`` logits (overwritten) -> ``(logprobs, divergence, gap)`` ``(b,)`` each (the last two
    None without a teacher); ``sink(name, dz)`` receives ``dF/dz`` for every name in ``spec.grad`` (valid during the
    call only)."""
    y = spec.tokens[s:e, None]
    ls, p = _log_softmax_(z)
    lp = ls.gather(-1, y).squeeze(-1)
    div = gap = None
    if spec.teacher_fn is not None:
        lt = _log_softmax_(spec.teacher_fn(s, e).to(z.dtype))[0]
        gap = lp - lt.gather(-1, y).squeeze(-1)
        d = lt.neg_().add_(ls)  # ls - lt
        div = torch.bmm(p.unsqueeze(1), d.unsqueeze(2)).reshape(-1)
        if "divergence" in spec.grad:
            sink("divergence", d.sub_(div[:, None]).mul_(p))
        del d, lt
    elif spec.topk is not None:
        div, gap = _topk_block(ls, p, y, s, e, spec, sink)
    if "logprobs" in spec.grad:
        sink("logprobs", p.neg_().scatter_add_(-1, y, torch.ones_like(y, dtype=p.dtype)))
    return lp, div, gap


def _topk_block(ls, p, y, s, e, spec, sink) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k reverse KL of a block (formula in :func:`head_objectives`); overwrites ``ls`` only if a gradient is
    wanted."""
    lt_k = spec.topk[0][s:e].to(ls)
    ids = spec.topk[1][s:e]
    ls_k = ls.gather(-1, ids)
    ratio_k = ls_k - lt_k
    div = (ls_k.exp() * ratio_k).sum(-1)
    v, k = ls.shape[-1], ids.shape[-1]
    if k < v:  # q_s as a sum of the tail's probabilities (accurate when tiny, unlike 1 - Σ_K p)
        p_k = p.gather(-1, ids)
        q_s = p.scatter_(-1, ids, 0.0).sum(-1)
        p.scatter_(-1, ids, p_k)
        floor = math.log(torch.finfo(lt_k.dtype).eps)
        ratio_tail = q_s.clamp(min=torch.finfo(q_s.dtype).tiny).log() - _log1mexp(lt_k.logsumexp(-1)).clamp(min=floor)
        div = div + q_s * ratio_tail
    else:
        ratio_tail = torch.zeros_like(div)
    hit = ids == y
    gap = torch.where(hit.any(-1), (ratio_k * hit).sum(-1), ratio_tail)
    if "divergence" in spec.grad:
        t = ls.copy_((ratio_tail - div)[:, None].expand_as(ls))
        t.scatter_(-1, ids, ratio_k - div[:, None])
        sink("divergence", t.mul_(p))
    return div, gap


class _HeadFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, spec: _Spec):  # noqa: D102 - see head_objectives
        m = hidden.shape[0]
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        lp = hidden.new_zeros(m, dtype=dtype)
        div = lp.clone() if (spec.teacher_fn is not None or spec.topk is not None) else None
        gap = None if div is None else lp.clone()
        width = hidden.shape[1]
        units = {g: hidden.new_zeros((m, width)) for g in spec.grad}

        for s, e, z in project_blocks(hidden, weight, bias, spec.vocab_size, spec.chunk):

            def sink(name: str, dz: torch.Tensor, s: int = s, e: int = e) -> None:
                if weight is None:
                    units[name][s:e, : spec.vocab_size] = dz
                else:
                    units[name][s:e] = (dz.to(weight.dtype) @ weight[: spec.vocab_size]).to(hidden.dtype)

            out = _block(z, s, e, spec, sink)
            lp[s:e] = out[0]
            if div is not None:
                div[s:e], gap[s:e] = out[1], out[2]
        ctx.spec, ctx.units = spec, units
        ctx.save_for_backward(hidden, weight, bias)
        if gap is not None:
            ctx.mark_non_differentiable(gap)
        return lp, div, gap

    @staticmethod
    def backward(ctx, g_lp, g_div, _g_gap):  # noqa: D102
        spec, units = ctx.spec, ctx.units
        hidden, weight, bias = ctx.saved_tensors
        grads = {"logprobs": g_lp, "divergence": g_div}
        grad_h = None
        if ctx.needs_input_grad[0]:
            grad_h = torch.zeros_like(hidden)
            for name, u in units.items():
                if grads[name] is not None:
                    grad_h += grads[name].to(u.dtype)[:, None] * u
        need_w = weight is not None and (ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2]))
        grad_w = grad_b = None
        if need_w:  # a trained lm_head: recompute each block's dF/dz and accumulate dzᵀ h
            v = spec.vocab_size
            grad_w, grad_b = torch.zeros_like(weight), None if bias is None else torch.zeros_like(bias)
            for s, e, z in project_blocks(hidden, weight, bias, v, spec.chunk):

                def sink(name: str, dz: torch.Tensor, s: int = s, e: int = e) -> None:
                    if grads[name] is None:
                        return
                    dz = (dz * grads[name][s:e, None].to(dz.dtype)).to(weight.dtype)
                    grad_w[:v] += dz.t() @ hidden[s:e].to(weight.dtype)
                    if grad_b is not None:
                        grad_b[:v] += dz.sum(0)

                _block(z, s, e, spec, sink)
        return grad_h, grad_w, grad_b, None


def head_objectives(
    hidden: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    tokens: torch.Tensor,
    *,
    vocab_size: int,
    chunk_size: int = 256,
    teacher_logits: Optional[TeacherLogitsFn] = None,
    teacher_topk: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    grad: tuple[str, ...] = ("divergence",),
) -> HeadOutputs:
    """Student log-probabilities of ``tokens`` and, against a teacher, the per-position reverse KL, from hidden states
    and an lm_head in blocks of ``chunk_size`` rows.

    With ``teacher_logits``: ``KL = Σ_v p_s(v) (log p_s(v) - log p_T(v))`` (as :func:`~.kl.full_reverse_kl`). With
    ``teacher_topk = (lp_T (M, k), ids (M, k))``: ``KL_k = Σ_{v∈K} p_s(v)(log p_s(v) - log p_T(v)) + q_s (log q_s -
    log q_T)``, ``q = 1 - Σ_{v∈K} p(v)`` the tail bucket (as :func:`~.kl.topk_reverse_kl`, the same floor on ``q_T``).

    Args:
        hidden: ``(M, H)`` float student hidden states (the lm_head's input), or ``(M, V')`` logits with ``weight``
            None (then the memory is that of the logits, as without this function).
        weight: ``(V', H)`` the student's lm_head weight (trained or not), or None.
        bias: ``(V',)`` or None.
        tokens: ``(M,)`` int64 sampled ids (< ``vocab_size``), on ``hidden``'s device.
        vocab_size: softmax over the first ``vocab_size`` ids (padded rows of the head excluded).
        chunk_size: rows per block (memory ``O(chunk_size · vocab_size)``).
        teacher_logits: ``(start, end) -> (end - start, vocab_size)`` teacher logits of rows ``start:end``, a fresh
            tensor this function overwrites (e.g. :func:`head_logits_fn`), or None.
        teacher_topk: the teacher's top-k log-probs and ids, ``(M, k)`` each, or None (not with ``teacher_logits``).
        grad: which outputs are differentiated: ``"divergence"`` and / or ``"logprobs"``; the others come back as
            constants.

    Returns:
        :class:`HeadOutputs`.
    """
    if hidden.dim() != 2 or tokens.shape != hidden.shape[:1]:
        raise ValueError(
            f"head_objectives: hidden must be (M, H) and tokens (M,); got {tuple(hidden.shape)}, {tuple(tokens.shape)}"
        )
    rows = hidden.shape[1] if weight is None else weight.shape[0]
    if not 1 <= vocab_size <= rows:
        raise ValueError(f"head_objectives: vocab_size={vocab_size} must lie in [1, {rows}] (the head's rows)")
    if teacher_logits is not None and teacher_topk is not None:
        raise ValueError("head_objectives: pass teacher_logits or teacher_topk, not both")
    bad = set(grad) - {"divergence", "logprobs"}
    if bad or ("divergence" in grad and teacher_logits is None and teacher_topk is None):
        raise ValueError(f"head_objectives: grad={grad!r}: choose from 'logprobs', 'divergence' (needs a teacher)")
    if teacher_topk is not None:
        lp_k, ids = teacher_topk
        if lp_k.shape != ids.shape or lp_k.shape[0] != hidden.shape[0] or not 1 <= lp_k.shape[-1] <= vocab_size:
            raise ValueError(
                f"head_objectives: teacher top-k log-probs {tuple(lp_k.shape)} and ids {tuple(ids.shape)} must both be "
                f"(M={hidden.shape[0]}, k) with k <= vocab_size={vocab_size}"
            )
        if bool(((ids < 0) | (ids >= vocab_size)).any()):  # one device -> host sync
            raise ValueError(f"head_objectives: teacher top-k ids must lie in [0, {vocab_size})")
        teacher_topk = (lp_k.detach().to(hidden.device), ids.to(hidden.device))
    spec = _Spec(tokens, int(vocab_size), int(chunk_size), teacher_logits, teacher_topk, tuple(grad))
    lp, div, gap = _HeadFunction.apply(hidden, weight, bias, spec)
    if "logprobs" not in spec.grad:
        lp = lp.detach()
    if div is not None and "divergence" not in spec.grad:
        div = div.detach()
    return HeadOutputs(lp, div, gap)
