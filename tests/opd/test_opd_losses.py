"""Pure-math tests of the OPD objectives: exact-enumeration gradient checks, advantages, token keep, masks."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from _distributed_check import tiny_model, tiny_tokenizer
from transformers import Qwen3Config, Qwen3ForCausalLM

from sparse_opd_peft.opd import (
    SeededSampler,
    completion_mask,
    discounted_future_sum,
    full_reverse_kl,
    generate_rollouts,
    grpo_advantages,
    iw_prefix_weights,
    leave_one_out_baseline,
    mix_advantages,
    policy_gradient_loss,
    position_ids_from_mask,
    sample_seed,
    sampled_token_advantages,
    teacher_topk_logprobs,
    token_keep_weights,
    token_logprobs,
    topk_reverse_kl,
)

EOS = 3


def _lm(seed: int, vocab: int = 4) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, tie_word_embeddings=False,
    )  # fmt: skip
    model = Qwen3ForCausalLM(cfg).double().eval()
    with torch.no_grad():  # sharper distributions than the default init, so the KL is far from 0
        model.lm_head.weight.mul_(40.0)
    return model


def _enumerate(student, teacher, vocab: int = 4, length: int = 2):
    """All vocab**length completions of a fixed prompt, as one batch: logits predicting each completion token."""
    comps = torch.tensor(list(itertools.product(range(vocab), repeat=length)))
    prompt = torch.tensor([[0, 1, 2]]).expand(comps.shape[0], -1)
    ids = torch.cat([prompt, comps], 1)
    p = prompt.shape[1]
    s_logits = student(input_ids=ids).logits[:, p - 1 : -1]
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits[:, p - 1 : -1]
    return comps, s_logits, t_logits


def _grads(model, loss):
    params = [q for q in model.parameters() if q.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])


def _assert_same_direction(a: torch.Tensor, b: torch.Tensor) -> None:
    # float64 model, but Qwen3's RMSNorm computes in float32: agreement to ~1e-7 of the gradient's scale
    err = ((a - b).norm() / b.norm()).item()
    assert err < 1e-6, f"relative gradient error {err:.2e}"


@pytest.mark.parametrize("with_eos", [False, True])
def test_sampled_token_gradient_equals_full_kl_gradient_in_expectation(with_eos):
    """E_y[Σ_t -A_t ∇log p_s(y_t)] (A_t = -(log p_s - log p_T)) equals E_y[Σ_t ∇KL(p_s^t || p_T^t)] at the visited
    prefixes, by exact enumeration of every completion; with γ = 1 it equals ∇ of the sequence-level reverse KL."""
    student, teacher = _lm(0), _lm(1)
    comps, s_logits, t_logits = _enumerate(student, teacher)
    mask = completion_mask(comps, EOS) if with_eos else torch.ones_like(comps, dtype=torch.bool)
    lp_s = token_logprobs(s_logits, comps)
    lp_t = token_logprobs(t_logits, comps)
    seq_lp = (lp_s * mask).sum(-1)
    # probability of each enumerated row (rows after an EOS split the EOS-ended sequence's mass: Σ_y2 p(y2|EOS) = 1)
    row_p = lp_s.sum(-1).exp()
    weight = row_p.detach()
    assert weight.sum().item() == pytest.approx(1.0, abs=1e-5)

    adv = sampled_token_advantages(lp_s, lp_t, mask)
    per_row_pg = -(adv * lp_s * mask).sum(-1)
    g_sampled = _grads(student, (weight * per_row_pg).sum())
    kl = full_reverse_kl(s_logits, t_logits, mask, chunk_size=3)
    g_full = _grads(student, (weight * kl.sum(-1)).sum())
    assert g_full.norm() > 1e-3  # a real signal, not two zeros
    _assert_same_direction(g_sampled, g_full)

    adv1 = sampled_token_advantages(lp_s, lp_t, mask, discount=1.0)
    g_seq_pg = _grads(student, (weight * -(adv1 * lp_s * mask).sum(-1)).sum())
    seq_kl = (row_p * (seq_lp - (lp_t * mask).sum(-1))).sum()
    _assert_same_direction(g_seq_pg, _grads(student, seq_kl))


def test_identical_student_and_teacher_give_zero_advantage_and_gradient():
    student = _lm(0)
    teacher = copy.deepcopy(student)
    comps, s_logits, t_logits = _enumerate(student, teacher)
    mask = completion_mask(comps, EOS)
    lp_s, lp_t = token_logprobs(s_logits, comps), token_logprobs(t_logits, comps)
    adv = sampled_token_advantages(lp_s, lp_t, mask, discount=0.5)
    assert torch.count_nonzero(adv) == 0
    assert torch.count_nonzero(_grads(student, policy_gradient_loss(lp_s, adv, mask, mask.sum()))) == 0
    kl = full_reverse_kl(s_logits, t_logits, mask)
    assert kl.abs().max() < 1e-6
    assert _grads(student, kl.sum()).abs().max() < 1e-6


def test_full_reverse_kl_chunking_vocab_padding_and_gradient():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, 9, generator=g, requires_grad=True)
    t = torch.randn(3, 5, 11, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.3
    ls, lt = s[..., :7].log_softmax(-1), t[..., :7].log_softmax(-1)
    ref = (ls.exp() * (ls - lt)).sum(-1) * mask
    (g_ref,) = torch.autograd.grad(ref.sum(), s)
    for chunk in (1, 2, 4, 100):
        out = full_reverse_kl(s, t, mask, vocab_size=7, chunk_size=chunk)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(torch.autograd.grad(out.sum(), s)[0], g_ref)
    assert (full_reverse_kl(s, t, mask) >= -1e-6).all()
    with pytest.raises(ValueError, match="mask must be a bool"):
        full_reverse_kl(s, t, mask.float())
    with pytest.raises(ValueError, match="same N and T"):
        full_reverse_kl(s, t[:, :4], mask)


def test_token_logprobs_chunked_bf16_and_padded_rows():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 10, generator=g).bfloat16()
    tokens = torch.randint(0, 8, (2, 6), generator=g)
    ref = logits[..., :8].float().log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    for chunk in (1, 4, 64):
        out = token_logprobs(logits, tokens, vocab_size=8, chunk_size=chunk)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="vocab_size=12 exceeds"):
        token_logprobs(logits, tokens, vocab_size=12)


def test_discounted_future_sum():
    v = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    m = torch.tensor([[True, True, True, False]])
    torch.testing.assert_close(discounted_future_sum(v, m, 0.0), torch.tensor([[1.0, 2.0, 3.0, 0.0]]))
    torch.testing.assert_close(discounted_future_sum(v, m, 1.0), torch.tensor([[6.0, 5.0, 3.0, 0.0]]))
    torch.testing.assert_close(discounted_future_sum(v, m, 0.5), torch.tensor([[1 + 1 + 0.75, 2 + 1.5, 3.0, 0.0]]))
    with pytest.raises(ValueError, match="discount"):
        discounted_future_sum(v, m, 1.5)


def test_grpo_advantages_are_group_normalised():
    g = torch.Generator().manual_seed(2)
    rewards = torch.cat([torch.rand(8, generator=g), torch.ones(4), torch.tensor([0.0, 1.0, 0.0, 0.0])])
    adv = grpo_advantages(rewards, 4)
    groups = adv.view(-1, 4)
    torch.testing.assert_close(groups.mean(-1), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(groups[[0, 1, 3]].std(-1), torch.ones(3), atol=1e-3, rtol=0)
    assert torch.count_nonzero(groups[2]) == 0  # equal rewards: no signal
    raw = grpo_advantages(rewards, 4, std_normalize=False).view(-1, 4)
    torch.testing.assert_close(raw, rewards.view(-1, 4) - rewards.view(-1, 4).mean(-1, keepdim=True))
    with pytest.raises(ValueError, match="divisible by group_size"):
        grpo_advantages(rewards[:5], 4)


def test_mix_advantages_interpolate():
    opd = torch.tensor([[1.0, -2.0, 5.0]])
    m = torch.tensor([[True, True, False]])
    rl = torch.tensor([4.0])
    torch.testing.assert_close(mix_advantages(opd, rl, 1.0, m), torch.tensor([[1.0, -2.0, 0.0]]))
    torch.testing.assert_close(mix_advantages(opd, rl, 0.0, m), torch.tensor([[4.0, 4.0, 0.0]]))
    torch.testing.assert_close(mix_advantages(opd, rl, 0.25, m), torch.tensor([[3.25, 2.5, 0.0]]))
    with pytest.raises(ValueError, match="one value per row"):
        mix_advantages(opd, torch.ones(2), 0.5, m)


def test_token_keep_top_gap_and_random_rescale():
    gap = torch.tensor([[0.1, 0.9, -0.5, 0.3, 0.7, 9.0], [5.0, 1.0, 2.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True] * 5 + [False], [True, True, True, False, False, False]])
    w = token_keep_weights(gap, mask, "top_gap", 0.4)
    # row 0: T=5, keep ceil(2.0)=2 tokens with largest gap (0.9, 0.7); row 1: T=3, keep ceil(1.2)=2 (5.0, 2.0)
    torch.testing.assert_close(w[0], torch.tensor([0, 2.5, 0, 0, 2.5, 0]))
    torch.testing.assert_close(w[1], torch.tensor([1.5, 0, 1.5, 0, 0, 0]))
    torch.testing.assert_close(w.sum(-1), mask.sum(-1).float())  # rescale T / Σm keeps the per-sample scale
    scores = torch.rand(2, 6, generator=torch.Generator().manual_seed(0))
    wr = token_keep_weights(gap, mask, "random", 0.5, random_scores=scores)
    assert ((wr > 0) <= mask).all()
    assert (wr > 0).sum(-1).tolist() == [3, 2]
    torch.testing.assert_close(wr.sum(-1), mask.sum(-1).float())
    torch.testing.assert_close(token_keep_weights(gap, mask, "top_gap", 1.0), mask.float())
    adv = sampled_token_advantages(gap, torch.zeros_like(gap), mask, keep_weights=w)
    torch.testing.assert_close(adv, -gap * w)  # r̃_t = T/Σm · m_t · r_t, A = -r̃
    with pytest.raises(ValueError, match="random_scores"):
        token_keep_weights(gap, mask, "random", 0.5)


def test_completion_mask_includes_eos_and_excludes_after():
    ids = torch.tensor([[5, 6, 2, 0, 0], [2, 2, 2, 2, 2], [5, 5, 5, 5, 5], [5, 2, 7, 2, 0]])
    expected = torch.tensor(
        [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool
    )  # pad id may equal EOS (row 1); no EOS: everything (row 2)
    assert torch.equal(completion_mask(ids, 2), expected)
    am = torch.tensor([[0, 0, 1, 1, 1]])
    assert position_ids_from_mask(am).tolist() == [[1, 1, 0, 1, 2]]


def test_rollout_masks_exclude_prompt_padding_and_post_eos_and_are_row_seeded():
    tok = tiny_tokenizer()
    model = tiny_model(0)
    prompts = ["1+2=", "3=", "44+55="]  # different lengths -> left padding
    seeds = [sample_seed(7, i, k) for i in range(3) for k in range(2)]
    ro = generate_rollouts(model, tok, prompts, max_new_tokens=6, num_generations=2, seeds=seeds, vocab_size=len(tok))
    p = ro.prompt_length
    enc = [tok(x)["input_ids"] for x in prompts]
    for row in range(6):
        n = len(enc[row // 2])
        assert ro.attention_mask[row, :p].tolist() == [0] * (p - n) + [1] * n  # prompt padding not attended
        assert torch.equal(ro.attention_mask[row, p:].bool(), ro.completion_mask[row])
        comp, m = ro.completion_ids[row].tolist(), ro.completion_mask[row].tolist()
        if tok.eos_token_id in comp:
            cut = comp.index(tok.eos_token_id)
            assert m == [True] * (cut + 1) + [False] * (len(comp) - cut - 1)  # EOS in, after EOS out
    # the sampled-token log-probs equal a training forward with the same positions (the loss sees the sampled policy)
    logits = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=ro.position_ids).logits
    lp = token_logprobs(logits[:, p - 1 : -1], ro.completion_ids) * ro.completion_mask
    torch.testing.assert_close(lp, ro.sample_logprobs, atol=1e-5, rtol=0)
    # a row's sample depends only on its seed, not on the other rows in the batch
    alone = generate_rollouts(
        model, tok, prompts[2:], max_new_tokens=6, num_generations=2, seeds=seeds[4:], vocab_size=len(tok)
    )
    c = alone.completion_ids.shape[1]
    assert torch.equal(alone.completion_ids, ro.completion_ids[4:, :c])
    with pytest.raises(ValueError, match="one seed per row"):
        generate_rollouts(model, tok, prompts, max_new_tokens=2, num_generations=2, seeds=seeds[:3])


def test_sampler_never_picks_padded_rows_and_matches_softmax():
    scores = torch.zeros(4000, 40)
    scores[:, 16:] = 100.0  # padded rows would dominate the softmax
    scores[:, 1] = 1.0
    sampler = SeededSampler([sample_seed(0, i) for i in range(4000)], temperature=1.0, vocab_size=16)
    out = sampler(None, scores)
    picked = out.argmax(-1)
    assert picked.max() < 16 and (out.isfinite().sum(-1) == 1).all()
    freq = torch.bincount(picked, minlength=16).float() / 4000
    expected = torch.zeros(16).index_fill_(0, torch.tensor([1]), 1.0).softmax(-1)
    torch.testing.assert_close(freq, expected, atol=0.03, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Estimators of issue 14: clipped / baselined / prefix-weighted sampled-token advantages, top-k KL.


def _clipped_kl_potential(r: torch.Tensor, c: float) -> torch.Tensor:
    """g_c with g_c + g_c' = clip(r, -c, c): r - 1 inside, c - e^{c-r} above, -c - e^{-c-r} below (C¹ at ±c)."""
    zero = torch.zeros_like(r)  # exponents only where their branch applies (no overflow elsewhere)
    above = c - torch.exp(torch.where(r > c, c - r, zero))
    below = -c - torch.exp(torch.where(r < -c, -c - r, zero))
    return torch.where(r > c, above, torch.where(r < -c, below, r - 1.0))


