"""OPDTrainer: every loss runs, PEFT students update only adapters, resume is exact, multi-process matches, tokenizer
checks, configuration errors."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _distributed_check import exact_reward, run, tiny_dataset, tiny_model, tiny_tokenizer
from accelerate import Accelerator
from safetensors.torch import load_file

from sparse_opd_peft.opd import OPDConfig, OPDTrainer, check_tokenizer_compat, trainable_state_dict

TIMING = ("tokens_per_s",)


def _cfg(**kw) -> OPDConfig:
    base = dict(lr=1e-2, steps=2, batch_size=4, num_generations=2, max_new_tokens=4, seed=1, progress_bar=False)
    return OPDConfig(**{**base, **kw})


def _length_reward(prompts, completions, answers):
    """A reward that differs between samples of a random model (the exact-answer reward is always 0 there)."""
    return [float(len(c)) for c in completions]


def _trainer(student=None, teacher="default", cfg=None, **kw) -> OPDTrainer:
    student = tiny_model(0) if student is None else student
    teacher = tiny_model(1) if teacher == "default" else teacher
    kw.setdefault("reward_fn", exact_reward)
    return OPDTrainer(
        student, teacher, tiny_tokenizer(), tiny_dataset(), cfg or _cfg(), accelerator=Accelerator(cpu=True), **kw
    )


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before: dict, model: torch.nn.Module) -> set[str]:
    return {k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])}


@pytest.mark.parametrize(
    "overrides",
    [
        {"loss": "sampled_token"},
        {"loss": "full_kl", "full_kl_chunk": 3},
        {"loss": "sft", "num_generations": 1},
        {"loss": "rlvr"},
        {"loss": "mix", "alpha": 0.5, "grpo_std_normalize": True},
        {"loss": "sampled_token", "token_keep": "top_gap", "token_keep_ratio": 0.5, "discount": 0.9},
        {"loss": "sampled_token", "token_keep": "random", "token_keep_ratio": 0.25, "grad_accum": 2},
        {
            "loss": "sampled_token",
            "off_policy": True,
            "optimizer": "sgd",
            "momentum": 0.9,
            "lr_schedule": "constant",
            "weight_decay": 0.1,
        },
    ],
    ids=["sampled_token", "full_kl", "sft", "rlvr", "mix", "top_gap+discount", "random+accum", "off_policy+sgd"],
)
def test_every_mode_trains_a_plain_student(overrides):
    student = tiny_model(0)
    before = _snapshot(student)
    history = _trainer(student, cfg=_cfg(**overrides), reward_fn=_length_reward).train()
    assert [h["step"] for h in history] == [1, 2]
    for h in history:
        assert all(torch.isfinite(torch.tensor(v)) for v in h.values())
        assert {"loss", "lr", "grad_norm", "completion_length", "eos_rate", "tokens_per_s"} <= set(h)
        assert ("kl" in h) == (overrides.get("loss") != "sft")
        assert ("reward" in h and "accuracy" in h) == (overrides.get("loss") != "sft")
    assert history[1]["lr"] == pytest.approx(1e-2 if overrides.get("lr_schedule") == "constant" else 5e-3)
    assert _changed(before, student)  # the weights moved


def test_sampled_kl_estimate_matches_exact_kl_and_teacher_may_be_bf16():
    """On the first step (same weights), the per-token Monte-Carlo estimate log p_s - log p_T over 256 samples is
    close to the exact reverse KL at the same prefixes; the teacher runs in bf16 (its log-probs are upcast)."""
    teacher = tiny_model(1).to(torch.bfloat16)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20.0)  # a peaked teacher: a KL far from 0
    h = _trainer(teacher=teacher, cfg=_cfg(loss="full_kl", steps=1, batch_size=32, num_generations=8)).train()[0]
    assert h["kl_exact"] > 0.1
    assert h["kl"] == pytest.approx(h["kl_exact"], rel=0.15)


def test_grad_accum_gives_the_same_update():
    students = [tiny_model(0), tiny_model(0)]
    for student, accum in zip(students, (1, 4), strict=True):
        _trainer(student, cfg=_cfg(batch_size=8, grad_accum=accum, steps=2, loss="mix")
                 , reward_fn=_length_reward).train()  # fmt: skip
    a, b = (s.state_dict() for s in students)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_identical_teacher_gives_zero_update():
    student = tiny_model(0)
    teacher = copy.deepcopy(student)
    before = _snapshot(student)
    history = _trainer(student, teacher, _cfg(loss="sampled_token", weight_decay=0.0)).train()
    assert all(h["kl"] == 0.0 and h["grad_norm"] == 0.0 for h in history)
    assert not _changed(before, student)


def test_lora_student_updates_only_adapter_parameters(tmp_path):
    from peft import LoraConfig, get_peft_model

    student = get_peft_model(tiny_model(0), LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    before = _snapshot(student)
    _trainer(student, cfg=_cfg(save_every=1, checkpoint_dir=str(tmp_path))).train()
    changed = _changed(before, student)
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_A" in k for k in changed) and any("lora_B" in k for k in changed)
    saved = load_file(str(tmp_path / "step_2.safetensors"))
    assert set(saved) == set(trainable_state_dict(student)) and all("lora_" in k for k in saved)
    assert sorted(p.name for p in tmp_path.glob("step_*.safetensors")) == [f"step_{k}.safetensors" for k in range(3)]


def test_sparse_opd_student_updates_only_masked_values():
    from peft import get_peft_model

    from sparse_opd_peft import SparseOPDConfig

    base = tiny_model(0)
    g = torch.Generator().manual_seed(0)
    mask = {n: torch.rand(m.weight.shape, generator=g) < 0.2 for n, m in base.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n}  # fmt: skip
    student = get_peft_model(base, SparseOPDConfig(mask=mask))
    before = _snapshot(student)
    _trainer(student).train()
    changed = _changed(before, student)
    assert changed and all("sparse_opd_" in k for k in changed)
    merged = student.merge_and_unload()
    delta = {n + ".weight": m.weight for n, m in merged.named_modules() if n in mask}
    ref = dict(tiny_model(0).named_parameters())
    for name, w in delta.items():
        moved = w.detach() != ref[name].detach()
        assert moved.any() and not (moved & ~mask[name[: -len(".weight")]]).any()  # only masked coordinates move


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path):
    cfg = dict(steps=4, save_every=2, token_keep="random", token_keep_ratio=0.5, eval_every=2, eval_samples=8)

    def make(d):
        t = _trainer(tiny_model(0), cfg=_cfg(checkpoint_dir=str(d), **cfg), eval_dataset=tiny_dataset(8, seed=9))
        return t, t.model

    full, full_model = make(tmp_path / "a")
    ref_history = full.train()
    first, _ = make(tmp_path / "b")
    first.train(max_steps=3)  # "killed" after step 3; the last saved state is step 2
    assert first.step == 3
    resumed, resumed_model = make(tmp_path / "b")
    history = resumed.train(resume_from="latest")
    assert resumed.step == 4
    a, b = full_model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    opt_a, opt_b = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"]) for i in opt_a)
    strip = lambda hs: [{k: v for k, v in h.items() if k not in TIMING} for h in hs]  # noqa: E731
    assert strip(history) == strip(ref_history) and "eval_accuracy" in history[1]
    with pytest.raises(ValueError, match="lr: saved 0.01 vs now 0.02"):
        bad = _cfg(lr=2e-2, checkpoint_dir=str(tmp_path / "b"), **cfg)
        _trainer(cfg=bad, eval_dataset=tiny_dataset(8, seed=9)).train(resume_from="latest")
    with pytest.raises(ValueError, match="not an OPDTrainer state directory"):
        _trainer().train(resume_from=str(tmp_path))


def test_evaluate_reports_greedy_accuracy():
    trainer = _trainer(eval_dataset=tiny_dataset(6, seed=5))
    out = trainer.evaluate()
    assert set(out) == {"eval_reward", "eval_accuracy", "eval_completion_length", "eval_eos_rate"}
    assert 0.0 <= out["eval_accuracy"] <= 1.0 and 1.0 <= out["eval_completion_length"] <= 4.0


def test_tokenizer_compat_checks():
    tok = tiny_tokenizer()
    check_tokenizer_compat(tok, tiny_tokenizer(), tiny_model(0), tiny_model(1, vocab_size=64))  # padded rows pass
    _trainer(teacher=tiny_model(1, vocab_size=64), teacher_tokenizer=tiny_tokenizer()).train(max_steps=1)
    with pytest.raises(ValueError, match=r"only in the student vocab: '\+', '='\n.*only in the teacher vocab: '\*'"):
        check_tokenizer_compat(tok, tiny_tokenizer(chars="0123456789*"))
    with pytest.raises(ValueError, match=r"EOS differs: student '<eos>' \(id 2\) vs teacher '<unk>' \(id 3\)"):
        check_tokenizer_compat(tok, tiny_tokenizer(eos="<unk>"))
    shifted = tiny_tokenizer(specials=("<pad>", "<bos>", "<unk>", "<eos>"))  # EOS moved from id 2 to id 3
    with pytest.raises(ValueError, match=r"(?s)different ids: '<eos>': student id 2 vs teacher id 3.*EOS differs"):
        check_tokenizer_compat(tok, shifted)
    with pytest.raises(ValueError, match=r"teacher model scores 8 ids but the tokenizer has 16"):
        _trainer(teacher=tiny_model(1, vocab_size=8))


def test_lr_schedule():
    cfg = OPDConfig(lr=1.0, steps=10, warmup_steps=2)
    assert [cfg.lr_at(k) for k in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    assert OPDConfig(lr=1.0, steps=10, lr_schedule="constant").lr_at(9) == 1.0


def test_configuration_errors():
    with pytest.raises(ValueError, match="loss='nope'"):
        OPDConfig(loss="nope")
    with pytest.raises(ValueError, match="num_generations=1.*group"):
        OPDConfig(loss="rlvr")
    with pytest.raises(ValueError, match="token_keep_ratio"):
        OPDConfig(token_keep="top_gap", token_keep_ratio=0.0)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        OPDConfig(save_every=5)
    with pytest.raises(ValueError, match="needs a teacher"):
        _trainer(teacher=None)
    with pytest.raises(ValueError, match="'prompt' column"):
        OPDTrainer(tiny_model(0), tiny_model(1), tiny_tokenizer(), tiny_dataset().rename_column("prompt", "q"), _cfg())
    frozen = tiny_model(0).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        _trainer(frozen)
    with pytest.raises(ValueError, match="batch_size=3"):
        _trainer(cfg=_cfg(batch_size=3, grad_accum=4))


def test_two_processes_match_one_process(tmp_path):
    """DDP over gloo with 2 CPU processes vs one process, same global batch (4 prompts x 2 samples, 3 AdamW steps).

    Rollouts are seeded per (seed, step, global prompt position, sample), so both runs sample the same tokens; the loss
    is normalised by the global token count, so the DDP gradient average equals the single-process gradient up to the
    float reduction order."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(Path(__file__).with_name("_distributed_check.py")), "--out", str(tmp_path / "multi")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = run(tmp_path / "single")
    multi = json.loads((tmp_path / "multi" / "history.json").read_text())
    assert multi["num_processes"] == 2 and single["num_processes"] == 1
    for h1, h2 in zip(single["history"], multi["history"], strict=True):
        assert h1["completion_length"] == h2["completion_length"] and h1["eos_rate"] == h2["eos_rate"]  # same rollouts
        assert h1["loss"] == pytest.approx(h2["loss"], rel=1e-5, abs=1e-7)
    a = load_file(str(tmp_path / "single" / "final.safetensors"))
    b = load_file(str(tmp_path / "multi" / "final.safetensors"))
    ref = dict(tiny_model(0).named_parameters())
    assert set(a) == set(b)
    for k in a:
        assert not torch.equal(a[k], ref[k])  # trained
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)


