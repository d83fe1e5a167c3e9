"""examples/quickstart.py (the 20-line API walk-through on a small Qwen3) runs end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_and_writes_everything(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--out", str(out), "--steps", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reloaded + merged" in proc.stdout
    for name in ("base/config.json", "mask.safetensors", "adapter/adapter_model.safetensors", "merged/config.json"):
        assert (out / name).exists(), name
