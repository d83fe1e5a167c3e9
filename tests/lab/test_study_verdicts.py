"""The study's verdict logic on hand-made numbers whose outcome is known, both ways: every function that decides a
"reproduced" / "not reproduced", "holds" / "fails", "≈" / "<" / ">", "keeps" / "hurts" or "recovers" statement,
and the lines that carry it. No toy world: these run in milliseconds."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
from _study_utils import VERDICT

from sparse_opd_peft.lab.study import RenderInfo, StudyConfig, controls, predictors_report, recovery, subspace
from sparse_opd_peft.lab.study.geometry_claims import (
    COLUMNS,
    METHODS,
    _trend,
    claims,
    ffn_heavy,
    locks_early,
    low_magnitude_lean,
    ordered,
    rank_trends_as_paper,
    rotation_ordered,
)
from sparse_opd_peft.lab.study.recovery_extra import low_lr_md, sgd_md

STUDY_JSON = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "study.json"


def _verdicts(line: str) -> list[str]:
    return VERDICT.findall(line)


# ---------------------------------------------------------------------------------------------- geometry


def test_geometry_predicates_both_ways():
    assert ordered({"SFT": 0.081, "OPD": 0.516, "RLVR": 0.772})  # the paper's bf16 sparsities
    assert not ordered({"SFT": 0.516, "OPD": 0.081, "RLVR": 0.772})
    assert not ordered({"SFT": 0.10, "OPD": 0.105, "RLVR": 0.5})  # a 0.5-point step is not > TOL (1 point)
    assert not ordered({"SFT": 0.1, "OPD": math.nan, "RLVR": 0.5})
    assert ordered({"SFT": 0.1, "OPD": 0.2, "RLVR": 0.0, "RLVR*": 0.3}, ("SFT", "OPD", "RLVR*"))
    assert ffn_heavy(0.75) and not ffn_heavy(0.5) and not ffn_heavy(0.3)
    assert low_magnitude_lean(0.536)  # the paper's 53.6 %
    assert not low_magnitude_lean(0.52) and not low_magnitude_lean(0.50)  # MARGIN: above 52 %
    sim = {"SFT": 0.5, "OPD": 0.9, "RLVR": 0.6, "RLVR*": 0.89}
    assert locks_early(sim) and not locks_early(sim, "RLVR*")  # RLVR* within 0.02 of OPD
    assert not locks_early({"SFT": 0.89, "OPD": 0.9, "RLVR": 0.5})
    assert _trend(1.5) == "expands (1.50)" and _trend(1.05) == "band (1.05)"
    assert _trend(0.8) == "contracts (0.80)" and _trend(math.nan) == "–"
    paper = {"SFT": _trend(1.5), "OPD": _trend(1.0), "RLVR": _trend(0.7)}
    assert rank_trends_as_paper(paper)
    assert not rank_trends_as_paper({**paper, "OPD": _trend(1.2)})
    assert not rank_trends_as_paper({**paper, "RLVR": _trend(0.95)})
    rot = {"principal_angle_deg": {"SFT": 12.0, "OPD": 1.0, "RLVR": 0.4, "RLVR*": 0.99},
           "nss": {"SFT": 1e-3, "OPD": 1e-4, "RLVR": 1e-5, "RLVR*": 1e-6}}  # fmt: skip
    assert rotation_ordered(rot)
    assert not rotation_ordered(rot, "RLVR*")  # 0.99 -> 1.0 is a step of 1 %, not > RTOL (5 %)


def _paper_like_means() -> dict[str, dict[str, float]]:
    """Per-method means for which every geometry claim of the paper holds."""
    per = lambda sft, opd, rlvr, star: {"SFT": sft, "OPD": opd, "RLVR": rlvr, "RLVR*": star}  # noqa: E731
    return {
        "bf16_sparsity": per(0.081, 0.516, 0.772, 0.80),
        "low_magnitude_overlap": per(0.319, 0.536, 0.735, 0.74),
        "ffn_energy_share": per(0.60, 0.75, 0.70, 0.70),
        "ffn_param_share": per(0.66, 0.66, 0.66, 0.66),
        "sim_early": per(0.30, 0.90, 0.40, 0.50),
        "stable_rank_first": per(10.0, 10.0, 10.0, 10.0),
        "stable_rank": per(15.0, 10.5, 7.0, 7.0),
        "principal_angle_deg": per(12.0, 1.0, 0.4, 0.3),
        "nss": per(1e-3, 1e-4, 1e-5, 1e-6),
        "late_reward": per(math.nan, 0.5, 0.5, 0.5),
        "sim_random": per(0.25, 0.25, 0.25, 0.25),
    }


def _paper_like_low() -> dict[str, dict[str, float]]:
    return {"SFT": {"acc": 0.30, "bf16_sparsity": 0.30, "low_magnitude_overlap": 0.40},
            "OPD": {"acc": 0.40, "bf16_sparsity": 0.50, "low_magnitude_overlap": 0.60},
            "RLVR": {"acc": 0.35, "bf16_sparsity": 0.70, "low_magnitude_overlap": 0.70}}  # fmt: skip


CLAIMS = ("SFT < OPD < RLVR in bf16 sparsity", "FFN-heavy", "low-magnitude weights", "locks early", "SFT expands",
          "Rotation and spectral drift")  # fmt: skip
ALL_HOLD = {CLAIMS[0]: ["reproduced"] * 3, CLAIMS[1]: ["reproduced"], CLAIMS[2]: ["reproduced", "reproduced", "holds"],
            CLAIMS[3]: ["reproduced"] * 2, CLAIMS[4]: ["reproduced"], CLAIMS[5]: ["reproduced"] * 2}  # fmt: skip


def _claim_verdicts(lines: list[str]) -> dict[str, list[str]]:
    out = {}
    for claim in CLAIMS:
        (line,) = [ln for ln in lines if ln.startswith("- *") and claim in ln]
        out[claim] = _verdicts(line)
    return out


def test_geometry_claims_all_reproduced_on_paper_like_numbers():
    lines = claims(_paper_like_means(), _paper_like_low(), anchor=0.2, lr=1e-3, n_seeds=3)
    assert _claim_verdicts(lines) == ALL_HOLD
    assert len(lines) == 6  # nothing collapsed
    assert "nothing is learnt" not in lines[0]  # the low-lr runs moved accuracy by ≥ 5 points


def test_geometry_claims_none_reproduced_on_dense_flat_numbers():
    """The toy world's situation at lr 1e-3: every mask nearly dense, overlaps at the 50 % baseline, flat ranks."""
    flat = {k: dict.fromkeys(COLUMNS, v) for k, v in (("bf16_sparsity", 0.01), ("low_magnitude_overlap", 0.5),
            ("ffn_energy_share", 0.45), ("ffn_param_share", 0.8), ("sim_early", 0.75), ("stable_rank_first", 5.0),
            ("stable_rank", 5.0), ("principal_angle_deg", 9.0), ("nss", 0.04), ("sim_random", 0.22))}  # fmt: skip
    flat["late_reward"] = {"SFT": math.nan, "OPD": 0.5, "RLVR": 0.001, "RLVR*": 0.3}
    low = {m: {"acc": 0.131, "bf16_sparsity": 0.2, "low_magnitude_overlap": 0.51} for m in METHODS}
    lines = claims(flat, low, anchor=0.131, lr=1e-3, n_seeds=3)
    expected = {c: ["not reproduced"] * len(v) for c, v in ALL_HOLD.items()}
    expected[CLAIMS[2]] = ["not reproduced", "not reproduced", "fails"]
    assert _claim_verdicts(lines) == expected
    assert "nothing is learnt at this lr" in lines[0]
    assert lines[-1].startswith("- RLVR collapsed: training reward ≈ 0") and "that column" in lines[-1]


