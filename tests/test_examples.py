"""``examples/real_checkpoints.py``: its CLI parses offline, and ``--dry-run`` runs the whole flow on CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparse_opd_peft import SparseMask

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "real_checkpoints.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("real_checkpoints_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_and_defaults(capsys):
    example = _load_example()
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "Qwen3-0.6B" in text and "--dry-run" in text and "--probe-steps" in text
    args = example.parse_args([])
    assert (args.student, args.teacher, args.dataset) == ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-1.7B", "openai/gsm8k")
    with pytest.raises(SystemExit):
        example.parse_args(["--probe-steps", "0"])  # neither a mask nor a probe


def test_gsm8k_reward():
    reward = _load_example().gsm8k_reward
    completions = ["so 3 + 4 = 7.\n#### 7", "the answer is 1,234", "#### 8", "no number"]
    assert reward([""] * 4, completions, ["7", "1234", "9", "1"]) == [1.0, 1.0, 0.0, 0.0]


def test_dry_run_end_to_end(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    for rel in ("mask.safetensors", "probe", "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                "merged/model.safetensors", "summary.json"):  # fmt: skip
        assert (tmp_path / rel).exists(), rel
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["last_step"]["step"] == 3 and summary["mask"]["nnz"] > 0

    mask = SparseMask.load(tmp_path / "mask.safetensors")
    base = load_file(tmp_path / "dry_run" / "student" / "model.safetensors")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert set(base) == set(merged)
    moved = 0
    for key, weight in base.items():
        module = key.removesuffix(".weight")
        if module in mask:
            m = mask[module]
            assert torch.equal(merged[key][~m], weight[~m]), f"{key}: a coordinate outside the mask moved"
            moved += int((merged[key][m] != weight[m]).sum())
        else:
            assert torch.equal(merged[key], weight), f"{key} is not in the mask but changed"
    assert moved > 0