@pytest.mark.parametrize("clip", [0.5, 3.0, 1e6])
def test_clipped_sampled_token_gradient_is_the_exact_gradient_of_a_clipped_kl(clip):
    """E_y[-A_t ∇log p_s(y_t)] with A_t = -clip(r_t, -c, c) equals ∇ Σ_t D_c,t at the visited prefixes, where
    D_c = Σ_v p_s(v) g_c(log p_s(v) - log p_T(v)) is computed from the full logits (exact enumeration); a clip
    above every |r| gives the reverse-KL gradient."""
    student, teacher = _lm(0), _lm(1)
    comps, s_logits, t_logits = _enumerate(student, teacher)
    mask = torch.ones_like(comps, dtype=torch.bool)
    lp_s, lp_t = token_logprobs(s_logits, comps), token_logprobs(t_logits, comps)
    weight = lp_s.sum(-1).exp().detach()
    adv = sampled_token_advantages(lp_s, lp_t, mask, clip=clip)
    if clip < 1.0:
        assert adv.abs().max() == pytest.approx(clip)  # the clip binds
    g_sampled = _grads(student, (weight * -(adv * lp_s).sum(-1)).sum())
    ls, lt = s_logits.log_softmax(-1), t_logits.log_softmax(-1)
    d_c = (ls.exp() * _clipped_kl_potential(ls - lt, clip)).sum(-1)
    g_ref = _grads(student, (weight * d_c.sum(-1)).sum())
    assert g_ref.norm() > 1e-3
    _assert_same_direction(g_sampled, g_ref)
    if clip > 100:
        g_kl = _grads(student, (weight * full_reverse_kl(s_logits, t_logits, mask).sum(-1)).sum())
        _assert_same_direction(g_sampled, g_kl)