def test_save_trainable_state_of_plain_student(tmp_path):
    trainer = _trainer()
    trainer.save_trainable_state(Path(tmp_path) / "s.safetensors")
    saved = load_file(str(tmp_path / "s.safetensors"))
    linears = [n for n, m in tiny_model(0).named_modules() if isinstance(m, torch.nn.Linear)]
    assert set(saved) == {n + ".weight" for n in linears}


# ---------------------------------------------------------------------------------------------------------------
# Wiring: the first step's update equals one computed independently from the (separately tested) loss functions.


def _reference_gradient(trainer: OPDTrainer, student: torch.nn.Module, teacher: torch.nn.Module) -> list[torch.Tensor]:
    """The gradient of the configured loss for step 0, built from the public loss functions on rollouts generated
    here (same seeds), with ``student`` a copy of the trainer's student before the step."""
    from sparse_opd_peft.opd import decode_completions, generate_rollouts, sample_seed
    from sparse_opd_peft.opd import losses as L

    cfg, tok = trainer.config, trainer.tokenizer
    v, n = len(tok), cfg.num_generations
    items = trainer._items(0)
    prompts = [trainer._prompts[i] for _, i in items]
    seeds = [sample_seed(cfg.seed, "rollout", pos, k) for pos, _ in items for k in range(n)]
    ro = generate_rollouts(teacher if cfg.off_policy else student, tok, prompts, max_new_tokens=cfg.max_new_tokens,
                           num_generations=n, seeds=seeds, vocab_size=v)  # fmt: skip
    mask, ids, c = ro.completion_mask, ro.completion_ids, ro.completion_ids.shape[1]

    def logits(model):
        out = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=ro.position_ids).logits
        return out[:, -(c + 1) : -1]

    s_logits = logits(student)
    with torch.no_grad():
        t_logits = logits(teacher)
    lp_s, lp_t = L.token_logprobs(s_logits, ids, v), L.token_logprobs(t_logits, ids, v)
    keep = None
    if cfg.token_keep != "all":
        scores = torch.stack([
            torch.rand(cfg.max_new_tokens, generator=torch.Generator().manual_seed(sample_seed(cfg.seed, "keep", pos, k)))[:c]
            for pos, _ in items for k in range(n)
        ])  # fmt: skip
        keep = L.token_keep_weights(lp_s.detach() - lp_t, mask, cfg.token_keep, cfg.token_keep_ratio, scores)
    if cfg.loss == "full_kl":
        loss = (L.full_reverse_kl(s_logits, t_logits, mask, v) * (mask if keep is None else keep)).sum()
    elif cfg.loss == "topk_kl":
        top_lp, top_ids = L.teacher_topk_logprobs(t_logits, cfg.topk, v)
        loss = (L.topk_reverse_kl(s_logits, top_lp, top_ids, mask, v) * (mask if keep is None else keep)).sum()
    else:
        adv = L.sampled_token_advantages(lp_s, lp_t, mask, cfg.discount, keep, cfg.sampled_token_clip,
                                         cfg.sampled_token_prefix_gamma)  # fmt: skip
        if cfg.baseline == "position":
            adv = adv - L.leave_one_out_baseline(adv, mask)
        if cfg.loss == "mix":
            texts = decode_completions(tok, ro)
            rewards = torch.tensor(_length_reward(None, texts, None))
            adv = L.mix_advantages(adv, L.grpo_advantages(rewards, n, cfg.std_normalize), cfg.alpha, mask)
        loss = L.policy_gradient_loss(lp_s, adv, mask, 1.0)
    params = [p for p in student.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss / mask.sum(), params))


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
    cfg = _cfg(**{"optimizer": "sgd", "lr": 0.5, "lr_schedule": "constant", "max_grad_norm": None, "steps": 1,
                  "batch_size": 6, "num_generations": 1, "max_new_tokens": 5, **overrides})  # fmt: skip
    student, teacher = tiny_model(0), tiny_model(1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)  # a peaked teacher: large log-ratios, so the clip binds
    ref_student = copy.deepcopy(student)
    trainer = _trainer(student, teacher, cfg, reward_fn=_length_reward)
    grads = _reference_gradient(trainer, ref_student, teacher)
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
        _trainer(student, teacher, _cfg(**{**base, **extra}), reward_fn=_length_reward).train()
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
        _trainer(cfg=_cfg(loss="topk_kl", topk=17))
    assert OPDConfig().loss == "full_kl" and OPDConfig().lr == 1e-3  # the defaults that learn on the toy world
    assert OPDConfig(loss="sampled_token").baseline == "position"
    assert OPDConfig(loss="mix", num_generations=2).baseline == "none"  # the paper's α-mix: raw OPD advantages
    assert OPDConfig(loss="mix", num_generations=2, sampled_token_baseline="position").baseline == "position"


