"""The OPD / SFT / RLVR objectives by name: what each one needs and how it turns per-token quantities into a loss.

Adding an objective is one :class:`LossSpec` entry in :data:`LOSS_SPECS` (plus its name in
``sparse_opd_peft.choices.LOSSES``, the torch-free list the command line offers; a test keeps the two equal).
:class:`~sparse_opd_peft.opd.OPDConfig` validates its options against the entry and
:class:`~sparse_opd_peft.opd.OPDTrainer` scores a micro-batch with exactly the teacher signal the entry names, then
calls its ``objective``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .advantages import mix_advantages, policy_gradient_loss, sampled_token_advantages

__all__ = ["TEACHER_SIGNALS", "LOSS_SPECS", "LossInputs", "LossSpec"]

# What an objective reads from the teacher, per completion position:
#   "logits": its whole next-token distribution (a teacher in the training process);
#   "topk":   its top-k log-probs and ids (OPDTrainer.teacher_topk: what a teacher served elsewhere returns);
#   "token":  its log-prob of the sampled token only;
#   "none":   nothing (SFT, RLVR).
TEACHER_SIGNALS = ("logits", "topk", "token", "none")


@dataclass
class LossInputs:
    """What the trainer hands an objective for one micro-batch (``N`` rows, ``C`` completion positions).

    Attributes:
        logprobs: ``(N, C)`` float32 student ``log p_s(y_t)`` (differentiable when the spec's ``grad`` is
            ``"logprobs"``).
        divergence: ``(N, C)`` float32 differentiable reverse KL per position (teacher ``"logits"`` / ``"topk"``), or
            None.
        teacher_logprobs: ``(N, C)`` float32 ``log p_T(y_t)`` (teacher ``"token"`` / ``"logits"``), or None.
        mask: ``(N, C)`` bool completion mask.
        keep: ``(N, C)`` float32 token-keep weights, or None (keep all).
        rlvr_advantages: ``(N,)`` float32 GRPO advantages (``reward`` specs), or None.
        opd_advantages: ``(N, C)`` sampled-token advantages already computed with the baseline (pre-pass), or None.
        config: the run's :class:`~sparse_opd_peft.opd.OPDConfig`.
    """

    logprobs: torch.Tensor
    divergence: Optional[torch.Tensor]
    teacher_logprobs: Optional[torch.Tensor]
    mask: torch.Tensor
    keep: Optional[torch.Tensor]
    rlvr_advantages: Optional[torch.Tensor]
    opd_advantages: Optional[torch.Tensor]
    config: Any

    def sampled_token_advantages(self) -> torch.Tensor:
        """``(N, C)`` OPD advantages: the pre-pass's (with the baseline), else from the log-probs and the config."""
        if self.opd_advantages is not None:
            return self.opd_advantages
        c = self.config
        return sampled_token_advantages(
            self.logprobs, self.teacher_logprobs, self.mask, c.discount, self.keep, c.sampled_token_clip,
            c.sampled_token_prefix_gamma,
        )  # fmt: skip


@dataclass(frozen=True)
class LossSpec:
    """One objective.

    Attributes:
        teacher: the teacher signal it reads, one of :data:`TEACHER_SIGNALS`.
        grad: the per-position quantity it differentiates: ``"divergence"`` or ``"logprobs"``.
        objective: ``LossInputs -> scalar`` summed (not yet normalised) loss of a micro-batch.
        reward: it uses GRPO advantages from the verifier reward (needs ``reward_fn`` and ``num_generations >= 2``).
        rollouts: it trains on sampled completions (False: on the dataset's completions; no off-policy).
        advantages: it is built on the sampled-token OPD advantage (``discount``, ``sampled_token_clip``,
            ``sampled_token_prefix_gamma`` and ``sampled_token_baseline`` apply).
        default_baseline: ``sampled_token_baseline`` when the config leaves it None.
        std_normalize: GRPO advantages divide by the group's reward std when the config's ``grpo_std_normalize`` is
            None (``reward`` specs only).
    """

    teacher: str
    grad: str
    objective: Callable[[LossInputs], torch.Tensor]
    reward: bool = False
    rollouts: bool = True
    advantages: bool = False
    default_baseline: str = "none"
    std_normalize: bool = False


def _divergence(x: LossInputs) -> torch.Tensor:
    return (x.divergence * (x.keep if x.keep is not None else x.mask)).sum()


def _sampled_token(x: LossInputs) -> torch.Tensor:
    return policy_gradient_loss(x.logprobs, x.sampled_token_advantages(), x.mask, 1.0)


def _mix(x: LossInputs) -> torch.Tensor:
    adv = mix_advantages(x.sampled_token_advantages(), x.rlvr_advantages, x.config.alpha, x.mask)
    return policy_gradient_loss(x.logprobs, adv, x.mask, 1.0)


def _sft(x: LossInputs) -> torch.Tensor:
    return policy_gradient_loss(x.logprobs, torch.ones_like(x.logprobs), x.mask, 1.0)


def _rlvr(x: LossInputs) -> torch.Tensor:
    return policy_gradient_loss(x.logprobs, x.rlvr_advantages, x.mask, 1.0)


LOSS_SPECS: dict[str, LossSpec] = {
    # per token A_t = -(log p_s(y_t) - log p_T(y_t)) (discounted, clipped, baselined, IW-weighted), -Σ A_t log p_s(y_t)
    "sampled_token": LossSpec("token", "logprobs", _sampled_token, advantages=True, default_baseline="position"),
    # Σ_t KL(p_s || p_T) at every visited prefix, the whole vocabulary
    "full_kl": LossSpec("logits", "divergence", _divergence),
    # Σ_t KL over the teacher's top-k ids plus one tail bucket
    "topk_kl": LossSpec("topk", "divergence", _divergence),
    # cross-entropy on the dataset's completions
    "sft": LossSpec("none", "logprobs", _sft, rollouts=False),
    # GRPO on the verifier reward
    "rlvr": LossSpec("none", "logprobs", _rlvr, reward=True, std_normalize=True),
    # A = α A_OPD + (1 - α) A_RLVR
    "mix": LossSpec("token", "logprobs", _mix, reward=True, advantages=True),
}
