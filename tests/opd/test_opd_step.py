"""One OPD step: its update equals a reference built from the tested loss functions (every option wired), the
loss registry drives the config and the trainer, and unusual heads fall back to logits with the same update."""

from __future__ import annotations

import copy

import pytest
import torch
from _distributed_check import tiny_model
from _opd_helpers import length_reward, make_cfg, make_trainer, reference_gradient

from sparse_opd_peft.opd import OPDConfig

# ---------------------------------------------------------------------------------------------------------------
# Wiring: the first step's update equals one computed independently from the (separately tested) loss functions.


@pytest.mark.parametrize(
    "overrides",
    [
        {"loss": "sampled_token", "sampled_token_baseline": "none"},
        {"loss": "sampled_token", "sampled_token_baseline": "position", "grad_accum": 2},
        {"loss": "sampled_token", "sampled_token_baseline": "none", "discount": 0.9, "sampled_token_clip": 0.5,
         "sampled_token_prefix_gamma": 0.5},
        {"loss": "sampled_token", "token_keep": "top_gap", "token_keep_ratio": 0.5},
        {"loss": "mix", "alpha": 0.3, "sampled_token_baseline": "position", "num_generations": 2},
        {"loss": "full_kl", "token_keep": "random", "token_keep_ratio": 0.5},
        {"loss": "full_kl", "off_policy": True},
        {"loss": "topk_kl", "topk": 3, "off_policy": True},
        {"loss": "topk_kl", "topk": 16},
    ],
    ids=["plain", "baseline+accum", "discount+clip+iw", "top_gap", "mix", "full_kl+random_keep", "full_kl+off_policy",
         "topk3+off_policy", "topk=V"],
)  # fmt: skip
def test_first_update_equals_the_reference_built_from_the_loss_functions(overrides):
    """SGD without momentum, clipping or decay, lr 0.5: the step moves every parameter by exactly -lr · ∇(loss of the
    configured objective on the step's rollouts), with the loss assembled here from the tested loss functions, so a
    trainer that ignored off_policy, discount, token_keep, alpha, the clip, the baseline or k would fail."""
    cfg = make_cfg(**{"optimizer": "sgd", "lr": 0.5, "lr_schedule": "constant", "max_grad_norm": None, "steps": 1,
                  "batch_size": 6, "num_generations": 1, "max_new_tokens": 5, **overrides})  # fmt: skip
    student, teacher = tiny_model(0), tiny_model(1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)  # a peaked teacher: large log-ratios, so the clip binds
    ref_student = copy.deepcopy(student)
    trainer = make_trainer(student, teacher, cfg, reward_fn=length_reward)
    grads = reference_gradient(trainer, ref_student, teacher)
    before = [p.detach().clone() for p in student.parameters()]
    trainer.train()
    moved = 0.0
    for p0, p1, g in zip(before, student.parameters(), grads, strict=True):
        torch.testing.assert_close(p1.detach() - p0, -0.5 * g, atol=2e-6, rtol=1e-4)
        moved += float(g.abs().sum())
    assert moved > 1e-3  # a real update


def test_variance_reduction_options_change_the_update():
    """The clip, the baseline and the IW-OPD weights each change the step (the wiring test would pass vacuously if
    they did nothing on the tiny setup)."""
    base = dict(optimizer="sgd", lr=0.5, lr_schedule="constant", max_grad_norm=None, steps=1, batch_size=6,
                loss="sampled_token", sampled_token_baseline="none")  # fmt: skip
    results = []
    for extra in ({}, {"sampled_token_clip": 0.5}, {"sampled_token_baseline": "position"},
                  {"sampled_token_prefix_gamma": 1.0}):  # fmt: skip
        student, teacher = tiny_model(0), tiny_model(1)
        with torch.no_grad():
            teacher.lm_head.weight.mul_(8.0)
        make_trainer(student, teacher, make_cfg(**{**base, **extra}), reward_fn=length_reward).train()
        results.append(torch.cat([p.detach().reshape(-1) for p in student.parameters()]))
    for other in results[1:]:
        assert (other - results[0]).abs().max() > 1e-5


def test_new_option_errors():
    with pytest.raises(ValueError, match="sampled_token_clip=0.0"):
        OPDConfig(sampled_token_clip=0.0)
    with pytest.raises(ValueError, match="sampled_token_baseline='batch'"):
        OPDConfig(sampled_token_baseline="batch")
    with pytest.raises(ValueError, match="sampled_token_prefix_gamma=-1"):
        OPDConfig(sampled_token_prefix_gamma=-1)
    with pytest.raises(ValueError, match="topk=0"):
        OPDConfig(loss="topk_kl", topk=0)
    with pytest.raises(ValueError, match="topk=17 exceeds the vocabulary \\(16 tokens\\)"):
        make_trainer(cfg=make_cfg(loss="topk_kl", topk=17))
    assert OPDConfig().loss == "full_kl" and OPDConfig().lr == 1e-3  # the defaults that learn on the toy world
    assert OPDConfig(loss="sampled_token").baseline == "position"
    assert OPDConfig(loss="mix", num_generations=2).baseline == "none"  # the paper's α-mix: raw OPD advantages
    assert OPDConfig(loss="mix", num_generations=2, sampled_token_baseline="position").baseline == "position"


# ---------------------------------------------------------------------------------------------------------------
# The loss registry: one entry per objective, which OPDConfig validates against and OPDTrainer dispatches through.


