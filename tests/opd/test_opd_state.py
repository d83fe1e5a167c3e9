"""Pickle-free resumable OPDTrainer state: only .json / .safetensors on disk, bit-exact resume (AdamW and SGD
momentum, plain and SparseOPD students, global RNGs included), clear errors that leave the model untouched, and a
2-process DDP save / resume."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _distributed_check import exact_reward, tiny_dataset, tiny_model, tiny_tokenizer
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from sparse_opd_peft.opd import OPDConfig, OPDTrainer
from sparse_opd_peft.opd import _state_io as sio
from sparse_opd_peft.opd.checkpoint import load_training_state

TIMING = ("tokens_per_s",)
OPTIMIZERS = {"adamw": {}, "sgd_momentum": {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.1}}


def _cfg(**kw) -> OPDConfig:
    base = dict(lr=1e-2, steps=4, batch_size=4, num_generations=2, max_new_tokens=4, seed=1, progress_bar=False)
    return OPDConfig(**{**base, **kw})


def _mask(density: float = 0.2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(m.weight.shape, generator=g) < density for n, m in tiny_model(0).named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n}  # fmt: skip


def _student(kind: str = "plain", mask=None, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny Qwen3 with attention dropout (so the global torch RNG matters), plain or with an adapter."""
    base = tiny_model(0, attention_dropout=0.1).to(dtype)
    if kind == "plain":
        return base
    from peft import LoraConfig, get_peft_model

    from sparse_opd_peft import SparseOPDConfig

    if kind == "lora":
        return get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    return get_peft_model(base, SparseOPDConfig(mask=_mask() if mask is None else mask))


def _trainer(student: torch.nn.Module, **cfg) -> OPDTrainer:
    return OPDTrainer(student, tiny_model(1), tiny_tokenizer(), tiny_dataset(), _cfg(**cfg),
                      reward_fn=exact_reward, accelerator=Accelerator(cpu=True))  # fmt: skip