@pytest.mark.parametrize(
    "key, method, value, claim, verdicts",
    [
        ("bf16_sparsity", "RLVR", 0.40, CLAIMS[0], ["not reproduced", "reproduced", "reproduced"]),
        ("bf16_sparsity", "RLVR*", 0.52, CLAIMS[0], ["reproduced", "not reproduced", "reproduced"]),
        ("ffn_energy_share", "OPD", 0.45, CLAIMS[1], ["not reproduced"]),
        ("low_magnitude_overlap", "OPD", 0.51, CLAIMS[2], ["not reproduced", "reproduced", "holds"]),
        ("sim_early", "RLVR", 0.89, CLAIMS[3], ["not reproduced", "reproduced"]),
        ("sim_early", "RLVR*", 0.95, CLAIMS[3], ["reproduced", "not reproduced"]),
        ("stable_rank", "OPD", 13.0, CLAIMS[4], ["not reproduced"]),
        ("stable_rank", "RLVR", 9.5, CLAIMS[4], ["not reproduced"]),
        ("principal_angle_deg", "RLVR", 0.99, CLAIMS[5], ["not reproduced", "reproduced"]),
        ("nss", "RLVR*", 2e-4, CLAIMS[5], ["reproduced", "not reproduced"]),
    ],
)
def test_geometry_each_number_flips_only_its_own_verdict(key, method, value, claim, verdicts):
    means = _paper_like_means()
    means[key][method] = value
    expected = {**ALL_HOLD, claim: verdicts}
    assert _claim_verdicts(claims(means, _paper_like_low(), 0.2, 1e-3, 3)) == expected


