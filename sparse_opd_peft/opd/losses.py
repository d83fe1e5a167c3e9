"""Pure tensor functions of the OPD / SFT / RLVR objectives (no models, no I/O).

Shapes: ``N`` rows (samples), ``T`` completion positions, ``V`` vocabulary entries. ``mask`` is always the ``(N, T)``
bool completion mask (prompt, padding and post-EOS positions False). Log-probabilities are float32 whatever the
logits' dtype (float64 for float64 logits). Vocabulary-wide work runs in blocks of about ``chunk_size`` positions under activation checkpointing,
so the extra memory beyond the logits themselves is ``O(chunk_size · V)`` in the forward *and* the backward pass.

Definitions (``geometry-of-opd.md`` §5, appendix G):
    gap            r_t = log p_s(y_t) - log p_T(y_t)                              (sampled-token, detached)
    clipped gap    r_t ← clip(r_t, -c, c)                                   (``sampled_token_clip``; biased)
    OPD advantage  A_t = -r_t, or with discount γ > 0: Σ_{t'≥t} γ^{t'-t} (-r_t')
    baseline       A_t ← A_t - b_t, b_t = mean of A at position t over the batch's other rows  (unbiased)
    token keep     r̃_t = T / Σ_τ m_τ · m_t · r_t  (m keeps a ρ share of a sample's tokens: top-gap or random)
    GRPO           A_i = (R_i - mean_group R) / (std_group R + eps)   (std optional), broadcast to tokens
    mix            A_t = α · A_OPD,t + (1 - α) · A_RLVR
    loss           -Σ_t A_t · log p_s(y_t) / normaliser        (policy gradient; full_kl: Σ_t KL_t / normaliser)
    top-k KL       Σ_{v∈K} p_s(v)(log p_s(v) - log p_T(v)) + q_s (log q_s - log q_T)   (K: the teacher's top k ids,
                   q = 1 - Σ_{v∈K} p(v) the tail mass as one bucket; k = V gives the full reverse KL)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

__all__ = [
    "discounted_future_sum",
    "full_reverse_kl",
    "leave_one_out_baseline",
    "teacher_topk_logprobs",
    "topk_reverse_kl",
    "grpo_advantages",
    "mix_advantages",
    "policy_gradient_loss",
    "reverse_kl_estimate",
    "sampled_token_advantages",
    "token_keep_weights",
    "token_logprobs",
]


def _check_mask(mask: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if mask.dtype != torch.bool:
        raise ValueError(f"{what}: mask must be a bool tensor, got {mask.dtype}; pass completion_mask.bool()")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{what}: mask shape {tuple(mask.shape)} differs from the values' shape {tuple(shape)}")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float32, or float64 for float64 input."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _blocks(n: int, t: int, chunk_size: int) -> Iterator[tuple[slice, slice]]:
    """(row slice, position slice) blocks of about ``chunk_size`` positions covering an (n, t) grid, row-major."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if t >= chunk_size:
        for i in range(n):
            for j in range(0, t, chunk_size):
                yield slice(i, i + 1), slice(j, min(t, j + chunk_size))
    else:
        rows = max(1, chunk_size // max(t, 1))
        for i in range(0, n, rows):
            yield slice(i, min(n, i + rows)), slice(0, t)


def _blockwise(
    fn: Callable[..., torch.Tensor], n: int, t: int, chunk_size: int, *tensors: torch.Tensor
) -> torch.Tensor:
    """Apply ``fn`` to (n, t, ...) blocks of ``tensors`` (views, no copies) and reassemble an (n, t) result; blocks
    are checkpointed when a gradient is needed so their float32 temporaries are recomputed in backward."""
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    rows: list[list[torch.Tensor]] = []
    last_rows = None
    for rs, ts in _blocks(n, t, chunk_size):
        args = [x[rs, ts] for x in tensors]
        out = checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args)
        if rs != last_rows:
            rows.append([])
            last_rows = rs
        rows[-1].append(out)
    if not rows:
        return tensors[0].new_zeros((n, t), dtype=torch.float32)
    return torch.cat([torch.cat(r, dim=1) for r in rows], dim=0)


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


