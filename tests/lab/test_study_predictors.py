"""The study's "predictors" and "savings" sections on the tiny toy world: fields, rows, finite numbers, PNGs, and a
second run served entirely from the run cache (no training, no probe, no measurement subprocess)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from _study_utils import check_plots, forbid, numbers, tiny_config

from sparse_opd_peft.lab.study import StudyConfig, StudyContext, predictors, predictors_report, savings


def _config(root: Path, cache: Path) -> StudyConfig:
    return tiny_config(root, ("predictors", "savings"), cache)


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_toy_cache):
    root = tmp_path_factory.mktemp("study_predictors")
    ctx = StudyContext(_config(root, tiny_toy_cache))
    return root, ctx, predictors.run(ctx), savings.run(ctx)


def test_predictors_section(study):
    root, ctx, sec, _ = study
    assert sec.name == "predictors" and sec.title and "| predictor |" in sec.markdown
    json.dumps(sec.data, allow_nan=False)
    for path, value in numbers(sec.data):
        assert math.isfinite(value), path
    rows = sec.data["rows"]
    expected = {"final", "random", "early5", "early10", "early20", "lowmag", "combo_mean", "combo_prod", "alloc_sq"}
    expected |= {f"g16_{s}" for s in ("abs", "sq", "adam_v", "net", "snr", "adam_update")}
    assert expected <= set(rows) and {"g4_adam_update", "g4_sq"} <= set(rows)
    for key, row in rows.items():
        for a in row["agreement"]:
            for k in ("precision", "recall", "iou", "random_expectation_precision", "random_expectation_iou"):
                assert 0 <= a[k] <= 1, (key, k)
        assert all(0 <= x <= 1 for x in row["acc"]) and all(s >= 0 for s in row["seconds"])
    assert rows["final"]["agreement"][0]["iou"] == 1.0
    for key in predictors.RETRAIN_ALL + predictors.RETRAIN_ONE:
        assert len(rows[key]["acc"]) == 1, key
    assert not rows["g16_abs"]["acc"]  # agreement-only row
    assert set(sec.data["rows_hi"]) == set(rows) and len(sec.data["rows_hi"]["final"]["acc"]) == 1
    assert sec.data["probe_snapshot_match_max_abs"] == [0.0]  # the probe replays the full run's first steps
    # exactly the statement that the section's own numbers give, once per density (both ways: test_study_verdicts.py)
    statements = {"recovers": "**Recovers full-mask quality", "none": "**No predictor recovers",
                  "no_separation": "does not separate the predictors"}  # fmt: skip
    half = sec.markdown.index("density (seed 0):")
    for md, section_rows in ((sec.markdown[:half], rows), (sec.markdown[half:], sec.data["rows_hi"])):
        kind, good = predictors_report.outcome(section_rows)
        for k, statement in statements.items():
            assert md.count(statement) == int(k == kind), (k, kind)
        for key in good:
            assert section_rows[key]["label"] in md.split(statements["recovers"])[1].splitlines()[0]
    check_plots(root, sec.plots)


def test_savings_section(study):
    root, ctx, _, sec = study
    assert sec.name == "savings" and "| model | method |" in sec.markdown
    json.dumps(sec.data, allow_nan=False)
    for path, value in numbers(sec.data):
        assert math.isfinite(value), path
    bench = sec.data["bench"]
    for model in ("toy", "qwen"):
        by = {r["method"]: r for r in bench[model]}
        assert set(by) == {"full", "masked", "lora"}
        for r in by.values():
            assert r["step_s"] > 0 and r["optimizer_state_bytes"] > 0 and r["weights_bytes"] > 0, (model, r)
        # AdamW keeps two float32 moments (plus a step counter) per trainable value
        for r in by.values():
            assert r["optimizer_state_bytes"] >= 8 * r["trainable"]
        assert by["masked"]["optimizer_state_bytes"] < by["full"]["optimizer_state_bytes"]
        assert by["masked"]["weights_bytes"] < by["full"]["weights_bytes"]
        assert abs(by["lora"]["trainable"] - by["masked"]["trainable"]) <= 0.5 * by["masked"]["trainable"]
    e2e = sec.data["end_to_end"]
    routes = [r["route"] for r in e2e]
    assert routes[:2] == ["full OPD", "full OPD + masked retrain"] and routes[2].startswith("early probe (")
    assert all(len(r["acc"]) == 1 and r["full_step_units"] > 0 for r in e2e)
    check_plots(root, sec.plots)


def test_second_run_is_served_from_the_cache(study, monkeypatch, tiny_toy_cache):
    root, _, first, first_sav = study

    import sparse_opd_peft.lab.toy as toy
    import sparse_opd_peft.lab.toy.runs as runs
    import sparse_opd_peft.masks as mp

    forbid(monkeypatch, [(toy, "opd_run"), (runs, "opd_probe_run"), (mp, "gradient_statistics"),
                         (savings, "_measure_all")], "a cached run was recomputed")  # fmt: skip
    ctx = StudyContext(_config(root, tiny_toy_cache))
    again, sav = predictors.run(ctx), savings.run(ctx)
    assert again.data["rows"]["final"]["acc"] == first.data["rows"]["final"]["acc"]
    assert again.markdown == first.markdown and sav.data["bench"] == first_sav.data["bench"]


def test_opd_config_matches_what_opd_run_builds(study, monkeypatch, tmp_path):
    """``toy.runs.opd_config`` duplicates ``opd_run``'s mapping (runs.py is add-only): they must not drift."""
    import sparse_opd_peft.opd as opd
    from sparse_opd_peft.lab.toy import runs

    _, ctx, _, _ = study
    seen = {}

    class Capture:
        def __init__(self, student, teacher, tokenizer, train, config, **kw):
            seen["config"] = config
            raise StopIteration

    monkeypatch.setattr(opd, "OPDTrainer", Capture)
    controls = dict(loss="mix", num_generations=2, token_keep="top_gap", token_keep_ratio=0.5, alpha=0.3, lr=3e-4,
                    warmup_steps=3, optimizer="sgd", batch_size=8, steps=7, eval_samples=9)  # fmt: skip
    cases = ((ctx.base.with_(seed=3, eval_every=2, **controls), None), (ctx.base.with_(save_every=2), tmp_path),
             (ctx.base.with_(off_policy=True), None))  # fmt: skip
    for cfg, ckpt in cases:
        with pytest.raises(StopIteration):
            runs.opd_run(ctx.world.load_student(), ctx.world, cfg, checkpoint_dir=ckpt)
        assert runs.opd_config(ctx.world, cfg, ckpt) == seen["config"]
