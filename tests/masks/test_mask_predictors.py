"""Mask predictors: score top-k, rank combinations, gradient statistics (planted and through OPDTrainer),
agreement metrics and their random expectation."""

from __future__ import annotations

import pytest
import torch
from _distributed_check import exact_reward, tiny_dataset, tiny_model, tiny_tokenizer
from accelerate import Accelerator
from transformers import Qwen3Config, Qwen3ForCausalLM

from sparse_opd_peft import masks as mp
from sparse_opd_peft.masks.gradient import _Recorder
from sparse_opd_peft.opd import OPDConfig, OPDTrainer

A, B = "model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj"


def bools(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


# ------------------------------------------------------------------------------------------ scores -> masks
def test_mask_from_scores_global_per_module_and_ffn_share():
    scores = {A: torch.tensor([[5.0, 1.0, 3.0, 3.0]]), B: torch.tensor([[4.0, 0.0, 2.0, 6.0]])}
    m = mp.mask_from_scores(scores, 0.5)  # 4 of 8: 6, 5, 4, then one of the tied 3s (first by flat index)
    assert m[A].tolist() == [[True, False, True, False]] and m[B].tolist() == [[True, False, False, True]]
    assert m.metadata["achieved_density"] == 0.5
    pm = mp.mask_from_scores(scores, 0.25, per_module=True)
    assert pm[A].tolist() == [[True, False, False, False]] and pm[B].tolist() == [[False, False, False, True]]
    ffn = mp.mask_from_scores(scores, 0.5, ffn_share=0.75)  # 3 FFN (A) coordinates, 1 attention (B)
    assert ffn.nnz(A) == 3 and ffn[B].tolist() == [[False, False, False, True]]
    assert mp.mask_from_scores(scores, 0.125).nnz() == 1 and list(mp.mask_from_scores(scores, 0.125)) == [B]
    signed_zero = mp.mask_from_scores({A: torch.tensor([[-0.0, 1.0, 0.0, 2.0]])}, 0.5)  # -0.0 must not break radix
    assert signed_zero.indices(A).tolist() == [1, 3]


@pytest.mark.parametrize(
    "scores, kw, match",
    [
        ({}, {"density": 0.1}, "non-empty"),
        ({A: torch.ones(4)}, {"density": 0.1}, "2-D float"),
        ({A: torch.ones(2, 2, dtype=torch.long)}, {"density": 0.1}, "2-D float"),
        ({A: torch.tensor([[1.0, float("nan")]])}, {"density": 0.5}, "non-finite|NaN|nan"),
        ({A: torch.ones(2, 2)}, {"density": 0.0}, "density"),
        ({A: torch.ones(2, 2)}, {"density": 0.5, "ffn_share": 1.5}, "ffn_share"),
        ({A: torch.ones(2, 2), B: torch.ones(2, 2)}, {"density": 1.0, "ffn_share": 1.0}, "asks for"),
    ],
)
def test_mask_from_scores_errors(scores, kw, match):
    with pytest.raises(ValueError, match=match):
        mp.mask_from_scores(scores, **kw)


def test_rank_normalise_and_combinations():
    r = mp.rank_normalise({A: torch.tensor([[10.0, 20.0]]), B: torch.tensor([[20.0, 5.0]])})
    assert r[A].tolist() == [[0.5, 0.875]] and r[B].tolist() == [[0.875, 0.25]]  # tie 20 shares ranks 3,4
    s1 = {A: torch.tensor([[1.0, 2.0, 3.0, 4.0]])}
    s2 = {A: torch.tensor([[40.0, 30.0, 20.0, 10.0]])}
    mean = mp.combine_scores([s1, s2])
    assert torch.allclose(mean[A], torch.full((1, 4), 0.625))
    prod = mp.combine_scores([s1, s2], "rank_product", weights=[1, 1])
    assert torch.allclose(prod[A], torch.tensor([[1.0, 1.5, 1.5, 1.0]]).sqrt() / 2)
    w = mp.combine_scores([s1, s2], weights=[3, 1])  # leans on s1's order
    assert w[A].argmax() == 3
    with pytest.raises(ValueError, match="same modules"):
        mp.combine_scores([s1, {B: torch.ones(1, 4)}])
    with pytest.raises(ValueError, match="at least two"):
        mp.combine_scores([s1])
    with pytest.raises(ValueError, match="how"):
        mp.combine_scores([s1, s2], how="max")
    with pytest.raises(ValueError, match="weights"):
        mp.combine_scores([s1, s2], weights=[1, -1])


def test_low_magnitude_scores_rank_like_low_magnitude_mask():
    model = tiny_model(0)
    scores = mp.low_magnitude_scores(model)
    assert all(s.dtype == torch.float32 and s.dim() == 2 and (s <= 0).all() for s in scores.values())
    pm = mp.mask_from_scores(scores, 0.3, per_module=True)
    lm = mp.low_magnitude(model, 0.3)
    assert all(torch.equal(pm[n], lm[n]) for n in lm) and set(pm) == set(lm)


# ------------------------------------------------------------------------------------------ gradient statistics
def test_recorder_matches_planted_gradients_and_torch_adam():
    torch.manual_seed(0)
    grads = [torch.randn(3, 4) for _ in range(5)]
    grads[0][0, 0] = grads[1][0, 0] = grads[2][0, 0] = grads[3][0, 0] = grads[4][0, 0] = 0.5  # constant sign
    for t, g in enumerate(grads):
        g[0, 1] = 0.25 * (-1) ** t  # alternating sign, odd count: Σg = 0.25
    w = torch.nn.Parameter(torch.randn(3, 4))
    rec = _Recorder([w], {id(w): "m"}, {"sum", "abs", "sq", "m", "v", "upd"}, (0.9, 0.999), 1e-8)
    ref = torch.nn.Parameter(w.detach().clone())
    adam = torch.optim.Adam([ref], lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    w0 = w.detach().clone()
    for g in grads:
        w.grad, ref.grad = g.clone(), g.clone()
        rec.step()
        adam.step()
    assert torch.equal(w.detach(), w0)  # never moves
    stats = mp.GradientStatistics(rec.acc, len(grads))
    stack = torch.stack(grads)
    assert torch.allclose(stats.score("abs")["m"], stack.abs().sum(0))
    assert torch.allclose(stats.score("sq")["m"], (stack**2).sum(0))
    assert torch.allclose(stats.score("net")["m"], stack.sum(0).abs())
    assert torch.allclose(stats.score("adam_v")["m"], adam.state[ref]["exp_avg_sq"] / (1 - 0.999**5))
    assert torch.allclose(rec.acc["v"]["m"], adam.state[ref]["exp_avg_sq"])
    # Adam with fixed (planted) gradients moves by exactly lr · Σ m̂/(√v̂ + eps)
    assert torch.allclose(w0 - ref.detach(), 1e-3 * rec.acc["upd"]["m"], atol=1e-7)
    snr = stats.score("snr")["m"]
    assert snr[0, 0] == pytest.approx(1.0) and snr[0, 1] == pytest.approx(0.25 / (5 * 5 * 0.25**2) ** 0.5)
    assert stats.score("adam_update")["m"][0, 0] == pytest.approx(5.0, rel=1e-6)  # sign-only: n steps of 1
    again = mp.GradientStatistics.from_state_dict(stats.state_dict(), 5)
    assert torch.equal(again.score("snr")["m"], snr)
    with pytest.raises(ValueError, match="unknown gradient statistic"):
        stats.score("fisher")
    with pytest.raises(ValueError, match="needs accumulators"):
        mp.GradientStatistics({"abs": {"m": torch.ones(1, 1)}}, 1).score("sq")


def _cfg(**kw) -> OPDConfig:
    base = dict(loss="full_kl", lr=1.0, lr_schedule="constant", optimizer="sgd", max_grad_norm=None, steps=3,
                batch_size=4, max_new_tokens=4, seed=1, progress_bar=False)  # fmt: skip
    return OPDConfig(**{**base, **kw})


def test_gradient_statistics_are_the_trainer_gradients_at_the_anchor():
    """Batch k's gradient at W0 = W0 - W1 of one SGD step (lr 1) of a trainer started at step k from W0."""
    tok, data = tiny_tokenizer(), tiny_dataset()
    stats = mp.gradient_statistics(tiny_model(0), tiny_model(1), tok, data, _cfg(), batches=3, reward_fn=exact_reward)
    grads = []
    for k in range(3):
        student = tiny_model(0)
        w0 = {n: p.detach().clone() for n, p in student.named_parameters()}
        trainer = OPDTrainer(student, tiny_model(1), tok, data, _cfg(), accelerator=Accelerator(cpu=True))
        trainer.step = k
        trainer.train(max_steps=k + 1)
        grads.append({n[: -len(".weight")]: w0[n] - p.detach() for n, p in student.named_parameters()
                      if n[: -len(".weight")] in stats.accumulators["sum"]})  # fmt: skip
    assert set(stats.accumulators["sum"]) == set(grads[0]) and len(grads[0]) == 14  # 2 layers × 7 Linears
    for n in grads[0]:
        g = torch.stack([gr[n] for gr in grads])
        assert torch.allclose(stats.accumulators["sum"][n], g.sum(0), atol=1e-6)
        assert torch.allclose(stats.score("sq")[n], (g**2).sum(0), atol=1e-7)
    assert stats.batches == 3 and len(stats.history) == 3 and stats.seconds > 0
    assert torch.count_nonzero(stats.score("abs")[next(iter(grads[0]))]) > 0


def test_gradient_statistics_subset_modules_and_errors():
    tok, data = tiny_tokenizer(), tiny_dataset()
    student = tiny_model(0)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    stats = mp.gradient_statistics(student, tiny_model(1), tok, data, _cfg(optimizer="adamw", lr=0.1), batches=2,
                                   modules=r"mlp", statistics=["snr"], reward_fn=exact_reward)  # fmt: skip
    assert all(torch.equal(before[n], p) for n, p in student.named_parameters())
    assert set(stats.accumulators) == {"sum", "sq"} and all("mlp" in n for n in stats.accumulators["sum"])
    m = mp.gradient_mask(stats, 0.1, "snr")
    assert m.metadata["predictor"] == "gradient" and m.metadata["statistic"] == "snr" and m.metadata["batches"] == 2
    with pytest.raises(ValueError, match="needs accumulators"):
        stats.score("abs")
    with pytest.raises(ValueError, match="batches"):
        mp.gradient_statistics(student, tiny_model(1), tok, data, _cfg(), batches=0)
    with pytest.raises(ValueError, match="OPDConfig"):
        mp.gradient_statistics(student, tiny_model(1), tok, data, {"lr": 1}, batches=1)
    with pytest.raises(ValueError, match="statistics"):
        mp.gradient_statistics(student, tiny_model(1), tok, data, _cfg(), batches=1, statistics=["fisher"])
    student.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        mp.gradient_statistics(student, tiny_model(1), tok, data, _cfg(), batches=1)


def test_early_delta_mask(tmp_path):
    src = Qwen3ForCausalLM(Qwen3Config(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=8))  # fmt: skip
    snap = Qwen3ForCausalLM(src.config)
    snap.load_state_dict(src.state_dict())
    with torch.no_grad():
        snap.model.layers[0].mlp.up_proj.weight[0, :4] += 1.0
    m = mp.early_delta_mask(src, snap, 4 / sum(s.numel() for s in mp.low_magnitude_scores(src).values()))
    up = "model.layers.0.mlp.up_proj"
    assert list(m) == [up] and m.indices(up).tolist() == [0, 1, 2, 3]
    assert m.metadata["predictor"] == "early_delta" and m.metadata["rule"] == "topk"
    assert mp.early_delta_mask(src, snap, rule="bf16_visible").nnz() == 4
    with pytest.raises(ValueError, match="rule"):
        mp.early_delta_mask(src, snap, 0.1, rule="abs_threshold")