@pytest.mark.parametrize(
    "low_key, method, value, verdicts",
    [
        ("bf16_sparsity", "OPD", 0.25, ["reproduced", "reproduced", "not reproduced"]),
        ("low_magnitude_overlap", "OPD", 0.515, ["reproduced", "not reproduced", "holds"]),
        ("low_magnitude_overlap", "RLVR", 0.55, ["reproduced", "reproduced", "fails"]),
    ],
)
def test_geometry_low_lr_numbers_flip_their_verdicts(low_key, method, value, verdicts):
    low = _paper_like_low()
    low[method][low_key] = value
    claim = CLAIMS[0] if low_key == "bf16_sparsity" else CLAIMS[2]
    assert _claim_verdicts(claims(_paper_like_means(), low, 0.2, 1e-3, 3)) == {**ALL_HOLD, claim: verdicts}


# ---------------------------------------------------------------------------------------------- controls


def test_controls_tracks_and_verdicts_both_ways():
    assert controls.tracks(0.0) and controls.tracks(controls.TRACKS)
    assert not controls.tracks(controls.TRACKS + 1e-9) and not controls.tracks(None) and not controls.tracks(math.nan)
    tok = {k: 0.05 for k in ("topgap25", "topgap50", "random25", "random50")}
    ok = controls.verdicts({**tok, "offpolicy": 0.08}, {"mix050": 0.05, "mix005": 0.30})
    assert ok == {"token": True, "offpolicy": True, "mix": True}
    bad = controls.verdicts({**tok, "random25": 0.2, "offpolicy": None}, {"mix050": 0.05, "mix005": 0.10})
    assert bad == {"token": False, "offpolicy": False, "mix": False}  # one token run off; α = 0.05 still tracks
    assert not controls.verdicts(tok | {"offpolicy": 0.0}, {"mix050": 0.2, "mix005": 0.3})["mix"]  # α = 0.5 moves


@pytest.fixture(scope="module")
def published():
    summary = json.loads(STUDY_JSON.read_text())
    return summary, RenderInfo.from_summary(summary)


