"""The study's "Where OPD sits" (geometry) and "Controls" sections on the tiny toy world: fields, tables, numbers in
range, PNGs, and a second run served entirely from the run cache (no training, no diagnostics)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from _study_utils import VERDICT, check_plots, forbid, numbers, tiny_config

from sparse_opd_peft.lab.study import StudyConfig, StudyContext, controls, geometry, render_study, run_study
from sparse_opd_peft.lab.study.geometry_claims import (
    COLUMNS,
    LOW_LR,
    METHODS,
    SIM_K,
    _increasing,
    _trend,
    ffn_heavy,
    locks_early,
    low_magnitude_lean,
    ordered,
    rank_trends_as_paper,
    rotation_ordered,
)
from sparse_opd_peft.opd.checkpoint import snapshot_paths


def _config(root: Path, cache: Path) -> StudyConfig:
    return tiny_config(root, ("geometry", "controls"), cache)


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_toy_cache):
    root = tmp_path_factory.mktemp("study_geometry")
    ctx = StudyContext(_config(root, tiny_toy_cache))
    return root, ctx, geometry.run(ctx), controls.run(ctx)


def _claim(md: str, claim: str) -> list[bool]:
    """The verdicts of the one claim line containing ``claim``, in order (True = reproduced / holds)."""
    (line,) = [ln for ln in md.splitlines() if ln.startswith("- *") and claim in ln]
    return [v in ("reproduced", "holds") for v in VERDICT.findall(line)]


def _check_data(data: dict) -> None:
    json.dumps(data, allow_nan=False)  # JSON-serialisable, no NaN / inf
    shares = ("acc", "bf16_sparsity", "ffn_energy_share", "ffn_param_share", "low_magnitude_overlap",
              "principal_overlap", "sim_k", "sim_early", "sim_random", "kept_share")  # fmt: skip
    for path, value in numbers(data):
        assert math.isfinite(value), path
        leaf = path.rsplit(".", 1)[-1].split("[")[0]
        if leaf in shares or path.split(".")[-2:-1] == ["kept_share"]:
            assert -1e-9 <= value <= 1 + 1e-9, (path, value)
        if leaf in ("stable_rank", "stable_rank_end", "fro_norm", "fro_end", "nss", "train_seconds"):
            assert value >= 0, (path, value)


def test_geometry_section(study):
    root, _, sec, _ = study
    assert sec.name == "geometry" and sec.title and sec.markdown
    md = sec.markdown
    assert f"| metric | SFT | OPD | RLVR | RLVR* (lr {geometry.RLVR_LR:g}) | paper (SFT / OPD / RLVR) |" in md
    for row in ("bf16 update sparsity", "FFN share", "low-magnitude overlap", "principal overlap", "NSS",
                "principal angle", "stable rank", f"Sim_{SIM_K}", "held-out accuracy"):  # fmt: skip
        assert row in md, row
    assert "8.1 / 51.6 / 77.2" in md and "31.9 / 53.6 / 73.5" in md  # the paper's figures beside ours
    # every claim line states the verdicts that the section's own numbers give (the tiny world's numbers mean
    # nothing, so which way each goes is not known here; tests/lab/test_study_verdicts.py covers both ways)
    nan = lambda d: {m: math.nan if v is None else v for m, v in d.items()}  # noqa: E731
    means = {k: nan(v) for k, v in sec.data["means"].items()}
    low = {k: nan({m: sec.data["low_lr"][m][k] for m in METHODS}) for k in ("bf16_sparsity",
                                                                          "low_magnitude_overlap")}  # fmt: skip
    sp, sim = means["bf16_sparsity"], means["sim_early"]
    sr0, sr1 = means["stable_rank_first"], means["stable_rank"]
    trend = {m: _trend(sr1[m] / sr0[m] if sr0[m] else math.nan) for m in COLUMNS}
    rot = {k: means[k] for k in ("principal_angle_deg", "nss")}
    expected = {
        "SFT < OPD < RLVR in bf16 sparsity": [ordered(sp), ordered(sp, ("SFT", "OPD", "RLVR*")),
                                              ordered(low["bf16_sparsity"])],
        "FFN-heavy": [ffn_heavy(means["ffn_energy_share"]["OPD"])],
        "low-magnitude weights": [low_magnitude_lean(means["low_magnitude_overlap"]["OPD"]),
                                  low_magnitude_lean(low["low_magnitude_overlap"]["OPD"]),
                                  ordered(low["low_magnitude_overlap"])],
        "locks early": [locks_early(sim), locks_early(sim, "RLVR*")],
        "SFT expands": [rank_trends_as_paper(trend)],
        "Rotation and spectral drift": [rotation_ordered(rot), rotation_ordered(rot, "RLVR*")],
    }  # fmt: skip
    for claim, verdicts in expected.items():
        assert _claim(md, claim) == verdicts, claim
    assert f"lr {LOW_LR:g}" in md
    data = sec.data
    assert set(data["methods"]) == set(COLUMNS) == {*METHODS, "RLVR*"}
    assert set(data["low_lr"]) >= {"lr", *METHODS}
    assert data["methods"]["RLVR*"][0]["run"] == f"geo_rlvr_lr{geometry.RLVR_LR:g}_s0"
    for m in COLUMNS:
        (row,) = data["methods"][m]
        assert 0 <= row["acc"] <= 1 and 0 <= row["bf16_sparsity"] <= 1
        (traj,) = data["trajectories"][m]
        assert [p["step"] for p in traj] == [1, 2, 3, 4]  # every snapshot after step 0, in order
    assert data["budget"]["num_generations"] == geometry.RLVR_GENERATIONS
    assert data["budget"]["batch_size"] * data["budget"]["num_generations"] == data["budget"]["sequences_per_step"]
    opd = data["methods"]["OPD"][0]
    assert opd["bf16_sparsity"] < 1 and opd["stable_rank"] > 0 and opd["low_magnitude_overlap"] is not None
    _check_data(data)
    check_plots(root, sec.plots)


def test_controls_section(study):
    root, ctx, _, sec = study
    assert sec.name == "controls" and sec.title and sec.markdown
    specs = controls.controls(ctx)
    assert {fam for fam, *_ in specs} == set(controls.FAMILIES)
    assert len(specs) == 8  # 2 modes × 2 ratios, off-policy, 3 alphas
    for _, key, label, _ in specs:
        assert f"| {label} |" in sec.markdown, label
        (row,) = sec.data["runs"][key]
        assert 0 <= row["acc"] <= 1 and row["stable_rank_end"] > 0
    assert "| OPD (full KL, reference) |" in sec.markdown and "| RLVR* (α=0, lr" in sec.markdown
    assert "| α=1 at lr 0.001 (seed 0 only) |" in sec.markdown and sec.data["witness"]["run"] == "ctl_mix100_s0"
    assert sec.data["runs"]["mix100"][0]["run"] == f"ctl_mix100_lr{geometry.RLVR_LR:g}_s0"
    ok = controls.verdicts(sec.data["gap_vs_opd"], sec.data["gap_vs_mix1"])
    for claim, key in (("Token sparsification", "token"), ("Off-policy rollouts", "offpolicy"),
                       ("α-mix changes it", "mix")):  # fmt: skip
        assert _claim(sec.markdown, claim) == [ok[key]], claim
    assert sec.data["kept_share"] == {"0.25": 0.4, "0.5": 0.6}  # ⌈ρ·5⌉ / 5 for 4-digit answers + EOS
    assert len(sec.plots) == len(controls.FAMILIES)
    _check_data(sec.data)
    check_plots(root, sec.plots)


def test_second_run_is_served_from_the_cache(study, monkeypatch, tiny_toy_cache):
    root, _, geo, ctl = study

    import sparse_opd_peft.diagnostics as diagnostics
    import sparse_opd_peft.lab.toy as toy

    forbid(monkeypatch, [(toy, "opd_run"), (diagnostics, "diagnose"), (diagnostics, "trajectory")],
           "a cached study must neither train nor re-run diagnostics")  # fmt: skip
    summary = run_study(_config(root, tiny_toy_cache))
    assert summary["sections"]["geometry"]["data"] == json.loads(json.dumps(geo.data))
    assert summary["sections"]["controls"]["data"] == json.loads(json.dumps(ctl.data))
    md = (root / "study" / "study.md").read_text()
    assert f"## {geo.title}\n\n{geo.markdown.strip()}\n" in md and f"## {ctl.title}\n\n{ctl.markdown.strip()}\n" in md
    written = json.loads((root / "study" / "study.json").read_text())
    assert written["sections"].keys() == {"geometry", "controls"}
    assert render_study(written) == md  # study.md is a function of study.json


def test_helpers(tmp_path):
    for k in (0, 2, 10, 9):
        (tmp_path / f"step_{k}.safetensors").write_bytes(b"")
    assert [s for s, _ in snapshot_paths(tmp_path)] == [2, 9, 10]
    ref = [{"step": 1, "stable_rank": 2.0}, {"step": 2, "stable_rank": 4.0}]
    assert controls._rel_gap([{"step": 1, "stable_rank": 3.0}, {"step": 2, "stable_rank": 4.0}], ref) == 0.25
    assert controls._rel_gap([{"step": 3, "stable_rank": 1.0}], ref) is None
    assert geometry.clean({"a": [float("nan"), 1.0], "b": float("inf")}) == {"a": [None, 1.0], "b": None}
    assert _increasing(0.1, 0.2, 0.3) and not _increasing(0.1, float("nan"))