def _assert_same(a, b, where: str = "") -> None:
    """Exact equality: same types (tuple vs list, int vs float, tensor dtype / shape) and the same values."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}.{i}")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), f"{where}: {a!r} vs {b!r}"


def _rngs() -> tuple:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def _everything(trainer: OPDTrainer) -> dict:
    """Model, optimizer, global RNGs and bookkeeping of ``trainer``: deep copies to compare with later."""
    return copy.deepcopy({"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                          "rng": _rngs(), "step": trainer.step, "history": trainer.history})  # fmt: skip


def _strip(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


# ------------------------------------------------------------------------------------------------ format
def test_codec_round_trips_optimizer_values_exactly():
    group = {"lr": 0.1, "betas": (0.9, 0.999), "eps": float("inf"), "x": float("nan"), "foreach": None,
             "params": [0, 7], "t": torch.tensor(1, dtype=torch.int64)}  # fmt: skip
    state = {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3, dtype=torch.bfloat16)},
             7: {"momentum_buffer": None, "n": 2, "flag": True}}  # fmt: skip
    value = {"state": state, "param_groups": [group]}
    tensors: dict[str, torch.Tensor] = {}
    encoded = json.loads(json.dumps(sio.encode(value, (), tensors)))
    assert set(tensors) == {"state.0.step", "state.0.exp_avg", "param_groups.0.t"}
    _assert_same(sio.decode(encoded, tensors), value)
    with pytest.raises(TypeError, match="without pickle"):
        sio.encode({"fn": object()}, (), {})


@pytest.mark.parametrize("kind", ["plain", "sparse_opd"])
def test_state_dir_holds_only_json_and_safetensors_and_only_trainable_tensors(tmp_path, kind):
    ckpt = tmp_path / "ckpt"
    (ckpt / "state.tmp").mkdir(parents=True)  # a stale half-written save: replaced, never read
    (ckpt / "state.tmp" / "junk.pkl").write_bytes(b"\x80\x04")
    trainer = _trainer(_student(kind), steps=2, save_every=1, checkpoint_dir=str(ckpt))
    trainer.train()
    state = ckpt / "state"
    files = sorted(p.name for p in state.iterdir())
    assert all(p.is_file() and p.suffix in (".json", ".safetensors") for p in state.iterdir()), files
    assert files == sorted(["opd_trainer_state.json", "manifest.json", "trainable.safetensors", "optimizer.json",
                            "optimizer.safetensors", "rng_0.json", "rng_0.safetensors"])  # fmt: skip
    assert not (ckpt / "state.tmp").exists() and not (ckpt / "state.old").exists()
    bare = trainer.accelerator.unwrap_model(trainer.model)
    trainable = {n: p for n, p in bare.named_parameters() if p.requires_grad}
    params = load_file(str(state / "trainable.safetensors"))
    assert set(params) == set(trainable) and all(torch.equal(params[n], p) for n, p in trainable.items())
    if kind == "sparse_opd":  # the adapter only: no base weight on disk
        assert all(".sparse_opd_values." in n for n in params)
        assert json.loads((state / "manifest.json").read_text())["frozen_adapter_sha256"]
    opt = load_file(str(state / "optimizer.safetensors"))
    assert opt and all(k.split(".")[0] == "state" and k.split(".")[1].isdigit() for k in opt)
    assert {k.split(".")[2] for k in opt} == {"step", "exp_avg", "exp_avg_sq"}
    assert load_file(str(state / "rng_0.safetensors"))["torch_cpu"].dtype == torch.uint8
    assert json.loads((state / "opd_trainer_state.json").read_text())["step"] == 2


# ------------------------------------------------------------------------------------------------ bit-exact resume
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("kind", ["plain", "sparse_opd"])
def test_resume_is_bit_exact(tmp_path, kind, optimizer):
    """Run A saves at step 2 and goes on to step 4; run B (a new student) loads the step-2 state (optimizer state_dict
    and global RNGs exactly as saved) and also trains to step 4: weights, optimizer and history are identical."""
    cfg = dict(save_every=2, token_keep="random", token_keep_ratio=0.5, **OPTIMIZERS[optimizer])
    a = _trainer(_student(kind), checkpoint_dir=str(tmp_path / "a"), **cfg)
    a.train(max_steps=2)
    at_save = _everything(a)
    shutil.copytree(tmp_path / "a" / "state", tmp_path / "saved")
    a.train()
    b = _trainer(_student(kind), checkpoint_dir=str(tmp_path / "b"), **cfg)
    b.load_state(tmp_path / "saved")
    now = _everything(b)
    for key in ("optimizer", "rng", "step", "history"):
        _assert_same(now[key], at_save[key], key)
    _assert_same(now["model"], at_save["model"], "model")  # frozen base too: it is rebuilt identically
    b.train()
    _assert_same(b.model.state_dict(), a.model.state_dict(), "model")
    _assert_same(b.optimizer.state_dict(), a.optimizer.state_dict(), "optimizer")
    assert _strip(b.history) == _strip(a.history) and b.step == 4


# ------------------------------------------------------------------------------------------------ errors
@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A SparseOPD student's state after one step."""
    ckpt = tmp_path_factory.mktemp("saved")
    _trainer(_student("sparse_opd"), steps=1, save_every=1, checkpoint_dir=str(ckpt)).train()
    return ckpt / "state"


def _assert_refused(trainer: OPDTrainer, state: Path, *needles: str) -> None:
    before = _everything(trainer)
    with pytest.raises(ValueError) as info:
        trainer.load_state(state)
    msg = str(info.value)
    assert msg.startswith(f"cannot resume from {state}") and "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    _assert_same(_everything(trainer), before, "after a refused load")


@pytest.mark.parametrize(
    "student, needles",
    [
        (lambda: _student("sparse_opd", {n: m.flip(0) for n, m in _mask().items()}), ["frozen tensors differ"]),
        (lambda: _student("sparse_opd", _mask(0.3)), ["in the state but", "same adapter"]),
        (lambda: _student("lora"), ["trainable parameters are not the student's", "same adapter"]),
        (lambda: _student("plain"), ["trainable parameters are not the student's"]),
    ],
    ids=["other_mask_same_sizes", "denser_mask", "lora", "plain"],
)
def test_a_state_of_another_student_is_refused_and_nothing_changes(saved, student, needles):
    _assert_refused(_trainer(student(), steps=1), saved, *needles)