def test_controls_lines_follow_the_gaps(published):
    summary, info = published
    data = copy.deepcopy(summary["sections"]["controls"]["data"])
    plots = summary["sections"]["controls"]["plots"]

    def lines(gap_opd: dict, gap_mix: dict) -> dict[str, list[str]]:
        data["gap_vs_opd"].update(gap_opd)
        data["gap_vs_mix1"].update(gap_mix)
        md = controls.render(info, data, plots).splitlines()
        return {c: _verdicts(next(ln for ln in md if ln.startswith("- *") and c in ln))
                for c in ("Token sparsification", "Off-policy", "α-mix")}  # fmt: skip

    tok = ("topgap25", "topgap50", "random25", "random50")
    assert lines(dict.fromkeys(tok, 0.05) | {"offpolicy": 0.05}, {"mix050": 0.05, "mix005": 0.5}) == {
        "Token sparsification": ["reproduced"], "Off-policy": ["reproduced"], "α-mix": ["reproduced"]}  # fmt: skip
    assert lines({"topgap50": 0.5, "offpolicy": None}, {"mix050": 0.5}) == {
        "Token sparsification": ["not reproduced"], "Off-policy": ["not reproduced"], "α-mix": ["not reproduced"]
    }  # fmt: skip
    md = controls.render(info, data, plots)
    assert "topgap50 50.0 %" in md and "- *Off-policy rollouts preserve it*: **not reproduced** — gap –;" in md


# ---------------------------------------------------------------------------------------------- recovery


def test_recovery_compare_both_ways():
    assert recovery.word_of(2.0, 2.0) == "≈" and recovery.word_of(-2.0, 2.0) == "≈"
    assert recovery.word_of(2.1, 2.0) == ">" and recovery.word_of(-2.1, 2.0) == "<"
    word, diff, tol = recovery.compare([0.80, 0.82, 0.84], [0.50, 0.52, 0.54])
    assert word == ">" and (diff, tol) == (pytest.approx(30.0), pytest.approx(4.0))  # tol = 2 std = 4 points
    assert recovery.compare([0.80], [0.79])[0] == "≈"  # 1 point: within the 2-point floor
    assert recovery.compare([0.50], [0.80])[0] == "<"
    word, diff, tol = recovery.compare([0.6, 0.9], [0.7, 0.8])  # seed spread: 2 std = 42.4 points
    assert word == "≈" and diff == pytest.approx(0.0, abs=1e-9) and tol == pytest.approx(42.43, abs=0.01)


def _recovery_rows(acc: dict[str, list[float]]) -> list[dict]:
    return [{"key": k, "acc": a, "density": 0.989 if k == "bf16" else 1.0,
             "label": "LoRA r=9 (count ≈ top-20 %)" if k == "lora20" else k} for k, a in acc.items()]  # fmt: skip


def test_recovery_verdict_lines_masked_matches_full_random_does_not():
    acc = {"full": [0.90], "block": [0.91], "bf16": [0.90], "lowmag20": [0.50], "lora20": [0.70]}
    for p in (5, 10, 20, 45):
        acc[f"top{p}"], acc[f"random{p}"] = [0.89], [0.40]
    lines = recovery.verdicts(_recovery_rows(acc))
    assert lines[2] == (
        "- top-20 % mask vs full OPD: 89.0 ≈ 90.0 (Δ -1.0, tol. 2.0); vs full training of the same scope (block "
        "Linears only): 89.0 ≈ 91.0 (Δ -2.0, tol. 2.0); random mask of the same counts vs the top-20 % mask: "
        "40.0 < 89.0 (Δ -49.0, tol. 2.0)."
    )
    assert lines[4] == ("- bf16-visible mask vs full OPD: 90.0 ≈ 90.0 (Δ +0.0, tol. 2.0); vs block Linears only: "
                        "90.0 ≈ 91.0 (Δ -1.0, tol. 2.0) (the mask is 98.9 % dense at this lr: nearly full training).")  # fmt: skip
    assert (
        lines[5] == "- scope: full OPD of the block Linears only vs of all parameters: 91.0 ≈ 90.0 (Δ +1.0, tol. 2.0)."
    )
    assert lines[6] == "- low-magnitude vs random, same counts as top-20 %: 50.0 > 40.0 (Δ +10.0, tol. 2.0)."
    assert lines[7] == "- LoRA r=9 (count ≈ top-20 %) vs the top-20 % mask: 70.0 < 89.0 (Δ -19.0, tol. 2.0)."