def test_leave_one_out_baseline_keeps_the_gradient_unbiased_and_is_a_leave_one_out_mean():
    """Two independent rollouts, every pair of completions enumerated: the expected gradient with the per-position
    leave-one-out baseline equals the exact reverse-KL gradient (the baseline of a row depends only on the other)."""
    student, teacher = _lm(0), _lm(1)
    comps, s_logits, t_logits = _enumerate(student, teacher)
    n = comps.shape[0]
    mask1 = completion_mask(comps, EOS)
    lp_s, lp_t = token_logprobs(s_logits, comps), token_logprobs(t_logits, comps)
    p_row = lp_s.sum(-1).exp().detach()
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    rows = torch.stack([i.reshape(-1), j.reshape(-1)], 1)  # (n², 2): the two rollouts of each batch
    pair_p = p_row[rows[:, 0]] * p_row[rows[:, 1]]
    adv1 = sampled_token_advantages(lp_s, lp_t, mask1)
    total = torch.zeros((), dtype=torch.float64)
    for b in range(rows.shape[0]):
        r = rows[b]
        m = mask1[r]
        adv = adv1[r] - leave_one_out_baseline(adv1[r], m)
        total = total + pair_p[b] * -(adv * lp_s[r] * m).sum() / 2
    g_base = _grads(student, total)
    g_kl = _grads(student, (p_row * full_reverse_kl(s_logits, t_logits, mask1).sum(-1)).sum())
    _assert_same_direction(g_base, g_kl)
    # the values: (S_t - v) / (n_t - 1) over masked rows; 0 for a position only one row reaches
    v = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 0.0], [5.0, 0.0, 0.0]])
    m = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    expected = torch.tensor([[4.0, 4.0, 0.0], [3.0, 2.0, 0.0], [2.0, 0.0, 0.0]])
    torch.testing.assert_close(leave_one_out_baseline(v, m), expected)
    torch.testing.assert_close(  # sums over a larger batch (another micro-batch holds row 2)
        leave_one_out_baseline(v[:2], m[:2], total=(v * m).sum(0), count=m.sum(0).float()), expected[:2]
    )
    with pytest.raises(ValueError, match="both total and count"):
        leave_one_out_baseline(v, m, total=v.sum(0))


