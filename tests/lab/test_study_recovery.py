"""Study sections "recovery" (item 3) and "subspace" (item 4) on the tiny toy world: every row is there, the numbers
are finite, LoRA's rank follows the trainable-count rule, and a second run is served entirely from the cache."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _study_utils import forbid, numbers, tiny_config

from sparse_opd_peft.lab.study import StudyContext, recovery, recovery_extra, subspace


@pytest.fixture(scope="module")
def sections(tmp_path_factory, tiny_toy_cache):
    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path_factory.mktemp("study"), ("recovery", "subspace"), tiny_toy_cache)
    ctx = StudyContext(cfg)
    first = (recovery.run(ctx), subspace.run(ctx))
    n_runs = len(list(ctx.runs_dir.glob("*.json")))
    with pytest.MonkeyPatch.context() as mp:
        import sparse_opd_peft.lab.toy as toy
        import sparse_opd_peft.lab.toy.runs as toy_runs

        forbid(mp, [(toy, "opd_run"), (toy_runs, "opd_run"), (toy_runs, "opd_probe_run")],
               "training ran although every run should be cached")  # fmt: skip
        ctx2 = StudyContext(cfg)
        second = (recovery.run(ctx2), subspace.run(ctx2))
    assert len(list(ctx.runs_dir.glob("*.json"))) == n_runs
    return ctx, first, second


def test_sections_fields_and_plots(sections):
    ctx, (rec, sub), _ = sections
    for sec, name in ((rec, "recovery"), (sub, "subspace")):
        assert sec.name == name and sec.title and "| " in sec.markdown
        assert sec.plots, f"{name} wrote no plot"
        for p in sec.plots:
            assert (Path(ctx.out) / p).is_file() and (Path(ctx.out) / p).stat().st_size > 1000
    assert {Path(p).name for p in rec.plots} == {"recovery_curves.png", "recovery_optim.png", "recovery_lowlr.png"}
    for where, x in numbers(rec.data):
        assert math.isfinite(x), where
    for where, x in numbers(sub.data):
        assert math.isfinite(x), where


def test_recovery_rows(sections):
    ctx, (rec, _), _ = sections
    rows = {r["key"]: r for r in rec.data["rows"]}
    expected = {"full", "block", "bf16"}
    expected |= {f"{kind}{recovery.pct(d)}" for d in recovery.DENSITIES for kind in ("top", "random")}
    expected |= {f"lowmag{recovery.pct(d)}" for d in recovery.LOWMAG_DENSITIES}
    expected |= {f"lora{recovery.pct(d)}" for d in recovery.LORA_MATCH}
    assert set(rows) == expected
    for key, r in rows.items():
        assert len(r["acc"]) == len(r["seeds"]) >= 1, key
        assert all(0.0 <= a <= 1.0 for a in r["acc"]), key
        assert r["curves"] and all(len(c) >= 2 for c in r["curves"]), key
        assert r["label"].replace("\\", "") in rec.markdown.replace("\\", ""), key
    meta = rec.data["meta"]
    for d in recovery.DENSITIES:  # top-k, random and low-magnitude rows train the same number of coordinates
        counts = {rows[f"{k}{recovery.pct(d)}"]["trainable"] for k in ("top", "random", "lowmag") if
                  f"{k}{recovery.pct(d)}" in rows}  # fmt: skip
        assert counts == {round(d * meta["block_params"])}
    lines = rec.markdown.splitlines()
    start = lines.index("**Verdicts** (≈ when the means differ by at most max(2 points, 2 std)):")
    assert lines[start + 1 : start + 1 + 8] == recovery.verdicts(rec.data["rows"])  # 4 densities + 4 comparisons


def test_lora_rank_rule(sections):
    _, (rec, _), _ = sections
    meta, rows = rec.data["meta"], {r["key"]: r for r in rec.data["rows"]}
    per_rank = meta["lora_per_rank"]
    for d in recovery.LORA_MATCH:
        row, nnz = rows[f"lora{recovery.pct(d)}"], round(d * meta["block_params"])
        assert row["rank"] == max(1, round(nnz / per_rank))
        assert row["trainable"] == row["rank"] * per_rank
        if row["rank"] > 1:  # the nearest count: no other rank is closer to the mask's
            assert abs(row["trainable"] - nnz) <= per_rank / 2
        assert f"LoRA r={row['rank']}" in rec.markdown


def test_recovery_sgd_and_low_lr(sections):
    _, (rec, _), _ = sections
    sgd, low = rec.data["sgd"], rec.data["low_lr"]
    assert [x["lr"] for x in sgd["full"]] == list(recovery_extra.SGD_LRS)
    assert [x["lr"] for x in sgd["masked_top20"]] == list(recovery_extra.SGD_MASKED_LRS)
    assert [x["lr"] for x in sgd["block"]] == list(recovery_extra.SGD_BLOCK_LRS)
    assert sgd["best_full_lr"] in recovery_extra.SGD_LRS
    assert len(low["candidates"]) == 1 + len(recovery_extra.LOW_LRS) + len(recovery_extra.SGD_LRS)
    assert all(0.0 <= c["density"] <= 1.0 for c in low["candidates"])
    assert set(low["protocol"]) == {"mask", "random"}
    assert low["pick"] in {c["name"] for c in low["candidates"][1:]}
    assert "Low-lr regime" in rec.markdown and "AdamW vs SGD" in rec.markdown


def test_subspace_rows(sections):
    ctx, (_, sub), _ = sections
    shapes = recovery.block_linears(ctx.world.load_student())
    arms = [a for a, _ in subspace.arms()]
    for method in subspace.METHODS:
        rows = sub.data[method]["rows"]
        assert list(rows) == arms
        for arm, row in rows.items():
            assert row["acc"] and all(0.0 <= a <= 1.0 for a in row["acc"]), (method, arm)
            assert row["curves"][0][0][0] == subspace.prefix_steps(ctx)  # curves start at the resume step
            if arm.startswith("rank"):
                r = subspace.effective_rank(ctx, int(arm[4:]))
                assert row["trainable"] == r * sum(o for o, _ in shapes.values()), (method, arm)
        assert all(0.0 <= x <= 1.0 + 1e-6 for x in sub.data[method]["sim"]), method
        assert 0.0 < sub.data[method]["sim_random"] <= 1.0
    # the OPD prefix replays the shared full run exactly up to its 20 % snapshot
    assert all(d is not None and d < 1e-6 for d in sub.data["opd"]["snapshot_diff"])
    assert "Scale caveat" in sub.markdown
    verdict = subspace.channel_verdict(sub.data["opd"]["rows"], sub.data["sft"]["rows"],
                                       subspace.effective_rank(ctx, subspace.RANKS[0]))  # fmt: skip
    assert [ln for ln in sub.markdown.splitlines() if "**Verdict**" in ln] == [verdict]


def test_second_run_is_cached(sections):
    _, first, second = sections
    for a, b in zip(first, second, strict=True):
        assert a.markdown == b.markdown
        assert a.plots == b.plots
