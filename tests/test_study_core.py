"""The study framework itself: settings validation, the run store, worker grouping, atomic writes."""

from __future__ import annotations

import json

import pytest

from sparse_opd_peft.study import SECTIONS, StudyConfig, write_atomic
from sparse_opd_peft.study.core import _SECTION_COST, worker_groups


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