def test_loss_registry_matches_the_cli_choices_and_drives_the_config():
    from sparse_opd_peft import choices
    from sparse_opd_peft.opd.losses import LOSS_SPECS, TEACHER_SIGNALS

    assert tuple(LOSS_SPECS) == choices.LOSSES  # the torch-free names the CLI offers are exactly the registry's
    for name, spec in LOSS_SPECS.items():
        assert spec.teacher in TEACHER_SIGNALS and spec.grad in ("divergence", "logprobs")
        n = 2 if spec.reward else 1
        cfg = OPDConfig(loss=name, num_generations=n)
        assert cfg.spec is spec
        assert cfg.needs_teacher == (spec.teacher != "none") and cfg.needs_reward == spec.reward
        if not spec.advantages:
            with pytest.raises(ValueError, match="discount=0.5"):
                OPDConfig(loss=name, num_generations=n, discount=0.5)
        if spec.teacher == "none":
            with pytest.raises(ValueError, match="token_keep='top_gap'"):
                OPDConfig(loss=name, num_generations=n, token_keep="top_gap")


def test_a_loss_added_to_the_registry_is_validated_and_trained(monkeypatch):
    """One LossSpec entry is all a new objective needs: here half the full KL, whose first SGD update is half of
    full_kl's."""
    from sparse_opd_peft.opd import config as config_module
    from sparse_opd_peft.opd.losses import LOSS_SPECS, LossSpec

    half = LossSpec("logits", "divergence", lambda x: 0.5 * (x.divergence * x.mask).sum())
    monkeypatch.setitem(LOSS_SPECS, "half_kl", half)
    assert config_module.LOSS_SPECS is LOSS_SPECS
    base = dict(optimizer="sgd", lr=0.5, lr_schedule="constant", max_grad_norm=None, steps=1, batch_size=4)
    updates = []
    for loss in ("full_kl", "half_kl"):
        student = tiny_model(0)
        before = torch.cat([p.detach().reshape(-1).clone() for p in student.parameters()])
        history = make_trainer(student, cfg=make_cfg(loss=loss, **base), reward_fn=length_reward).train()
        assert "kl_exact" in history[0]
        updates.append(torch.cat([p.detach().reshape(-1) for p in student.parameters()]) - before)
    assert updates[0].abs().max() > 1e-4
    torch.testing.assert_close(updates[1], 0.5 * updates[0], atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Models whose logits are not exactly their nn.Linear head's output are scored from their logits (same update).


class _ScaledHead(torch.nn.Module):
    """An output embedding that is not a plain nn.Linear (logits scaled after the projection)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.5 * self.linear(x)


def _softcap_logits(module, args, kwargs, output):
    output.logits = 4.0 * torch.tanh(output.logits / 4.0)  # logit soft-capping after a plain head (Gemma-2 style)
    return output


def _unusual_head(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    if kind == "scaled_head":
        model.lm_head = _ScaledHead(model.lm_head)
    else:
        model.register_forward_hook(_softcap_logits, with_kwargs=True)
    return model


@pytest.mark.parametrize("kind", ["scaled_head", "softcap"])
@pytest.mark.parametrize("loss", ["full_kl", "topk_kl", "sampled_token"])
def test_unusual_heads_fall_back_to_logits_with_the_same_update(kind, loss):
    """A head module that is not an nn.Linear, or logits changed after a plain head (caught by the one-time check
    against the model's own logits), are scored from the logits: the first update still equals the reference."""
    cfg = make_cfg(optimizer="sgd", lr=0.5, lr_schedule="constant", max_grad_norm=None, steps=1, batch_size=6,
               num_generations=1, max_new_tokens=5, loss=loss, topk=3)  # fmt: skip
    student, teacher = _unusual_head(tiny_model(0), kind), _unusual_head(tiny_model(1), kind)
    ref_student = copy.deepcopy(student)
    trainer = make_trainer(student, teacher, cfg, reward_fn=length_reward)
    grads = reference_gradient(trainer, ref_student, teacher)
    before = [p.detach().clone() for p in student.parameters()]
    trainer.train()
    assert trainer._student_scorer.head is None and trainer._teacher_scorer.head is None
    for p0, p1, g in zip(before, student.parameters(), grads, strict=True):
        torch.testing.assert_close(p1.detach() - p0, -0.5 * g, atol=2e-6, rtol=1e-4)


def test_plain_heads_are_scored_from_hidden_states():
    trainer = make_trainer()
    trainer.train()
    assert trainer._student_scorer.head is not None and trainer._teacher_scorer.head is not None


def test_a_masked_lm_head_is_scored_through_the_model_and_trains():
    """A SparseOPD mask on ``lm_head`` makes the head a non-Linear adapter layer: the trainer scores that student from
    its own logits (no hidden-state shortcut that would bypass the adapter), so the head's values get a gradient."""
    from peft import get_peft_model

    from sparse_opd_peft import SparseOPDConfig

    student = tiny_model(0)
    w = student.lm_head.weight
    mask = {"lm_head": torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) < 0.2}
    pm = get_peft_model(student, SparseOPDConfig(mask=mask))
    values = dict(pm.named_parameters())["base_model.model.lm_head.sparse_opd_values.default"]
    before = values.detach().clone()
    trainer = make_trainer(pm, cfg=make_cfg(loss="full_kl", num_generations=1))
    trainer.train()
    assert trainer._student_scorer.head is None and trainer._teacher_scorer.head is not None
    assert (values.detach() - before).abs().max() > 1e-4