def _damage_truncate(d: Path) -> None:
    data = (d / "trainable.safetensors").read_bytes()
    (d / "trainable.safetensors").write_bytes(data[: len(data) // 2])


def _damage_tensor_key(d: Path) -> None:
    text = (d / "optimizer.json").read_text()
    (d / "optimizer.json").write_text(text.replace('"state.0.exp_avg"', '"state.0.gone"'))


def _damage_dtype(d: Path) -> None:
    params = load_file(str(d / "trainable.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in params.items()}, str(d / "trainable.safetensors"))


def _damage_legacy(d: Path) -> None:
    (d / "manifest.json").unlink()
    (d / "optimizer.bin").write_bytes(b"\x80\x04")


DAMAGED = "incomplete or damaged"


@pytest.mark.parametrize(
    "damage, needles",
    [
        (lambda d: (d / "optimizer.safetensors").unlink(), ["missing optimizer.safetensors", DAMAGED]),
        (_damage_truncate, ["trainable.safetensors is unreadable", DAMAGED]),
        (lambda d: (d / "manifest.json").write_text("{not json"), ["manifest.json is unreadable", DAMAGED]),
        (lambda d: (d / "manifest.json").unlink(), ["no manifest.json", DAMAGED]),
        (lambda d: (d / "rng_0.json").write_text("{}"), ["no valid RNG state", DAMAGED]),
        (_damage_tensor_key, ["do not fit together", DAMAGED]),
        (_damage_dtype, ["bfloat16 [", "in the state but float32", "same dtype"]),
        (_damage_legacy, ["older version", "pickled"]),
    ],
    ids=["missing_file", "truncated", "bad_manifest", "no_manifest", "bad_rng", "bad_tensor_key", "dtype", "legacy"],
)
def test_a_damaged_state_is_refused_and_nothing_changes(saved, tmp_path, damage, needles):
    state = tmp_path / "state"
    shutil.copytree(saved, state)
    damage(state)
    _assert_refused(_trainer(_student("sparse_opd"), steps=1), state, *needles)


def test_another_optimizer_is_refused(saved):
    trainer = _trainer(_student("sparse_opd"), steps=1)
    sgd = torch.optim.SGD([p for p in trainer.model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ValueError, match="the optimizer is AdamW .* but SGD"):
        load_training_state(trainer.accelerator, trainer.model, sgd, saved)


# ------------------------------------------------------------------------------------------------ two processes
def _ddp_worker(out: Path) -> None:
    """Under ``accelerate launch`` (2 CPU processes): save at step 2, go on to step 4, then resume a new trainer from
    the step-2 state (each process its own RNG files: the student has dropout); every process checks that both
    reach the same weights, optimizer state and history."""
    torch.set_num_threads(1)
    a = _trainer(_student("plain"), save_every=2, checkpoint_dir=str(out / "a"))
    a.train(max_steps=2)
    if a.accelerator.is_main_process:
        shutil.copytree(out / "a" / "state", out / "saved")
        (out / "files.json").write_text(json.dumps(sorted(p.name for p in (out / "saved").iterdir())))
    a.accelerator.wait_for_everyone()
    a.train()
    b = _trainer(_student("plain"), save_every=2, checkpoint_dir=str(out / "b"))
    b.train(resume_from=str(out / "saved"))
    _assert_same(b.model.state_dict(), a.model.state_dict(), "model")
    _assert_same(b.optimizer.state_dict(), a.optimizer.state_dict(), "optimizer")
    assert b.accelerator.num_processes == 2 and _strip(b.history) == _strip(a.history)
    b.accelerator.wait_for_everyone()
    (out / f"ok_{b.accelerator.process_index}").write_text("ok")


def test_two_processes_save_and_resume(tmp_path):
    tests_dir = str(Path(__file__).resolve().parents[1])  # this file imports the shared helpers there
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           __file__, str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "ok_0").is_file() and (tmp_path / "ok_1").is_file()
    files = json.loads((tmp_path / "files.json").read_text())
    assert {"rng_0.json", "rng_0.safetensors", "rng_1.json", "rng_1.safetensors", "trainable.safetensors"} <= set(files)
    assert all(f.endswith((".json", ".safetensors")) for f in files)
    one = _trainer(_student("plain"), save_every=2, checkpoint_dir=str(tmp_path / "c"))  # 1 process: no RNG restore
    with pytest.warns(UserWarning, match="written by 2 processes and this run has 1"):
        one.load_state(tmp_path / "saved")
    saved = load_file(str(tmp_path / "saved" / "trainable.safetensors"))
    assert one.step == 2 and all(torch.equal(p, saved[n]) for n, p in one.model.named_parameters())


if __name__ == "__main__":
    _ddp_worker(Path(sys.argv[1]))
