"""Golden test: the published ``benchmarks/results/study.md`` is regenerated verbatim from the published
``study.json`` by the study's own rendering code (``render_study``, then ``publish_study``'s link rewrite). The two
files are compared as published, so a re-run of ``sparse-opd study`` + ``publish_study.py`` keeps this passing, while
a hand edit of either file, or a change of a verdict rule without re-publishing, fails it."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path

import pytest

from sparse_opd_peft.lab.study import RenderInfo, render_study

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
# the lines that carry a verdict: the claim lines, the recovery comparisons, the subspace and predictor statements
VERDICT_LINE = re.compile(
    r"reproduced|holds|Verdict|^- (top-\d+ %|bf16-visible|scope:|low-magnitude vs|LoRA r=)|Recovers full-mask|"
    r"No predictor recovers|does not separate the predictors|The papers' exact protocol"
)


def _publish_module():
    spec = importlib.util.spec_from_file_location("publish_study", RESULTS.parent / "publish_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def published():
    summary = json.loads((RESULTS / "study.json").read_text())
    return summary, (RESULTS / "study.md").read_text(), _publish_module().rewrite_links(render_study(summary))


def test_every_verdict_line_regenerates_verbatim(published):
    _, md, regenerated = published
    lines = [ln for ln in md.splitlines() if VERDICT_LINE.search(ln)]
    # 6 geometry claims, 3 controls claims, the recovery verdicts heading + 8 comparisons + the protocol sentence,
    # the subspace verdict and one predictor statement per density: at least 21 lines
    assert len(lines) >= 21, lines
    produced = set(regenerated.splitlines())
    assert [ln for ln in lines if ln not in produced] == []


def test_whole_study_md_regenerates_verbatim(published):
    _, md, regenerated = published
    assert regenerated == md


def test_a_changed_number_changes_the_regenerated_verdict(published):
    """The golden comparison is sensitive to the numbers: OPD's FFN energy share below half in study.json flips the
    FFN-heavy claim of the regenerated study.md."""
    summary, md, _ = published
    changed = copy.deepcopy(summary)
    changed["sections"]["geometry"]["data"]["means"]["ffn_energy_share"]["OPD"] = 0.4
    line = next(ln for ln in render_study(changed).splitlines() if "*OPD is FFN-heavy*" in ln)
    assert "**not reproduced** — 40.0 %" in line and line not in md


def test_a_study_json_without_the_world_facts_is_refused(published):
    summary, _, _ = published
    old = copy.deepcopy(summary)
    del old["world"]["block_linears"]
    with pytest.raises(ValueError, match="predates the world facts"):
        RenderInfo.from_summary(old)