def test_recovery_verdict_lines_masked_below_full_random_equal():
    acc = {"full": [0.90, 0.92, 0.94], "block": [0.9], "bf16": [0.9], "lowmag20": [0.5], "lora20": [0.7]}
    for p in (5, 10, 20, 45):
        acc[f"top{p}"], acc[f"random{p}"] = [0.60, 0.62, 0.64], [0.61, 0.63, 0.65]
    line = recovery.verdicts(_recovery_rows(acc))[0]
    assert line.startswith("- top-5 % mask vs full OPD: 62.0 < 92.0 (Δ -30.0, tol. 4.0);")
    assert line.endswith("random mask of the same counts vs the top-5 % mask: 63.0 ≈ 62.0 (Δ +1.0, tol. 4.0).")


def test_recovery_sgd_and_protocol_words():
    cfg = StudyConfig(steps=250, lr=1e-3)
    sgd = {"seed": 0, "full": [{"lr": 0.1, "acc": 0.50, "density": 0.9}], "masked_top20": [{"lr": 0.3, "acc": 0.79}],
           "block": [{"lr": 1.0, "acc": 0.905}], "adamw_full_grad_norm": None,
           "adamw": {"full": {"acc": 0.90}, "block": {"acc": 0.89}, "top20": {"acc": 0.80}}}  # fmt: skip
    line = sgd_md(cfg, sgd)[-1]
    assert "full OPD 50.0 < 90.0, all block Linears 90.5 ≈ 89.0, top-20 % mask 79.0 ≈ 80.0" in line
    sgd["block"][0]["acc"] = 0.95
    assert "all block Linears 95.0 > 89.0" in sgd_md(cfg, sgd)[-1]
    cand = {"name": "opd_full_s0", "label": "full", "optimizer": "adamw", "lr_sum": 0.2, "acc": 0.9, "density": 0.99,
            "gain_share": 1.0, "qualifies": False}  # fmt: skip
    for mask, rand, word in ((0.80, 0.79, "≈"), (0.85, 0.80, ">"), (0.70, 0.80, "<")):
        low = {"seed": 0, "candidates": [cand], "pick": "opd_full_s0", "regime_found": False,
               "protocol": {"mask": {"acc": mask}, "random": {"acc": rand}}}  # fmt: skip
        text = low_lr_md(low, {"anchor_acc": 0.1})[-1]
        assert f"masked {100 * mask:.1f} % {word} random (same per-module counts) {100 * rand:.1f} %" in text
        assert text.startswith("No run both learned a lot and left a sparse bf16 mask.")


# ---------------------------------------------------------------------------------------------- subspace


def _arm_rows(free: list[float], rank: list[float]) -> dict[str, dict]:
    return {"free": {"acc": free}, f"rank{subspace.RANKS[0]}": {"acc": rank}}


def test_subspace_verdict_both_ways():
    assert subspace.verdict(_arm_rows([0.9, 0.9], [0.5, 0.5]), "rank16") == ("<", pytest.approx(-40.0))
    assert subspace.verdict(_arm_rows([0.9, 0.9], [0.89, 0.89]), "rank16")[0] == "≈"
    assert subspace.verdict(_arm_rows([0.5], [0.9]), "rank16")[0] == ">"
    assert subspace.verdict(_arm_rows([0.3, 0.9], [0.4]), "rank16")[0] == "≈"  # 2 std = 85 points


