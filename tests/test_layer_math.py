"""The custom autograd function against dense references."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, random_mask
from peft import get_peft_model

from sparse_opd_peft import SparseOPDConfig
from sparse_opd_peft.tuner.sparse_matmul import DeltaSpec, SparseDeltaLinear, sparse_delta_linear, values_grad


def _problem(dtype=torch.float64, out_f=9, in_f=7, nnz=20, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=dtype)
    b = torch.randn(out_f, generator=g, dtype=dtype)
    idx = torch.randperm(out_f * in_f, generator=g)[:nnz].sort().values.to(torch.int32)
    vals = torch.randn(nnz, generator=g, dtype=dtype, requires_grad=True)
    coeff = torch.randn(out_f, r, generator=g, dtype=dtype, requires_grad=True)
    basis = torch.linalg.qr(torch.randn(in_f, r, generator=g, dtype=dtype))[0]
    x = torch.randn(2, 5, in_f, generator=g, dtype=dtype, requires_grad=True)
    return w, b, idx, vals, coeff, basis, x


@pytest.mark.parametrize("path", ["dense_rows", "sampled", "gather"])
@pytest.mark.parametrize("with_weight", [True, False])
def test_gradcheck_float64(path, with_weight):
    w, b, idx, vals, coeff, basis, x = _problem()
    specs = (DeltaSpec(True, False), DeltaSpec(False, True))

    def fn(x, vals, coeff):
        weight, bias = (w, b) if with_weight else (None, None)
        return sparse_delta_linear(x, weight, bias, specs, (vals, idx, coeff, basis), tuple(w.shape), path, 64)

    assert torch.autograd.gradcheck(fn, (x, vals, coeff))


def test_matches_dense_masked_reference_bit_for_bit_comparable():
    """Training our adapter == training a dense ΔW whose gradient is multiplied by the mask (float64, 20 AdamW steps)."""
    w, b, idx, _, _, _, x = _problem(out_f=24, in_f=16, nnz=60)
    x = x.detach()
    target = torch.randn(2, 5, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(24 * 16, dtype=torch.bool)
    mask[idx.long()] = True
    mask = mask.view(24, 16)

    vals = torch.zeros(60, dtype=torch.float64, requires_grad=True)
    dense = torch.zeros(24, 16, dtype=torch.float64, requires_grad=True)
    dense.register_hook(lambda g: g * mask)
    opt_a = torch.optim.AdamW([vals], lr=1e-2)
    opt_b = torch.optim.AdamW([dense], lr=1e-2, weight_decay=0.0)
    opt_a.param_groups[0]["weight_decay"] = 0.0
    for _ in range(20):
        ya = sparse_delta_linear(x, w, b, (DeltaSpec(True, False),), (vals, idx), (24, 16), "dense_rows", 256)
        yb = torch.nn.functional.linear(x, w + dense, b)
        ((ya - target) ** 2).mean().backward()
        ((yb - target) ** 2).mean().backward()
        opt_a.step(), opt_b.step()
        opt_a.zero_grad(), opt_b.zero_grad()
    assert (dense.detach()[~mask] == 0).all()
    torch.testing.assert_close(vals.detach(), dense.detach().view(-1)[idx.long()], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("block_bytes", [4, 64, 1 << 20])
def test_row_blocks_and_gather_agree(block_bytes):
    g = torch.Generator().manual_seed(0)
    dy, x = torch.randn(50, 33, generator=g), torch.randn(50, 21, generator=g)
    idx = torch.randperm(33 * 21, generator=g)[:100].sort().values
    ref = (dy.t() @ x).view(-1)[idx]
    torch.testing.assert_close(values_grad(dy, x, idx, 21, "dense_rows", block_bytes), ref)
    torch.testing.assert_close(values_grad(dy, x, idx, 21, "gather", block_bytes), ref)
    torch.testing.assert_close(values_grad(dy, x, idx, 21, "sampled", block_bytes), ref)
    torch.testing.assert_close(values_grad(dy, x, idx, 21, "auto", block_bytes), ref)


def test_backward_does_not_save_a_dense_weight_copy():
    """Only x, W (the frozen parameter itself), bias and the adapter tensors are saved for backward."""
    w, b, idx, vals, coeff, basis, x = _problem(dtype=torch.float32)
    y = SparseDeltaLinear.apply(x, w, b, (DeltaSpec(True, True),), "auto", 1 << 20, 9, 7, vals, idx, coeff, basis)
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 7
    assert not any(t.shape == w.shape and t.data_ptr() != w.data_ptr() for t in saved if t is not None)


def test_bf16_forward_is_one_rounding_of_the_merged_weight():
    model = make_model(dtype=torch.bfloat16)
    mask = random_mask(model, 0.2)
    pm = get_peft_model(model, SparseOPDConfig(mask=mask, init_weights=False))
    layer = pm.get_submodule("base_model.model." + next(iter(mask)))
    assert layer.sparse_opd_values["default"].dtype == torch.float32
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    w = layer.get_base_layer().weight
    expected_w = (w.float() + layer.get_delta_weight("default")).to(torch.bfloat16)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, expected_w), rtol=0, atol=0)
