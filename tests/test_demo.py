"""The demo's whole pipeline runs end to end on the tiny toy world (mechanics only, not results)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from sparse_opd_peft.cli import app


def test_demo_tiny_end_to_end(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--tiny", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--steps", "2"]
    result = CliRunner().invoke(app, [*args, "--batch-size", "4", "--eval-samples", "16", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "demo.json").read_text())
    runs = [r["run"] for r in summary["results"]]
    assert runs[:3] == ["student (anchor)", "teacher", "full OPD"] and "random mask" in runs
    assert abs(summary["mask"]["density"] - 0.2) < 0.01
    for name in ("demo.md", "accuracy.png", "mask.safetensors", "adapter/adapter_model.safetensors",
                 "diagnostics/report.json"):  # fmt: skip
        assert (out / name).exists(), name
    assert "summary" not in summary["diagnostics_summary"] and "bf16_sparsity" in summary["diagnostics_summary"]


def test_demo_rejects_bad_density(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--tiny", "--density", "1.5", "--out", str(tmp_path / "d")])
    assert result.exit_code == 2 and "--density must be in (0, 1)" in result.output
