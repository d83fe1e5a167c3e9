"""The study framework itself: settings validation, the run store, worker grouping, atomic writes."""

from __future__ import annotations

import json

import pytest

from sparse_opd_peft.lab.study import SECTIONS, RenderInfo, StudyConfig, write_atomic
from sparse_opd_peft.lab.study.core import render_header
from sparse_opd_peft.lab.study.workers import _SECTION_COST, worker_groups


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sections": ("geometry", "bogus")}, "unknown study section"),
        ({"workers": 0}, "workers must be >= 1"),
        ({"seeds": 0}, ">= 1"),
        ({"steps": 0}, ">= 1"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StudyConfig(**kwargs)


def test_worker_groups_cover_every_section_once_and_balance_cost():
    groups = worker_groups(SECTIONS, 2)
    assert sorted(n for g in groups for n in g) == sorted(SECTIONS)
    loads = [sum(_SECTION_COST[n] for n in g) for g in groups]
    assert len(groups) == 2 and max(loads) - min(loads) <= max(_SECTION_COST.values()) - min(_SECTION_COST.values())
    assert loads == [51, 47]  # recovery + savings vs the rest, with the costs measured on the toy world
    assert worker_groups(("geometry",), 4) == [["geometry"]]
    assert worker_groups(SECTIONS, 1) == [sorted(SECTIONS, key=lambda n: -_SECTION_COST[n])]


def test_write_atomic_creates_parents_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a" / "b" / "study.json"
    write_atomic(target, json.dumps({"x": 1}))
    write_atomic(target, json.dumps({"x": 2}))
    assert json.loads(target.read_text()) == {"x": 2}
    assert sorted(p.name for p in target.parent.iterdir()) == ["study.json"]


def test_header_and_compute_seconds_come_from_the_run_store():
    runs = {"rec_top20_s0": {"train_seconds": 1.0, "config": {"steps": 10}, "wall_seconds": 60.0},
            "rec_bf16_opd_full_s0": {"density": 0.9, "wall_seconds": 30.0},  # derived entry: no training
            "opd_full_s0": {"train_seconds": 2.0, "config": {"steps": 25}, "wall_seconds": 150.0}}  # fmt: skip
    acc = {"student": {"add": 0.131}, "teacher": {"add": 1.0}}
    info = RenderInfo(StudyConfig(out="runs/x", seeds=2, steps=10), acc, {}, {"add": 4}, runs)
    header = render_header(info)
    expected = "(task `add`, 10 steps × 64 prompts, lr 0.001, 2000 held-out prompts; anchor 13.1 %, teacher 100.0 %"
    assert expected in header[2]
    assert header[4] == ("Cost: 2 training runs, 35 optimizer steps; recorded wall-clock of all cached entries 4 min (as "
                         "first measured, whatever else ran on the machine then).")  # fmt: skip
    assert info.compute_seconds("rec_") == (2, 90.0) and info.compute_seconds("sub_") == (0, 0.0)
    assert info.anchor == 0.131 and info.base.opd.steps == 10 and info.base.opd.eval_samples == 500
