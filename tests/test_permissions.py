"""Every file the package writes gets the mode a plain ``open`` would give it and every directory the mode of a plain
``mkdir``: 0644 / 0755 under umask 022, 0600 / 0700 under umask 077 (``mkstemp`` / ``mkdtemp`` alone would make every
output private, 0600 / 0700, whatever the umask)."""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import make_model, random_mask
from peft import get_peft_model
from typer.testing import CliRunner

from sparse_opd_peft import SparseMask, SparseOPDConfig, save_adapter
from sparse_opd_peft.atomic import current_umask, write_json_atomic
from sparse_opd_peft.cli import app
from sparse_opd_peft.masks import save_subspace
from sparse_opd_peft.opd.checkpoint import save_trainable_state, save_training_state

UP = "model.layers.0.mlp.up_proj"


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, tuple[str, int]]:
    """``{relative path: ("file" | "dir", permission bits)}`` of everything under ``root`` (``root`` excluded)."""
    out = {}
    for p in sorted(root.rglob("*")):
        kind = "dir" if p.is_dir() else "file"
        out[str(p.relative_to(root))] = (kind, stat.S_IMODE(p.lstat().st_mode))
    return out


def write_everything(root: Path) -> None:
    """Adapter save (and its model card), mask and subspace files, trainer state and checkpoints, CLI outputs (merge
    into a staged directory, a diagnose report) and a JSON report."""
    model = make_model()
    pm = get_peft_model(model, SparseOPDConfig(mask=random_mask(model, 0.1), init_weights=False))
    save_adapter(pm, root / "runs" / "adapter")
    save_adapter(pm, root / "runs" / "adapter")  # replacing an existing adapter too
    SparseMask(random_mask(make_model(), 0.1)).save(root / "masks" / "m.safetensors")
    q, _ = torch.linalg.qr(torch.randn(32, 2, generator=torch.Generator().manual_seed(0)))
    save_subspace({UP: q}, root / "basis.safetensors")
    acc = Accelerator(cpu=True)
    lin = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(lin.parameters())
    lin(torch.ones(2, 4)).sum().backward()
    opt.step()
    save_training_state(acc, lin, opt, root / "ckpt" / "state", {"step": 1, "history": [], "config": {}})
    save_training_state(acc, lin, opt, root / "ckpt" / "state", {"step": 2, "history": [], "config": {}})
    save_trainable_state(acc, lin, root / "ckpt" / "step_2.safetensors", 2)
    write_json_atomic(root / "report.json", {"a": 1})
    make_model().save_pretrained(root / "base")
    make_model(seed=1).save_pretrained(root / "tuned")
    runner = CliRunner()
    res = runner.invoke(app, ["merge", str(root / "base"), str(root / "runs" / "adapter"), "--out", str(root / "m")])
    assert res.exit_code == 0, (res.output, res.exception)
    res = runner.invoke(app, ["diagnose", str(root / "base"), str(root / "tuned"), "--out", str(root / "diag"),
                              "--no-plots", "--no-spectral", "-q"])  # fmt: skip
    assert res.exit_code == 0, (res.output, res.exception)


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_follow_the_umask(tmp_path, mask, file_mode, dir_mode):
    root = tmp_path / "out"
    with umask(mask):
        assert current_umask() == mask
        root.mkdir()
        write_everything(root)
    found = {p: m for p, m in modes(root).items() if p.split("/")[0] not in ("base", "tuned")}  # the test's own
    expected = {"runs/adapter/adapter_model.safetensors", "runs/adapter/adapter_config.json", "runs/adapter/README.md",
                "masks/m.safetensors", "basis.safetensors", "ckpt/state/manifest.json", "ckpt/state/trainable.safetensors",
                "ckpt/state/rng_0.json", "ckpt/step_2.safetensors", "report.json", "m/model.safetensors",
                "diag/report.json", "diag/report.md"}  # fmt: skip
    assert expected <= set(found), sorted(set(expected) - set(found))
    wrong = {p: (kind, oct(m)) for p, (kind, m) in found.items() if m != (dir_mode if kind == "dir" else file_mode)}
    assert not wrong, wrong
    assert not [p for p in found if Path(p).name.startswith(".")]  # no temporary left behind