# ---------------------------------------------------------------------------------------------------------------
# Each estimator learns on the shipped toy world (one seed, a short budget; the full-budget comparison over seeds is
# benchmarks/bench_estimators.py -> benchmarks/results/estimators.md).

TOY_STEPS = 80
TOY_EVAL = 500


@pytest.fixture(scope="module")
def toy_world():
    from sparse_opd_peft.lab.toy import load_world

    return load_world()


@pytest.mark.parametrize(
    ("overrides", "min_gain"),
    [
        ({"loss": "full_kl"}, 0.35),  # measured: 26.6 % -> 76.4 % (500 prompts)
        ({"loss": "topk_kl", "topk": 1}, 0.35),  # -> 77.0 %
        ({"loss": "sampled_token"}, 0.20),  # the default per-position baseline: -> 59.4 % (plain estimator: 4.4 %)
    ],
    ids=["full_kl", "topk_kl_k1", "sampled_token_baseline"],
)
def test_each_estimator_learns_on_the_toy_world(toy_world, overrides, min_gain):
    from dataclasses import replace

    from sparse_opd_peft.lab.toy import ToyRunConfig, heldout_accuracy
    from sparse_opd_peft.lab.toy.runs import opd_config, toy_reward_fn

    world = toy_world
    anchor = heldout_accuracy(world.load_student(), world, "add", TOY_EVAL)
    run = ToyRunConfig(task="add").with_(steps=TOY_STEPS, seed=0, progress_bar=False)
    cfg = replace(opd_config(world, run), **overrides)
    trainer = OPDTrainer(world.load_student(), world.teacher, world.tokenizer, world.datasets["add"]["train"], cfg,
                         reward_fn=toy_reward_fn(world, "add"))  # fmt: skip
    trainer.train()
    acc = heldout_accuracy(trainer.accelerator.unwrap_model(trainer.model), world, "add", TOY_EVAL)
    assert acc >= anchor + min_gain, f"{overrides}: {anchor:.3f} -> {acc:.3f}"


