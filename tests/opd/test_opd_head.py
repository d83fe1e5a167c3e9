"""The chunked head: OPD objectives from hidden states x lm_head (no (M, V) logits tensor) equal the logits
functions in values and gradients, pass finite differences, and refuse bad input."""

from __future__ import annotations

import pytest
import torch

from sparse_opd_peft.opd import (
    full_reverse_kl,
    teacher_topk_logprobs,
    token_logprobs,
    topk_reverse_kl,
)


def _grads(model, loss):
    params = [q for q in model.parameters() if q.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])


# ---------------------------------------------------------------------------------------------------------------
# The chunked head (hidden states x lm_head, no (M, V) tensor): same values and gradients as the logits functions.


def _head_case(seed: int, m: int = 7, h: int = 5, rows: int = 11, h_t: int = 4):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(m, h, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(rows, h, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(rows, generator=g, dtype=torch.float64, requires_grad=True)
    h_teacher = 2 * torch.randn(m, h_t, generator=g, dtype=torch.float64)
    w_teacher = torch.randn(rows, h_t, generator=g, dtype=torch.float64)
    y = torch.randint(0, 9, (m,), generator=g)
    return hid, w, b, h_teacher, w_teacher, y


@pytest.mark.parametrize("grad", [("divergence",), ("logprobs",), ("divergence", "logprobs")])
def test_head_objectives_equal_the_logits_functions_in_value_and_gradient(grad):
    """Values and gradients w.r.t. the hidden states, the head weight and its bias (a trained head) equal those of
    token_logprobs / full_reverse_kl on the materialised logits, for any chunking; the padded head rows (>= 9) get
    no gradient."""
    from sparse_opd_peft.opd.losses import head_logits_fn, head_objectives

    hid, w, b, ht, wt, y = _head_case(0)
    v, ones = 9, torch.ones(1, 7, dtype=torch.bool)
    z, zt = (hid @ w.T + b)[None], (ht @ wt.T)[None]
    ref_lp, ref_kl = token_logprobs(z, y[None], v)[0], full_reverse_kl(z, zt, ones, v)[0]
    c1, c2 = torch.linspace(-1, 1, 7, dtype=torch.float64), torch.linspace(2, 0.5, 7, dtype=torch.float64)
    weigh = lambda lp, kl: ("logprobs" in grad) * (c1 * lp).sum() + ("divergence" in grad) * (c2 * kl).sum()  # noqa: E731
    ref_grads = torch.autograd.grad(weigh(ref_lp, ref_kl), (hid, w, b))
    for chunk in (1, 3, 100):
        out = head_objectives(hid, w, b, y, vocab_size=v, chunk_size=chunk, teacher_logits=head_logits_fn(ht, wt, None, hid.device, v), grad=grad)  # fmt: skip
        torch.testing.assert_close(out.logprobs, ref_lp)
        torch.testing.assert_close(out.divergence, ref_kl)
        torch.testing.assert_close(out.gap, ref_lp - token_logprobs(zt, y[None], v)[0])
        grads = torch.autograd.grad(weigh(out.logprobs, out.divergence), (hid, w, b))
        for a, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(a, r)
        assert grads[1][v:].abs().max() == 0 and grads[2][v:].abs().max() == 0
    # the outputs not named in grad are constants
    out = head_objectives(hid, w, b, y, vocab_size=v, teacher_logits=head_logits_fn(ht, wt, None, hid.device, v), grad=grad)  # fmt: skip
    assert out.logprobs.requires_grad == ("logprobs" in grad) and out.divergence.requires_grad == ("divergence" in grad)


@pytest.mark.parametrize("teacher", ["full", "top3"])
def test_head_objectives_pass_finite_differences(teacher):
    """torch's finite-difference check (float64) of the hand-written backward, w.r.t. hidden states, weight, bias."""
    from sparse_opd_peft.opd.losses import head_logits_fn, head_objectives

    hid, w, b, ht, wt, y = _head_case(1, m=4, h=3, rows=6, h_t=2)
    y = y % 5
    if teacher == "full":
        kw = {"teacher_logits": head_logits_fn(ht, wt, None, hid.device, 5)}
    else:
        lp, ids = teacher_topk_logprobs((ht @ wt.T)[None], 3, vocab_size=5)
        kw = {"teacher_topk": (lp[0], ids[0])}
    c = torch.tensor([0.5, -1.0, 2.0, 1.5], dtype=torch.float64)

    def f(h_, w_, b_):
        out = head_objectives(h_, w_, b_, y, vocab_size=5, chunk_size=3, grad=("divergence", "logprobs"), **kw)
        return out.divergence * c + out.logprobs

    assert torch.autograd.gradcheck(f, (hid, w, b))


def test_head_topk_kl_equals_topk_reverse_kl_and_with_k_equal_to_the_vocabulary_the_full_kl():
    from sparse_opd_peft.opd.losses import head_logits_fn, head_objectives, head_teacher_signal

    hid, w, b, ht, wt, y = _head_case(2)
    v, ones = 9, torch.ones(1, 7, dtype=torch.bool)
    z, zt = (hid @ w.T + b)[None], (ht @ wt.T)[None]
    full = head_objectives(hid, w, b, y, vocab_size=v, teacher_logits=head_logits_fn(ht, wt, None, hid.device, v))
    (g_full,) = torch.autograd.grad(full.divergence.sum(), hid)
    for k in (1, 4, v):
        t_lp, t_ids = teacher_topk_logprobs(zt, k, vocab_size=v)
        lp_head, top_lp, top_ids = head_teacher_signal(ht, wt, None, y, v, 2, topk=k)
        torch.testing.assert_close(top_lp, t_lp[0])
        assert torch.equal(top_ids, t_ids[0])
        torch.testing.assert_close(lp_head, token_logprobs(zt, y[None], v)[0])
        out = head_objectives(hid, w, b, y, vocab_size=v, chunk_size=3, teacher_topk=(top_lp, top_ids))
        ref = topk_reverse_kl(z, t_lp, t_ids, ones, vocab_size=v)[0]
        torch.testing.assert_close(out.divergence, ref)
        (g_out,) = torch.autograd.grad(out.divergence.sum(), hid)
        torch.testing.assert_close(g_out, torch.autograd.grad(ref.sum(), hid, retain_graph=True)[0])
        # the gap is the log-ratio of the sampled token's bucket: its own inside the top-k, the tail's outside
        in_k = (top_ids == y[:, None]).any(-1)
        own = token_logprobs(z, y[None], v)[0] - lp_head
        torch.testing.assert_close(out.gap[in_k], own[in_k].detach())
        if k == v:
            torch.testing.assert_close(out.divergence, full.divergence)
            torch.testing.assert_close(g_out, g_full)


def test_head_objectives_accept_logits_and_reject_bad_input():
    """Logits in place of hidden states (weight None: the fallback for heads that are not a plain Linear) give the
    same values and gradients as the logits functions; malformed calls raise naming the problem."""
    from sparse_opd_peft.opd.losses import head_logits_fn, head_objectives

    hid, w, b, ht, wt, y = _head_case(3)
    z = (hid @ w.T + b).detach().bfloat16().requires_grad_(True)
    zt = ht @ wt.T
    out = head_objectives(z, None, None, y, vocab_size=9, chunk_size=2, grad=("divergence", "logprobs"),
                          teacher_logits=head_logits_fn(zt, None, None, z.device, 9))  # fmt: skip
    ones = torch.ones(1, 7, dtype=torch.bool)
    ref = full_reverse_kl(z[None], zt[None], ones, 9)[0] + token_logprobs(z[None], y[None], 9)[0]
    torch.testing.assert_close(out.divergence + out.logprobs, ref)
    torch.testing.assert_close(
        torch.autograd.grad((out.divergence + out.logprobs).sum(), z)[0], torch.autograd.grad(ref.sum(), z)[0]
    )
    with pytest.raises(ValueError, match="vocab_size=12 must lie in"):
        head_objectives(hid, w, b, y, vocab_size=12, grad=("logprobs",))
    with pytest.raises(ValueError, match="needs a teacher"):
        head_objectives(hid, w, b, y, vocab_size=9)
    with pytest.raises(ValueError, match="ids must lie in"):
        head_objectives(hid, w, b, y, vocab_size=9, teacher_topk=(torch.zeros(7, 2), torch.full((7, 2), 9)))