@pytest.mark.parametrize(
    "opd, sft, keeps, hurts, asymmetry",
    [
        (([0.9], [0.89]), ([0.9], [0.7]), "keeps", "hurts", "holds"),  # the paper's finding
        (([0.9], [0.6]), ([0.9], [0.89]), "does not keep", "does not hurt", "does not hold"),
        (([0.9], [0.95]), ([0.9], [0.95]), "keeps", "does not hurt", "does not hold"),  # Δ equal: no asymmetry
        (
            ([0.3, 0.9], [0.3, 0.3]),
            ([0.9], [0.7]),
            "is not distinguishable (seed spread too large) from unconstrained for",
            "hurts",
            "does not hold",
        ),  # OPD Δ -30 within 2 std; SFT Δ -20
    ],
)
def test_subspace_channel_verdict(opd, sft, keeps, hurts, asymmetry):
    line = subspace.channel_verdict(_arm_rows(*opd), _arm_rows(*sft), 16)
    assert line.startswith(f"**Verdict**: the rank-16 early channel {keeps} OPD here (Δ ")
    assert f"and {hurts} SFT (Δ " in line
    assert f"The paper's asymmetry (OPD less affected than SFT) {asymmetry} here." in line


# ---------------------------------------------------------------------------------------------- predictors


def _pred_row(kind: str, acc: list[float], label: str, precision: float = 0.3, iou: float = 0.2) -> dict:
    return {"label": label, "kind": kind, "steps": 16, "seconds": [2.0], "acc": acc, "ffn_share": [0.8],
            "agreement": [{"precision": precision, "random_expectation_precision": 0.2, "iou": iou}]}  # fmt: skip


def _pred_rows(final: float, random: float, early: float, grad: float) -> dict[str, dict]:
    return {"final": _pred_row("oracle", [final], "final", 1.0, 1.0), "random": _pred_row("control", [random], "random"),
            "early10": _pred_row("early", [early], "early Δ", 0.6, 0.5),
            "g16_sq": _pred_row("gradient", [grad], "gradient Σg²", 0.1, 0.1)}  # fmt: skip


def test_predictors_outcome_both_ways():
    assert predictors_report.outcome(_pred_rows(0.90, 0.50, 0.89, 0.60)) == ("recovers", ["early10"])
    assert predictors_report.outcome(_pred_rows(0.90, 0.50, 0.87, 0.92)) == ("recovers", ["g16_sq"])
    assert predictors_report.outcome(_pred_rows(0.90, 0.50, 0.85, 0.60)) == ("none", [])
    assert predictors_report.outcome(_pred_rows(0.51, 0.50, 0.51, 0.51)) == ("no_separation", [])


def test_predictors_statements():
    lines = predictors_report._verdict(_pred_rows(0.90, 0.50, 0.89, 0.505), full_acc=0.95)
    assert lines[0] == ("Full OPD reaches 95.0 %; retraining on the final mask 90.0 %, on a random mask of the same "
                        "per-module density 50.0 %.")  # fmt: skip
    assert (
        lines[1]
        == "**Recovers full-mask quality (within 2 points):** early Δ (89.0 %, 1 seed(s), cost 16 steps ≈ 2 s)."
    )
    assert lines[2] == "No better than the random mask (≤ 1 point above it): gradient Σg²."
    assert lines[3] == "Precision below the random expectation (anti-predictive at this density): gradient Σg²."
    lines = predictors_report._verdict(_pred_rows(0.90, 0.50, 0.70, 0.80), full_acc=0.95)
    assert lines[1] == ("**No predictor recovers full-mask quality** (within 2 points of the final mask). The best is "
                        "gradient Σg²: 80.0 % at a cost of 16 steps (2 s).")  # fmt: skip
    # the highest-IoU predictor (early Δ) is not the best-retraining one (gradient Σg²)
    assert lines[-1].startswith("Agreement with the final mask does not rank the masks by retraining accuracy")
    lines = predictors_report._verdict(_pred_rows(0.51, 0.50, 0.51, 0.51), full_acc=0.95)
    assert "does not separate the predictors" in lines[1] and not any("**" in ln for ln in lines)
