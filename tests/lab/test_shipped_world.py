"""The toy world that ships with the package: it loads without training, matches its key and its build record, and
its key is the one the README's numbers name (issue 11)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from sparse_opd_peft.lab.toy import SHIPPED_WORLD_DIR, heldout_accuracy, load_world, shipped_recipe, world_key

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world():
    return load_world()


def test_shipped_world_loads_without_training(world):
    meta = json.loads((SHIPPED_WORLD_DIR / "world.json").read_text())
    assert world.shipped and world.from_cache
    assert world.key == meta["key"] == world_key(SHIPPED_WORLD_DIR)
    assert world.recipe == shipped_recipe()
    # float32 weights, as stored: loading is a byte copy, so every machine gets the same tensors
    assert {p.dtype for p in world.teacher.parameters()} == {torch.float32}
    assert {p.dtype for p in world.student.parameters()} == {torch.float32}
    for key in ("torch", "transformers", "python", "command", "build_seconds", "accuracies"):
        assert key in meta, key
    # the shipped world was built before the toy world moved to sparse_opd_peft.lab.toy: its record keeps the old name
    assert meta["command"].startswith(("python -m sparse_opd_peft.toy", "python -m sparse_opd_peft.lab.toy"))
    total = sum(f.stat().st_size for f in SHIPPED_WORLD_DIR.rglob("*") if f.is_file())
    assert total < 8_000_000, f"the shipped world is {total / 1e6:.1f} MB; it should stay a few MB"


def test_recorded_accuracies_hold_on_this_machine(world):
    """The build record's held-out accuracies, re-measured here on the same 2000 prompts per task: equal up to
    2 prompts (a last-bit difference of another CPU may flip an argmax on a near-tie)."""
    for task in world.recipe.tasks:
        n = world.recipe.n_heldout
        for role, model in (("teacher", world.teacher), ("student", world.student)):
            measured = heldout_accuracy(model, world, task, n=n)
            assert abs(measured - world.accuracies[role][task]) <= 2 / n, (role, task, measured, world.accuracies)
    assert min(world.accuracies["teacher"].values()) >= 0.99
    assert 0.15 <= world.accuracies["student"]["add"] <= 0.35  # a weak anchor with room for a 50-point gain


def test_changed_world_file_is_refused(tmp_path):
    import shutil

    copy = tmp_path / "w"
    shutil.copytree(SHIPPED_WORLD_DIR, copy)
    weights = copy / "student" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # flip one bit of the last weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="hash to .* records key"):
        load_world(copy)
    assert load_world(copy, verify=False).key == world_key(SHIPPED_WORLD_DIR)  # the recorded key, not the content


def test_readme_names_the_shipped_world():
    """Every toy-world key the README names is the shipped world's key."""
    text = (ROOT / "README.md").read_text()
    keys = set(re.findall(r"[Ww]orld `([0-9a-f]{16})`", text))
    assert keys, "the README names no toy-world key"
    assert keys == {world_key(SHIPPED_WORLD_DIR)}, keys