def test_configs_saved_before_the_baseline_resume_with_the_plain_estimator():
    old = {k: v for k, v in OPDConfig(loss="sampled_token").to_dict().items() if k != "sampled_token_baseline"}
    cfg = OPDConfig.from_dict(old)
    assert cfg.baseline == "none"  # the estimator that run used
    assert cfg.trajectory_diff(OPDConfig(loss="sampled_token")) == {"sampled_token_baseline": ("none", "position")}
    assert cfg.trajectory_diff(OPDConfig(loss="sampled_token", sampled_token_baseline="none")) == {}
    full = {k: v for k, v in OPDConfig().to_dict().items() if k != "sampled_token_baseline"}
    assert OPDConfig.from_dict(full).trajectory_diff(OPDConfig()) == {}  # irrelevant to full_kl


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
        history = _trainer(student, cfg=_cfg(loss=loss, **base), reward_fn=_length_reward).train()
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
    cfg = _cfg(optimizer="sgd", lr=0.5, lr_schedule="constant", max_grad_norm=None, steps=1, batch_size=6,
               num_generations=1, max_new_tokens=5, loss=loss, topk=3)  # fmt: skip
    student, teacher = _unusual_head(tiny_model(0), kind), _unusual_head(tiny_model(1), kind)
    ref_student = copy.deepcopy(student)
    trainer = _trainer(student, teacher, cfg, reward_fn=_length_reward)
    grads = _reference_gradient(trainer, ref_student, teacher)
    before = [p.detach().clone() for p in student.parameters()]
    trainer.train()
    assert trainer._student_scorer.head is None and trainer._teacher_scorer.head is None
    for p0, p1, g in zip(before, student.parameters(), grads, strict=True):
        torch.testing.assert_close(p1.detach() - p0, -0.5 * g, atol=2e-6, rtol=1e-4)


def test_plain_heads_are_scored_from_hidden_states():
    trainer = _trainer()
    trainer.train()
    assert trainer._student_scorer.head is not None and trainer._teacher_scorer.head is not None
