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
        {},
        {"loss": "full_kl", "full_kl_chunk": 3},
        {"loss": "sft", "num_generations": 1},
        {"loss": "rlvr"},
        {"loss": "mix", "alpha": 0.5, "grpo_std_normalize": True},
        {"token_keep": "top_gap", "token_keep_ratio": 0.5, "discount": 0.9},
        {"token_keep": "random", "token_keep_ratio": 0.25, "grad_accum": 2},
        {"off_policy": True, "optimizer": "sgd", "momentum": 0.9, "lr_schedule": "constant", "weight_decay": 0.1},
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
    history = _trainer(student, teacher, _cfg(weight_decay=0.0)).train()
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
