"""Metric functions against hand-computed values and dense float64 SVD references, including edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_opd_peft.diagnostics import metrics as M
from sparse_opd_peft.diagnostics import spectral as S
from sparse_opd_peft.diagnostics.engine import DiagnoseConfig, analyze_matrix


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------------------ sparsity
def test_bf16_mask_hand_computed():
    w0 = torch.tensor([1.0, 1.0, 0.5, 0.0, -2.0, 3.0])
    w1 = torch.tensor([1.0 + 2**-10, 1.0 + 2**-7, 0.5, 1e-30, -2.0, 3.0 + 2**-7])
    # 1+2^-10 rounds to 1.0 in bf16 (unchanged); 1+2^-7 is the next bf16 number (changed); 0 -> 1e-30 changed;
    # 3 + 2^-7 is half a bf16 ulp above 3 (ulp(3) = 2^-6): the tie rounds to even, i.e. back to 3 (unchanged).
    expected = torch.tensor([False, True, False, True, False, False])
    assert torch.equal(M.bf16_visible_mask(w0, w1), expected)
    assert M.bf16_sparsity(w0, w1) == pytest.approx(4 / 6)


def test_bf16_mask_equals_bit_patterns_for_finite_nonzero():
    w0 = rand(64, 64, dtype=torch.float32) * 0.02
    w1 = w0 + rand(64, 64, seed=1, dtype=torch.float32) * 1e-4
    bits = w0.bfloat16().view(torch.int16) != w1.bfloat16().view(torch.int16)
    assert torch.equal(M.bf16_visible_mask(w0, w1), bits)
    assert 0.1 < bits.float().mean() < 0.9


def test_bf16_identical_bits_zeros_and_subnormals():
    w = rand(8, 8, dtype=torch.float32).bfloat16()
    assert M.bf16_sparsity(w, w.clone()) == 1.0
    zeros = torch.tensor([0.0, -0.0, 0.0])
    assert not M.bf16_visible_mask(zeros, torch.tensor([-0.0, 0.0, 0.0])).any()  # ±0 is unchanged
    tiny = torch.tensor([1e-40, 1e-40, 5e-39])  # float32 / bf16 subnormals
    changed = M.bf16_visible_mask(tiny, torch.tensor([1e-40, 2e-40, 5e-39]))
    assert changed.tolist() == [False, True, False]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs_raise(bad):
    w0 = torch.zeros(4, 4)
    w1 = w0.clone()
    w1[1, 2] = bad
    for fn in (M.bf16_visible_mask, M.abs_sparsity, M.relative_norm, M.normalized_spectral_shift):
        with pytest.raises(ValueError, match="non-finite"):
            fn(w0, w1)
    with pytest.raises(ValueError, match="shapes differ"):
        M.bf16_sparsity(torch.zeros(2, 3), torch.zeros(3, 2))


def test_abs_sparsity_and_relative_norm():
    w0 = torch.tensor([[1.0, 2.0], [2.0, 0.0]])
    w1 = w0 + torch.tensor([[1e-6, 0.0], [1e-5, -3e-5]])
    assert M.abs_sparsity(w0, w1) == pytest.approx(0.5)  # |Δ| >= 1e-5 counts as changed (float32 rounding aside)
    assert M.relative_norm(w0, w0) == 0.0
    d = torch.tensor([[0.0, 3.0], [4.0, 0.0]])
    assert M.relative_norm(w0, w0 + d) == pytest.approx(5.0 / 3.0)
    assert math.isnan(M.relative_norm(torch.zeros(2, 2), d))
    assert M.relative_norm(torch.zeros(2, 2), torch.zeros(2, 2)) == 0.0


# ------------------------------------------------------------------------------------------------ subspaces
def test_principal_angles_hand_computed_and_tiny():
    for theta in (0.3, 1e-3, 1e-10, math.pi / 2):
        a = torch.zeros(3, 1, dtype=torch.float64)
        a[0, 0] = 1
        b = torch.tensor([[math.cos(theta)], [math.sin(theta)], [0.0]], dtype=torch.float64)
        got = float(M.principal_angles(a, b)[0])
        assert got == pytest.approx(theta, rel=1e-9, abs=1e-15)


def _ref_angles(a, b):
    cos = torch.linalg.svdvals(a.T @ b).clamp(-1, 1)
    return torch.arccos(cos)


@pytest.mark.parametrize("shape", [(300, 420), (420, 300)])
@pytest.mark.parametrize("k", [20, 200])
@pytest.mark.parametrize("method", ["gram", "svd"])
def test_subspace_angles_match_dense_svd(shape, k, method):
    w0 = rand(*shape)
    w1 = w0 + 0.05 * rand(*shape, seed=1)
    u0, s0, vh0 = torch.linalg.svd(w0, full_matrices=False)
    u1, s1, vh1 = torch.linalg.svd(w1, full_matrices=False)
    au, av = M.subspace_angles(w0, w1, k, method=method)
    assert torch.allclose(au, _ref_angles(u0[:, :k], u1[:, :k]), atol=1e-6)
    assert torch.allclose(av, _ref_angles(vh0[:k].T, vh1[:k].T), atol=1e-6)
    ref_nss = float(torch.linalg.vector_norm(s1 - s0) / torch.linalg.vector_norm(s0))
    assert M.normalized_spectral_shift(w0, w1, method=method) == pytest.approx(ref_nss, rel=1e-9)


def test_zero_update_and_rank_one_update():
    w0 = rand(40, 60)
    au, av = M.subspace_angles(w0, w0.clone(), 10)
    assert float(au.max()) < 1e-7 and float(av.max()) < 1e-7
    assert M.normalized_spectral_shift(w0, w0.clone()) == 0.0
    u, v = rand(40, 1, seed=2), rand(60, 1, seed=3)
    s = S.svd_topk(u @ v.T, 0).S
    spec = M.update_spectrum(s, (40, 60))
    assert spec["stable_rank"] == pytest.approx(1.0)
    assert spec["top16_energy_share"] == pytest.approx(1.0)
    assert spec["numerical_rank"] == 1
    assert math.isnan(spec["hill_alpha"])  # fewer than 2 nonzero singular values
    zero = M.update_spectrum(torch.zeros(5, dtype=torch.float64), (5, 8))
    assert zero["stable_rank"] == 0.0 and zero["numerical_rank"] == 0 and math.isnan(zero["top16_energy_share"])


def test_nss_hand_computed():
    w0 = torch.diag(torch.tensor([3.0, 2.0]))
    w1 = torch.diag(torch.tensor([3.0, 2.5]))
    assert M.normalized_spectral_shift(w0, w1) == pytest.approx(0.5 / math.sqrt(13))


def test_spectrum_metrics_hand_computed():
    s = torch.tensor([4.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    assert M.stable_rank(s) == pytest.approx(21 / 16)
    assert M.top_energy_share(s, 2) == pytest.approx(20 / 21)
    assert M.hill_alpha(s, 3) == pytest.approx(1 / ((math.log(4) + math.log(2)) / 2))
    assert M.hill_alpha(s, 64) == M.hill_alpha(s, 3)  # capped at the nonzero values
    assert M.hill_alpha(torch.tensor([2.0, 2.0, 2.0]), 3) == math.inf
    assert M.numerical_rank(torch.tensor([1.0, 1e-2, 1e-4]), (10, 20), rtol=1e-3) == 2
    assert M.numerical_rank(s, (4, 4)) == 3


def test_sim_k():
    q = torch.linalg.qr(rand(30, 6))[0]
    assert M.sim_k(q[:, :3], q[:, :3], 3) == pytest.approx(1.0)
    assert M.sim_k(q[:, :3], q[:, 3:], 3) == pytest.approx(0.0, abs=1e-12)
    mixed = torch.cat([q[:, :1], q[:, 3:5]], dim=1)
    assert M.sim_k(q[:, :3], mixed, 3) == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------------------------ masks
def test_top_fraction_mask_exact_and_deterministic_ties():
    x = torch.tensor([3.0, 1.0, 1.0, 1.0, 0.0, 2.0])
    top = M.top_fraction_mask(x, 0.5)
    assert top.tolist() == [True, True, False, False, False, True]  # ties taken lowest index first
    bottom = M.top_fraction_mask(x, 0.5, largest=False)
    assert bottom.tolist() == [False, True, True, False, True, False]
    assert not M.top_fraction_mask(x, 0.0).any() and M.top_fraction_mask(x, 1.0).all()


def test_principal_and_low_magnitude_masks():
    u, v = rand(20, 1), rand(30, 1, seed=1)
    w0 = u @ v.T  # rank 1: the rank-1 reconstruction is W0 itself
    assert torch.equal(M.principal_mask(w0, rank=1, alpha=0.3), M.top_fraction_mask(w0.abs(), 0.3))
    low = M.low_magnitude_mask(w0, 0.25)
    assert int(low.sum()) == 150 and float(w0.abs()[low].max()) <= float(w0.abs()[~low].min())
    w = rand(50, 70)
    ref = torch.linalg.svd(w, full_matrices=False)
    recon = ref.U[:, :5] @ torch.diag(ref.S[:5]) @ ref.Vh[:5]
    assert torch.equal(M.principal_mask(w, rank=5, alpha=0.5), M.top_fraction_mask(recon.float().abs(), 0.5))


def test_energy_shares():
    shares = M.energy_shares({"model.layers.0.mlp.up_proj": 3.0, "model.layers.0.self_attn.q_proj": 1.0})
    assert shares == {"ffn": 0.75, "attention": 0.25, "other": 0.0}
    assert all(math.isnan(v) for v in M.energy_shares({"model.layers.0.mlp.up_proj": 0.0}).values())


# ------------------------------------------------------------------------------------------------ spectral routes
@pytest.mark.parametrize("backend", ["lapack", "torch"])
def test_svd_topk_routes_match_dense(monkeypatch, backend):
    if backend == "torch":
        monkeypatch.setattr(S, "_LAPACK", None)
    w = rand(280, 350)
    ref = torch.linalg.svd(w, full_matrices=False)
    r = S.svd_topk(w, 30, method="gram")
    assert r.route == ("gram-lapack" if backend == "lapack" and S.lapack_backend() else "gram-eigh")
    assert torch.allclose(r.S, ref.S, rtol=1e-12, atol=1e-10)
    assert torch.allclose(torch.linalg.svdvals(r.U.T @ ref.U[:, :30]), torch.ones(30, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(torch.linalg.svdvals(r.V.T @ ref.Vh[:30].T), torch.ones(30, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(r.V.T @ r.V, torch.eye(30, dtype=torch.float64), atol=1e-12)


def test_svd_topk_rank_deficient_and_errors():
    w = rand(260, 3) @ rand(3, 300, seed=1)  # rank 3, k = 5
    r = S.svd_topk(w, 5, method="gram")
    assert r.U.shape == (260, 5) and r.V.shape == (300, 5)
    assert torch.allclose(r.V.T @ r.V, torch.eye(5, dtype=torch.float64), atol=1e-8)
    with pytest.raises(ValueError, match="2-D"):
        S.svd_topk(torch.zeros(3), 1)
    with pytest.raises(ValueError, match="unknown spectral method"):
        S.svd_topk(w, 1, method="qr")


def test_ill_conditioned_matrix_falls_back_to_exact_singular_values():
    u = torch.linalg.qr(rand(300, 300))[0]
    v = torch.linalg.qr(rand(400, 300, seed=1))[0]
    s = torch.logspace(0, -9, 300, dtype=torch.float64)
    w0 = (u * s) @ v.T
    w1 = w0 + 1e-7 * rand(300, 400, seed=2)
    row, _ = analyze_matrix(w0, w1, "m.layers.0.mlp.up_proj.weight", DiagnoseConfig(top_k=8, method="gram"))
    assert row["route"].endswith("+svdvals")
    s0, s1 = torch.linalg.svdvals(w0), torch.linalg.svdvals(w1)
    ref = float(torch.linalg.vector_norm(s1 - s0) / torch.linalg.vector_norm(s0))
    assert row["nss"] == pytest.approx(ref, rel=1e-9)


def test_svd_topk_many_concurrent_jobs_match(monkeypatch):
    monkeypatch.setenv("SPARSE_OPD_LAPACK_JOBS", "2")
    a, b = rand(270, 300), rand(300, 270, seed=1)
    many = S.svd_topk_many([(a, 8), (b, 8), (a - b.T, 0)], method="gram")
    for w, r in zip((a, b, a - b.T), many, strict=True):
        assert torch.allclose(r.S, torch.linalg.svdvals(w), rtol=1e-12, atol=1e-10)
    assert many[2].U is None and many[0].U.shape == (270, 8)
