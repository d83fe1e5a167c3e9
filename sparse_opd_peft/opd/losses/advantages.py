"""Per-token advantages and the policy-gradient loss: the sampled-token OPD advantage with its variance reductions
(clip, per-position leave-one-out baseline, IW-OPD prefix weights, discount), token keep, GRPO, the α-mix."""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._common import _check_mask, _upcast

__all__ = [
    "discounted_future_sum",
    "grpo_advantages",
    "iw_prefix_weights",
    "leave_one_out_baseline",
    "mix_advantages",
    "policy_gradient_loss",
    "reverse_kl_estimate",
    "sampled_token_advantages",
    "token_keep_weights",
]


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