def test_iw_prefix_weights_follow_the_iw_opd_formula():
    gap = torch.tensor([[1.0, -3.0, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    w = iw_prefix_weights(gap, mask, 0.5)
    # row 0: |a| = 1, 3, 0 (position 3 masked), total 4: w_t = 1 + 0.5 (1 - prefix / 4)
    torch.testing.assert_close(w[0], torch.tensor([1.5, 1.375, 1.0, 0.0]))
    torch.testing.assert_close(w[1], torch.tensor([1.5, 1.5, 0.0, 0.0]))  # all-zero row: ε floor, no NaN
    adv = sampled_token_advantages(gap, torch.zeros_like(gap), mask, prefix_gamma=0.5)
    torch.testing.assert_close(adv, -gap * w)
    torch.testing.assert_close(iw_prefix_weights(gap, mask, 0.0), mask.float())


def test_teacher_topk_logprobs_are_chunked_exact_and_sorted():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 7, 12, generator=g).bfloat16()
    ref = logits[..., :10].float().log_softmax(-1).topk(4, dim=-1)
    for chunk in (1, 3, 100):
        lp, ids = teacher_topk_logprobs(logits, 4, vocab_size=10, chunk_size=chunk)
        assert lp.dtype == torch.float32 and ids.dtype == torch.int64 and lp.shape == (3, 7, 4)
        torch.testing.assert_close(lp, ref.values)
        assert torch.equal(ids, ref.indices)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 10\]"):
        teacher_topk_logprobs(logits, 11, vocab_size=10)


def test_topk_kl_with_k_equal_to_the_vocabulary_is_full_kl_and_is_bounded_by_it():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(3, 5, 9, generator=g, dtype=torch.float64, requires_grad=True)
    t = 3 * torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 5, generator=g) > 0.3
    full = full_reverse_kl(s, t, mask, vocab_size=7)
    (g_full,) = torch.autograd.grad(full.sum(), s)
    lp, ids = teacher_topk_logprobs(t, 7, vocab_size=7)
    for chunk in (1, 4, 100):
        out = topk_reverse_kl(s, lp, ids, mask, vocab_size=7, chunk_size=chunk)
        torch.testing.assert_close(out, full)
        torch.testing.assert_close(torch.autograd.grad(out.sum(), s)[0], g_full)
    previous = torch.zeros_like(full)
    for k in (1, 2, 4, 6):  # coarser buckets: 0 <= KL_k <= KL_{k+1} <= KL (up to the rounding of 1 - Σ top-k)
        out = topk_reverse_kl(s, *teacher_topk_logprobs(t, k, vocab_size=7), mask, vocab_size=7)
        assert (out >= -1e-8).all() and (out <= full + 1e-8).all()
        assert (out >= previous - 1e-8).all()
        previous = out.detach()
        assert torch.autograd.grad(out.sum(), s)[0].isfinite().all()


