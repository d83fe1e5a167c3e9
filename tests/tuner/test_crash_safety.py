"""Crash safety: a failure injected at every write step (the k-th ``os.replace`` / ``os.rename`` or safetensors write,
for every k) leaves an adapter directory exactly as it was with no temporary left behind, and leaves a trainer state
from which resume finds the newest complete state (the injected exception stands for a kill: the state save does
no cleanup on error, so what it leaves is what a kill at that point would leave)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import peft.peft_model
import pytest
import safetensors.torch
import torch
from accelerate import Accelerator
from conftest import make_model, random_mask
from peft import get_peft_model

from sparse_opd_peft import SparseOPDConfig, save_adapter
from sparse_opd_peft.atomic import staged_directory, write_bytes_atomic
from sparse_opd_peft.opd.checkpoint import (
    load_training_state,
    read_training_state,
    resolve_state_dir,
    save_training_state,
)


class Injected(OSError):
    """The injected failure (an OSError, as a full disk or a lost mount would raise)."""


class FailAt:
    """Wrap ``os.replace`` / ``os.rename`` and the safetensors writers: count every call, record (what, target), and
    raise :class:`Injected` at call number ``k`` (1-based; 0 = never)."""

    def __init__(self, monkeypatch, k: int = 0):
        self.k, self.n, self.calls = k, 0, []
        for mod, name in ((os, "replace"), (os, "rename"), (safetensors.torch, "save_file"),
                          (peft.peft_model, "safe_save_file")):  # fmt: skip
            monkeypatch.setattr(mod, name, self._wrap(getattr(mod, name), name))

    def _wrap(self, fn, name):
        def wrapped(*args, **kwargs):
            self.n += 1
            self.calls.append((name, str(args[1])))
            if self.n == self.k:
                raise Injected(f"injected failure at call {self.k} ({name})")
            return fn(*args, **kwargs)

        return wrapped


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def restore(root: Path, files: dict[str, bytes]) -> None:
    shutil.rmtree(root)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def _adapter(seed: int):
    model = make_model()
    return get_peft_model(model, SparseOPDConfig(mask=random_mask(model, 0.1, seed=seed), init_weights=False))


# ------------------------------------------------------------------------------------------------ save_adapter
def test_save_adapter_over_an_existing_adapter_fails_cleanly_at_every_step(tmp_path, monkeypatch):
    old, new = _adapter(1), _adapter(2)
    target = tmp_path / "runs" / "adapter"
    save_adapter(old, target)
    (target / "notes.txt").write_text("mine")  # a file of the user's: kept by a successful save
    before = snapshot(target)
    shutil.copytree(target, tmp_path / "probe")
    with monkeypatch.context() as mp:
        counter = FailAt(mp)
        save_adapter(new, tmp_path / "probe")  # the same save, to count its steps
    steps = counter.n
    assert steps >= 3, counter.calls  # model weights (and model card), then the directory swap (two renames)
    save_adapter(new, tmp_path / "probe")
    want = snapshot(tmp_path / "probe")
    for k in range(1, steps + 1):
        with monkeypatch.context() as mp:
            FailAt(mp, k)
            if counter.calls[k - 1][1].endswith("README.md"):  # the model card is best effort: a warning, not a failure
                with pytest.warns(UserWarning, match="could not write the SparseOPD model card"):
                    save_adapter(new, target)
                got = snapshot(target)
                got.pop("README.md")
                assert got == {k: v for k, v in want.items() if k != "README.md"}, k  # the new adapter as a whole
                restore(target, before)
                continue
            with pytest.raises(Injected):
                save_adapter(new, target)
        assert snapshot(target) == before, k  # the old adapter as a whole, never new weights beside an old config
        assert sorted(p.name for p in target.parent.iterdir()) == ["adapter"], k  # no temporary left behind
    save_adapter(new, target)
    after = snapshot(target)
    assert after["notes.txt"] == b"mine" and after["adapter_model.safetensors"] != before["adapter_model.safetensors"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["adapter"]


def test_a_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    new = _adapter(1)
    with monkeypatch.context() as mp:
        counter = FailAt(mp)
        save_adapter(new, tmp_path / "probe" / "adapter")
    for k, (_, target) in enumerate(counter.calls, 1):
        if target.endswith("README.md"):  # best effort, see above
            continue
        with monkeypatch.context() as mp:
            FailAt(mp, k)
            with pytest.raises(Injected):
                save_adapter(new, tmp_path / "new" / "adapter")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["probe"], k  # nor the parent directory it created


def test_an_atomic_file_write_fails_cleanly(tmp_path, monkeypatch):
    (tmp_path / "f.json").write_text("old")
    with monkeypatch.context() as mp:
        FailAt(mp, 1)
        with pytest.raises(Injected):
            write_bytes_atomic(tmp_path / "f.json", b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"] and (tmp_path / "f.json").read_text() == "old"


def test_a_directory_swap_fails_cleanly_at_either_rename(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("old")
    for k in (1, 2):  # moving the old directory aside, then renaming the new one into place
        with monkeypatch.context() as mp:
            FailAt(mp, k)
            with pytest.raises(Injected), staged_directory(tmp_path / "d") as tmp:
                (tmp / "y").write_text("new")
        assert snapshot(tmp_path / "d") == {"x": b"old"} and [p.name for p in tmp_path.iterdir()] == ["d"]


# ------------------------------------------------------------------------------------------------ trainer state
def _train_state(step: int):
    """A tiny model and AdamW with ``step`` deterministic steps taken (each step is distinguishable)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for i in range(step):
        model(torch.full((2, 4), float(i + 1))).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _save(acc, out: Path, step: int) -> dict[str, torch.Tensor]:
    model, opt = _train_state(step)
    save_training_state(acc, model, opt, out, {"step": step, "history": [], "config": {}})
    return {k: v.clone() for k, v in model.state_dict().items()}


