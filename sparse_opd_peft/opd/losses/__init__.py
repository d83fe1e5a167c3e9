"""Pure tensor functions of the OPD / SFT / RLVR objectives (no models, no I/O), and the registry of objectives.

Shapes: ``N`` rows (samples), ``T`` completion positions, ``V`` vocabulary entries. ``mask`` is always the ``(N, T)``
bool completion mask (prompt, padding and post-EOS positions False). Log-probabilities are float32 whatever the
logits' dtype (float64 for float64 logits).

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

Modules: :mod:`.kl` (vocabulary-wide functions of (N, T, V) logits), :mod:`.head` (the same from hidden states and
an lm_head, never holding an (N, T, V) tensor), :mod:`.advantages` (advantages, baselines, the policy-gradient
loss), :mod:`.registry` (each objective by name: what it needs and its loss).
"""

from .advantages import (
    discounted_future_sum,
    grpo_advantages,
    iw_prefix_weights,
    leave_one_out_baseline,
    mix_advantages,
    policy_gradient_loss,
    reverse_kl_estimate,
    sampled_token_advantages,
    token_keep_weights,
)
from .head import HeadOutputs, head_logits_fn, head_objectives, head_teacher_signal
from .kl import full_reverse_kl, teacher_topk_logprobs, token_logprobs, topk_reverse_kl
from .registry import LOSS_SPECS, TEACHER_SIGNALS, LossInputs, LossSpec

__all__ = [
    "LOSS_SPECS",
    "TEACHER_SIGNALS",
    "HeadOutputs",
    "LossInputs",
    "LossSpec",
    "discounted_future_sum",
    "full_reverse_kl",
    "grpo_advantages",
    "head_logits_fn",
    "head_objectives",
    "head_teacher_signal",
    "iw_prefix_weights",
    "leave_one_out_baseline",
    "mix_advantages",
    "policy_gradient_loss",
    "reverse_kl_estimate",
    "sampled_token_advantages",
    "teacher_topk_logprobs",
    "token_keep_weights",
    "token_logprobs",
    "topk_reverse_kl",
]
