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


def test_verdicts_hold_and_fail_on_known_numbers():
    from sparse_opd_peft.lab.demo import verdicts

    good = verdicts(anchor=0.10, full=0.95, masked=0.90, random=0.40, merged=0.90, merge_diff=0.0)
    assert [line.split("**")[1] for line in good] == ["holds"] * 4
    assert "gain +85.0 points" in good[0] and "-5.0 points" in good[1] and "-50.0 points" in good[2]
    bad = verdicts(anchor=0.10, full=0.55, masked=0.40, random=0.30, merged=0.41, merge_diff=0.2)
    assert [line.split("**")[1] for line in bad] == ["does not hold on this run"] * 4
    # the margins are inclusive at exactly 50 / 10 / 15 points
    edge = verdicts(anchor=0.25, full=0.75, masked=0.65, random=0.50, merged=0.65, merge_diff=1e-4)
    assert [line.split("**")[1] for line in edge] == ["holds"] * 4


def test_demo_full_opd_recipe_learns_on_the_shipped_world():
    """The demo's full-OPD recipe, one seed, on the shipped world: at least 50 points over the anchor (issue 11)."""
    import torch

    from sparse_opd_peft.lab.demo import DemoConfig, _run_config
    from sparse_opd_peft.lab.toy import heldout_accuracy, load_world, opd_run

    world = load_world()
    cfg = DemoConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = _run_config(cfg, cfg.lr, "full OPD").with_(save_every=0, progress_bar=False, seed=1)
        model, history, _ = opd_run(world.load_student(), world, run)
    finally:
        torch.set_num_threads(threads)
    anchor = world.accuracies["student"][cfg.task]
    final = heldout_accuracy(model, world, cfg.task, n=1000)
    assert final - anchor >= 0.50, (anchor, final)
    assert history[-1]["kl"] < history[0]["kl"] / 4