def _resume(acc, out: Path) -> tuple[int, dict[str, torch.Tensor]]:
    model, opt = _train_state(0)
    step = read_training_state(out)["step"]
    load_training_state(acc, model, opt, out)
    return step, model.state_dict()


@pytest.mark.filterwarnings("ignore:.*a save was interrupted")
def test_trainer_state_save_killed_at_every_step_resumes_from_the_newest_complete_state(tmp_path, monkeypatch):
    acc = Accelerator(cpu=True)
    out = tmp_path / "ckpt" / "state"
    weights = {1: _save(acc, out, 1)}
    with monkeypatch.context() as mp:
        counter = FailAt(mp)
        weights[2] = _save(acc, tmp_path / "probe" / "state", 2)
    manifest_call = next(i for i, (_, dst) in enumerate(counter.calls, 1) if dst.endswith("manifest.json"))
    assert counter.n >= 8, counter.calls
    for k in range(1, counter.n + 1):
        _save(acc, out, 1)  # a clean step-1 state (the previous iteration may have left step 2)
        with monkeypatch.context() as mp:
            FailAt(mp, k)
            with pytest.raises(Injected):
                _save(acc, out, 2)
        want = 2 if k > manifest_call else 1  # the new state is complete once its manifest is in place
        assert resolve_state_dir(out).name in ("state", "state.tmp"), k
        step, state = _resume(acc, out)
        assert step == want, (k, counter.calls[k - 1])
        assert all(torch.equal(state[n], weights[want][n]) for n in state), k
        if k == manifest_call + 2:  # killed between the swap's two renames: only state.old and state.tmp exist
            assert not out.exists() and resolve_state_dir(out).name == "state.tmp"
    _save(acc, out, 3)  # the next save finishes the interrupted one and leaves no leftovers
    assert sorted(p.name for p in out.parent.iterdir()) == ["state"] and read_training_state(out)["step"] == 3


@pytest.mark.filterwarnings("ignore:.*a save was interrupted")
def test_cli_resume_finds_a_state_left_in_state_tmp(tmp_path):
    from sparse_opd_peft.workflow.train import resolve_resume

    acc = Accelerator(cpu=True)
    _save(acc, tmp_path / "run" / "state", 1)
    _save(acc, tmp_path / "probe" / "state", 2)
    os.replace(tmp_path / "run" / "state", tmp_path / "run" / "state.old")  # killed between the two renames
    os.replace(tmp_path / "probe" / "state", tmp_path / "run" / "state.tmp")
    assert resolve_resume(tmp_path / "run") == tmp_path / "run" / "state.tmp"
