"""``sparse-opd --help`` and every ``sparse-opd COMMAND --help`` stay light: no torch, transformers, peft or
bitsandbytes is imported, nothing from a third-party library is printed, and on/off options read as bare flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "peft", "transformers", "bitsandbytes", "accelerate", "datasets", "safetensors", "numpy")
# Run the command line's entry point in-process and report which heavy modules it imported.
HARNESS = """
import contextlib, io, json, sys
from sparse_opd_peft.cli import main
watched = json.loads(sys.argv[2])
sys.argv = ["sparse-opd", *json.loads(sys.argv[1])]
out = io.StringIO()
code = 0
with contextlib.redirect_stdout(out):
    try:
        main()
    except SystemExit as exit:
        code = exit.code or 0
heavy = sorted(m for m in watched if m in sys.modules)
print(json.dumps({"code": code, "stdout": out.getvalue(), "heavy": heavy}))
"""
COMMANDS = ["diagnose", "trajectory", "mask", "subspace", "train", "merge", "inspect", "push", "demo", "study"]


def run_help(*args: str) -> tuple[dict, str]:
    proc = subprocess.run(
        [sys.executable, "-c", HARNESS, json.dumps([*args, "--help"]), json.dumps(HEAVY)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_imports_no_heavy_library_and_prints_nothing_else(command):
    result, stderr = run_help(*([command] if command else []))
    assert result["code"] == 0
    assert result["heavy"] == [], f"--help imported {result['heavy']}"
    assert stderr == "", stderr  # e.g. bitsandbytes' "Failed to load CPU gemm_4bit_forward ..."
    assert "Usage:" in result["stdout"] and "<bool>" not in result["stdout"]
    if command:
        assert "Example" in result["stdout"]


def test_module_entry_point_answers_help():
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "sparse_opd_peft.cli", "train", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    assert not [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    for text in ("--full ", "--loss", "[default: full_kl]", "[default: 0.001]", "--tokenizer", '"prompt": "072+521="'):
        assert text in proc.stdout, text
    assert "<bool>" not in proc.stdout


def test_choices_are_the_librarys():
    from sparse_opd_peft.choices import LOSSES, SAVE_DTYPES, TOKEN_KEEP
    from sparse_opd_peft.cli.options import Loss, Rule, SaveDtype, TokenKeep
    from sparse_opd_peft.masks.rules import RULES
    from sparse_opd_peft.opd.config import LOSSES as CONFIG_LOSSES
    from sparse_opd_peft.tuner.config import SAVE_DTYPES as CONFIG_SAVE_DTYPES

    assert LOSSES is CONFIG_LOSSES and SAVE_DTYPES == CONFIG_SAVE_DTYPES
    for enum, values in ((Loss, LOSSES), (Rule, tuple(RULES)), (SaveDtype, SAVE_DTYPES), (TokenKeep, TOKEN_KEEP)):
        assert tuple(m.value for m in enum) == values