def discounted_future_sum(values: torch.Tensor, mask: torch.Tensor, discount: float) -> torch.Tensor:
    """``out_t = Σ_{t' ≥ t, mask} γ^{t'-t} values_t'`` within each row; ``γ = 0`` returns ``values * mask``.

    Args:
        values: ``(N, T)`` float.
        mask: ``(N, T)`` bool.
        discount: γ in [0, 1].

    Returns:
        ``(N, T)`` float tensor, 0 where ``mask`` is False.
    """
    _check_mask(mask, tuple(values.shape), "discounted_future_sum")
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must lie in [0, 1], got {discount}")
    v = values * mask
    if discount == 0.0:
        return v
    out = torch.zeros_like(v)
    running = torch.zeros_like(v[:, 0])
    for t in range(v.shape[1] - 1, -1, -1):
        running = v[:, t] + discount * running
        out[:, t] = running
    return out * mask


def token_keep_weights(
    gap: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "all",
    ratio: float = 1.0,
    random_scores: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Token-sparsification weights ``w_t = m_t · T_i / Σ_τ m_τ`` (paper appendix G.2), per sample ``i``.

    Each sample keeps ``k_i = ceil(ratio · T_i)`` of its ``T_i`` completion tokens: the largest ``gap`` values
    (``"top_gap"``: where the student is most over-confident relative to the teacher) or the largest
    ``random_scores`` (``"random"``: a uniformly random subset when the scores are i.i.d. uniform). ``"all"`` keeps
    every token (weights = mask).

    Args:
        gap: ``(N, T)`` float, ``log p_s - log p_T`` of the sampled tokens.
        mask: ``(N, T)`` bool completion mask.
        mode: ``"all"``, ``"top_gap"`` or ``"random"``.
        ratio: kept share ρ in (0, 1].
        random_scores: ``(N, T)`` float, required for ``"random"`` (per-row seeded uniforms, so the selection does
            not depend on the batch composition).

    Returns:
        ``(N, T)`` float32 weights; rows sum to ``T_i`` (the rescale keeps the signal's per-sample scale).
    """
    _check_mask(mask, tuple(gap.shape), "token_keep_weights")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"token_keep ratio must lie in (0, 1], got {ratio}")
    if mode == "all":
        return mask.float()
    if mode == "top_gap":
        scores = gap.detach().float()
    elif mode == "random":
        if random_scores is None or random_scores.shape != gap.shape:
            raise ValueError(
                f"token_keep 'random' needs random_scores of shape {tuple(gap.shape)}, got "
                f"{None if random_scores is None else tuple(random_scores.shape)}"
            )
        scores = random_scores.float()
    else:
        raise ValueError(f"unknown token_keep mode {mode!r}; choose 'all', 'top_gap' or 'random'")
    scores = scores.masked_fill(~mask, float("-inf"))
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    n_tok = mask.sum(-1, keepdim=True)
    k = torch.ceil(n_tok.double() * ratio).long().clamp(max=n_tok)
    keep = (rank < k) & mask
    scale = n_tok.float() / k.clamp(min=1).float()
    return keep.float() * scale


def sampled_token_advantages(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    discount: float = 0.0,
    keep_weights: Optional[torch.Tensor] = None,
    clip: Optional[float] = None,
    prefix_gamma: float = 0.0,
) -> torch.Tensor:
    """OPD advantages ``A_t = -r_t`` (``r_t = log p_s(y_t) - log p_T(y_t)``, detached), optionally clipped
    (``r_t ← clip(r_t, -c, c)``), token-kept (``r_t ← w_t r_t``) and summed over the future with discount γ.

    Clipping bounds what one sampled token can contribute: a token the teacher all but excludes (``log p_T`` of
    -15 nats) otherwise carries an advantage of about -15 and dominates a step. It trades an unbiased estimate of
    the reverse-KL gradient for a bounded one (verl clamps its k1 / k3 KL estimates to ±10 the same way); the
    expected gradient becomes ``Σ_v p_s(v) clip(r(v)) ∇log p_s(v)`` at each visited prefix: the exact gradient of
    ``D_c = Σ_v p_s(v) g_c(r(v))`` with ``g_c(r) = r - 1`` for ``|r| <= c``, ``c - e^{c-r}`` above and
    ``-c - e^{-c-r}`` below (``g_c + g_c' = clip``; ``c → ∞`` gives the reverse KL).

    Args:
        student_logprobs, teacher_logprobs: ``(N, T)`` float log-probs of the sampled tokens.
        mask: ``(N, T)`` bool.
        discount: γ in [0, 1]; 0 = per-token advantage.
        keep_weights: ``(N, T)`` from :func:`token_keep_weights`, or None (keep all).
        clip: c > 0 bounds the per-token log-ratio to ``[-c, c]``; None = the plain (unbiased) estimator.

    Returns:
        ``(N, T)`` float32 detached advantages, 0 outside ``mask``.
    """
    _check_mask(mask, tuple(student_logprobs.shape), "sampled_token_advantages")
    if teacher_logprobs.shape != student_logprobs.shape:
        raise ValueError(
            f"student log-probs {tuple(student_logprobs.shape)} and teacher log-probs "
            f"{tuple(teacher_logprobs.shape)} must have the same (N, T) shape"
        )
    r = (_upcast(student_logprobs.detach()) - _upcast(teacher_logprobs.detach()).to(student_logprobs.device)) * mask
    if clip is not None:
        if not clip > 0.0:
            raise ValueError(f"sampled_token_advantages: clip must be > 0 (or None), got {clip}")
        r = r.clamp(-clip, clip)
    if keep_weights is not None:
        r = r * keep_weights
    if prefix_gamma:
        r = r * iw_prefix_weights(r, mask, prefix_gamma)
    return discounted_future_sum(-r, mask, discount)


def iw_prefix_weights(gap: torch.Tensor, mask: torch.Tensor, gamma: float, eps: float = 1e-8) -> torch.Tensor:
    """IW-OPD's prefix weights (TRL ``IWOPDTrainer``): ``w_t = 1 + γ (1 - Σ_{j<t} |a_j| / max(Σ_j |a_j|, ε))`` per
    row, with ``a = -gap`` the per-token advantage: tokens before the sample's large disagreements weigh up to
    ``1 + γ``, those after them 1.

    Args:
        gap: ``(N, T)`` float per-token log-ratios (detached).
        mask: ``(N, T)`` bool.
        gamma: γ >= 0 (0 = unit weights).
        eps: floor of the row's total.

    Returns:
        ``(N, T)`` float weights in ``[1, 1 + γ]``, 0 outside ``mask``.
    """
    _check_mask(mask, tuple(gap.shape), "iw_prefix_weights")
    if not gamma >= 0.0:
        raise ValueError(f"iw_prefix_weights: gamma must be >= 0, got {gamma}")
    a = (_upcast(gap.detach()) * mask).abs()
    before = a.cumsum(-1) - a
    total = a.sum(-1, keepdim=True).clamp(min=eps)
    return (1.0 + gamma * (1.0 - before / total)) * mask


def leave_one_out_baseline(
    values: torch.Tensor,
    mask: torch.Tensor,
    total: Optional[torch.Tensor] = None,
    count: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-position leave-one-out mean: ``b_{i,t} = (S_t - v_{i,t}) / (n_t - 1)`` with ``S_t`` the sum of ``values``
    over the masked rows at completion position ``t`` and ``n_t`` their number (``b = 0`` where ``n_t <= 1``).

    Subtracted from an advantage (``A_t - b_t``) it lowers the policy gradient's variance without biasing it: ``b``
    does not depend on row ``i``'s own samples (the rows are independent rollouts). ``total`` / ``count`` let a
    caller pass sums over a larger batch than ``values`` (other micro-batches and processes, ``values``' own rows
    included), so the baseline does not depend on the micro-batching.

    Args:
        values: ``(N, T)`` float (e.g. advantages), detached.
        mask: ``(N, T)`` bool.
        total: ``(T',)`` float, ``T' >= T``: per-position sums over the whole batch; default the sums over ``values``.
        count: ``(T',)`` float: per-position numbers of masked rows in the whole batch; default ``mask.sum(0)``.

    Returns:
        ``(N, T)`` float32 (float64 for float64 values), 0 outside ``mask``.
    """
    _check_mask(mask, tuple(values.shape), "leave_one_out_baseline")
    v = _upcast(values.detach()) * mask
    t = v.shape[1]
    if (total is None) != (count is None):
        raise ValueError("leave_one_out_baseline: pass both total and count, or neither")
    if total is None:
        total, count = v.sum(0), mask.sum(0).to(v.dtype)
    elif total.shape[0] < t or count.shape[0] < t:
        raise ValueError(f"leave_one_out_baseline: total / count cover {total.shape[0]} positions, values have {t}")
    total, count = total[:t].to(v), count[:t].to(v)
    others = (count - 1.0).clamp(min=1.0)
    b = (total[None, :] - v) / others[None, :]
    return torch.where((count > 1.0)[None, :] & mask, b, torch.zeros_like(b))


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


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate near 0 and near -inf."""
    x = x.clamp(max=0.0)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


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


def grpo_advantages(
    rewards: torch.Tensor, group_size: int, std_normalize: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """GRPO sequence advantages: rewards centred on their group mean (and divided by the group std + eps).

    Args:
        rewards: ``(G · group_size,)`` float, prompt-major (consecutive rows share a prompt).
        group_size: samples per prompt (>= 2).
        std_normalize: divide by the group's (unbiased) std; False gives raw centred rewards.
        eps: added to the std.

    Returns:
        ``(G · group_size,)`` float32; a group of equal rewards gets zeros.
    """
    if rewards.dim() != 1 or group_size < 2 or rewards.numel() % group_size:
        raise ValueError(
            f"grpo_advantages: rewards must be 1-D with a length divisible by group_size >= 2; got shape "
            f"{tuple(rewards.shape)} and group_size={group_size}"
        )
    r = rewards.float().view(-1, group_size)
    adv = r - r.mean(-1, keepdim=True)
    if std_normalize:
        adv = adv / (r.std(-1, keepdim=True) + eps)
    return adv.reshape(-1)


def mix_advantages(
    opd_advantages: torch.Tensor, rlvr_advantages: torch.Tensor, alpha: float, mask: torch.Tensor
) -> torch.Tensor:
    """``A_t = α · A_OPD,t + (1 - α) · A_RLVR`` with the sequence advantage broadcast to the row's tokens.

    Args:
        opd_advantages: ``(N, T)`` float.
        rlvr_advantages: ``(N,)`` float.
        alpha: α in [0, 1].
        mask: ``(N, T)`` bool.

    Returns:
        ``(N, T)`` float32, 0 outside ``mask``.
    """
    _check_mask(mask, tuple(opd_advantages.shape), "mix_advantages")
    if rlvr_advantages.shape != opd_advantages.shape[:1]:
        raise ValueError(
            f"mix_advantages: RLVR advantages {tuple(rlvr_advantages.shape)} must have one value per row "
            f"({opd_advantages.shape[0]})"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"mix alpha must lie in [0, 1], got {alpha}")
    return (alpha * _upcast(opd_advantages) + (1.0 - alpha) * _upcast(rlvr_advantages)[:, None]) * mask


def policy_gradient_loss(
    logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, normalizer: float | torch.Tensor
) -> torch.Tensor:
    """``-Σ A_t · log p(y_t) / normalizer`` over masked tokens (SFT: advantages = 1).

    Args:
        logprobs: ``(N, T)`` float32 differentiable log-probs.
        advantages: ``(N, T)`` (or ``(N,)``, broadcast) detached advantages.
        mask: ``(N, T)`` bool.
        normalizer: positive token count (e.g. completion tokens of the global batch).

    Returns:
        scalar float32 loss.
    """
    _check_mask(mask, tuple(logprobs.shape), "policy_gradient_loss")
    adv = _upcast(advantages.detach())
    if adv.dim() == 1:
        adv = adv[:, None]
    if float(normalizer) <= 0 or not math.isfinite(float(normalizer)):
        raise ValueError(f"policy_gradient_loss: normalizer must be a positive finite count, got {normalizer}")
    return -(adv * logprobs * mask).sum() / normalizer


def reverse_kl_estimate(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Monte-Carlo reverse-KL estimate per token on student samples: masked mean of ``log p_s - log p_T``.

    Args:
        student_logprobs, teacher_logprobs: ``(N, T)`` float; mask: ``(N, T)`` bool.

    Returns:
        scalar float32 (0 for an empty mask).
    """
    _check_mask(mask, tuple(student_logprobs.shape), "reverse_kl_estimate")
    gap = (student_logprobs.detach().float() - teacher_logprobs.detach().float()) * mask
    return gap.sum() / mask.sum().clamp(min=1)
