"""The one overlap / agreement measure (sparse_opd_peft.masks.mask_overlap): exact counts on hand-made masks, the
random expectation against Monte Carlo, single-weight tensors, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_opd_peft.masks import SparseMask, mask_overlap, random_like

A, B = "model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj"


def bools(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def test_overlap_on_hand_made_masks():
    pred = SparseMask({A: bools([[1, 1, 0, 0], [0, 0, 0, 0]]), B: bools([[1, 0], [0, 0]])})
    final = SparseMask({A: bools([[1, 0, 1, 0], [0, 0, 0, 0]]), B: bools([[1, 1], [1, 0]])})
    got = mask_overlap(pred, final)
    # |P| = 3, |F| = 5, |P∩F| = 2 (A[0,0], B[0,0]); E|R∩F| = 2·2/8 + 1·3/4 = 1.25
    assert got["intersection"] == 2 and got["nnz_a"] == 3 and got["nnz_b"] == 5
    assert got["share_of_a"] == pytest.approx(2 / 3) and got["share_of_b"] == pytest.approx(2 / 5)
    assert got["iou"] == pytest.approx(2 / 6)
    assert got["random_intersection"] == pytest.approx(1.25)
    assert got["random_share_of_a"] == pytest.approx(1.25 / 3)
    assert got["random_share_of_b"] == pytest.approx(1.25 / 5)
    assert got["random_iou"] == pytest.approx(1.25 / (8 - 1.25))
    # symmetric in the intersection, shares swap
    back = mask_overlap(final, pred)
    assert back["intersection"] == 2 and back["share_of_a"] == got["share_of_b"]
    # a module only in one mask counts in its size and contributes nothing to the intersection
    only = mask_overlap(SparseMask({"x.layers.1.mlp.down_proj": bools([[1]])}), final)
    assert only["share_of_a"] == 0 and only["random_share_of_a"] == 0 and only["nnz_b"] == 5
    # plain dicts of bool tensors are accepted
    assert mask_overlap({A: bools([[1, 1, 0, 0], [0, 0, 0, 0]])}, final)["intersection"] == 1


def test_random_expectation_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    shapes = {A: (20, 30), B: (10, 10)}
    pred = SparseMask({n: torch.rand(s, generator=g) < d for (n, s), d in zip(shapes.items(), (0.3, 0.6), strict=True)})
    final = SparseMask(
        {n: torch.rand(s, generator=g) < d for (n, s), d in zip(shapes.items(), (0.2, 0.5), strict=True)}
    )
    exp = mask_overlap(pred, final)
    draws = [mask_overlap(random_like(pred, seed=s), final) for s in range(300)]
    for key in ("share_of_a", "share_of_b", "iou"):
        mc = sum(d[key] for d in draws) / len(draws)
        assert mc == pytest.approx(exp[f"random_{key}"], rel=0.02), key


def test_single_weight_tensors():
    a = torch.tensor([1, 1, 0, 0, 1, 0, 0, 0], dtype=torch.bool)
    b = torch.tensor([1, 0, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    got = mask_overlap(a, b)  # 1-D: read as one row
    assert got["intersection"] == 2 and got["share_of_b"] == pytest.approx(2 / 4) and got["iou"] == pytest.approx(2 / 5)
    assert got["random_intersection"] == pytest.approx(3 * 4 / 8)
    empty = mask_overlap(a, torch.zeros(8, dtype=torch.bool))
    assert empty["nnz_b"] == 0 and empty["intersection"] == 0 and math.isnan(empty["share_of_b"])
    assert empty["share_of_a"] == 0.0


def test_overlap_bad_input():
    m = SparseMask({A: bools([[1, 0]])})
    with pytest.raises(TypeError, match="SparseMask"):
        mask_overlap([1, 0], m)
    with pytest.raises(TypeError, match="bool"):
        mask_overlap(torch.ones(2), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="shapes differ"):
        mask_overlap(m, SparseMask({A: bools([[1], [0]])}))
    with pytest.raises(ValueError, match="shapes differ"):
        mask_overlap(torch.ones(2, 2, dtype=torch.bool), torch.ones(4, dtype=torch.bool))