@pytest.mark.parametrize("k", [1, 3])
def test_topk_kl_matches_its_formula_and_finite_differences(k):
    """KL_k against a direct evaluation of the (k+1)-bucket formula, and its gradient against torch's
    finite-difference check (float64)."""
    g = torch.Generator().manual_seed(6)
    s = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = 2 * torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    lp, ids = teacher_topk_logprobs(t, k)
    ps = s.softmax(-1).gather(-1, ids)
    pt = lp.exp()
    qs, qt = 1 - ps.sum(-1), 1 - pt.sum(-1)
    ref = ((ps * (ps.log() - pt.log())).sum(-1) + qs * (qs.log() - qt.log())) * mask
    torch.testing.assert_close(topk_reverse_kl(s, lp, ids, mask, chunk_size=2), ref)
    assert torch.autograd.gradcheck(lambda x: topk_reverse_kl(x, lp, ids, mask, chunk_size=2), (s,))
    with pytest.raises(ValueError, match="ids must lie in"):
        topk_reverse_kl(s, lp, ids + 6, mask)
    with pytest.raises(ValueError, match="share N and T"):
        topk_reverse_kl(s, lp[:, :2], ids[:, :2], mask)


def test_topk_kl_tail_floor_keeps_a_certain_teacher_finite():
    """A teacher whose top-k mass rounds to 1 (tail 0 in float32) gives a large but finite loss and gradient."""
    s = torch.zeros(1, 1, 5, requires_grad=True)
    lp = torch.tensor([[[0.0]]])  # p_T(top-1) = 1 exactly
    out = topk_reverse_kl(s, lp, torch.tensor([[[2]]]), torch.ones(1, 1, dtype=torch.bool))
    assert out.isfinite().all() and out.item() > 5.0
    assert torch.autograd.grad(out.sum(), s)[0].isfinite().all()
