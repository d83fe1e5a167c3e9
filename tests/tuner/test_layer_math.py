"""The custom autograd function against dense references."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, random_mask
from peft import get_peft_model

from sparse_opd_peft import SparseOPDConfig
from sparse_opd_peft.tuner import kernels
from sparse_opd_peft.tuner.kernels import csr_pattern
from sparse_opd_peft.tuner.sparse_matmul import (
    DeltaSpec,
    SparseDeltaLinear,
    dense_delta,
    effective_weight,
    sparse_delta_linear,
    values_grad,
)


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


def test_effective_weight_patch_is_the_dense_one_rounding():
    """The patched copy (sparse adapters) == dtype(float32(W) + ΔW) built densely, bit for bit, also for two adapters
    sharing coordinates and for a weight in another dtype than the activations."""
    g = torch.Generator().manual_seed(0)
    for wdtype, dtype in (
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
    ):
        w = torch.randn(40, 30, generator=g).to(wdtype)
        i1 = torch.randperm(1200, generator=g)[:300].sort().values.to(torch.int32)
        i2 = torch.cat([i1[:100], torch.randperm(1200, generator=g)[:50]]).unique().to(torch.int32)
        v1, v2 = torch.randn(300, generator=g) * 1e-2, torch.randn(i2.numel(), generator=g) * 1e-2
        for specs, tensors in (
            ((DeltaSpec(True, False),), (v1, i1)),
            ((DeltaSpec(True, False),) * 2, (v1, i1, v2, i2)),
        ):
            expected = dense_delta(tuple(w.shape), specs, tensors, out=w.float().clone()).to(dtype)
            assert torch.equal(effective_weight(w, specs, tensors, dtype), expected)
            assert torch.equal(
                effective_weight(w, specs, tensors, dtype, out=torch.empty(40, 30, dtype=dtype)), expected
            )


def test_csr_pattern_is_cached_and_rebuilt_when_indices_change():
    idx = torch.tensor([1, 5, 9, 22], dtype=torch.int32)
    first = csr_pattern(idx, 4, 6)
    assert csr_pattern(idx, 4, 6) is first  # cached with the tensor
    assert first[0].tolist() == [0, 2, 3, 3, 4] and first[1].tolist() == [1, 5, 3, 4]
    idx.copy_(torch.tensor([0, 6, 12, 18], dtype=torch.int32))  # in place (as load_state_dict does)
    again = csr_pattern(idx, 4, 6)
    assert again is not first and again[0].tolist() == [0, 1, 2, 3, 4] and again[1].tolist() == [0, 0, 0, 0]


def test_layers_sharing_an_input_share_one_transposed_copy_and_stay_exact():
    """Three adapters reading one x (q / k / v) in one backward: one transposed copy, exact gradients, nothing
    kept after the backward pass."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 16, generator=g, requires_grad=True)
    outs, adapters = [], []
    for out_f in (12, 8, 8):
        w = torch.randn(out_f, 16, generator=g)
        idx = torch.randperm(out_f * 16, generator=g)[:30].sort().values.to(torch.int32)
        v = torch.zeros(30, requires_grad=True)
        outs.append(sparse_delta_linear(x, w, None, (DeltaSpec(True, False),), (v, idx), (out_f, 16), "sampled"))
        adapters.append((v, idx, torch.randn(4, 6, out_f, generator=g)))
    misses = []
    real = kernels.scratch
    kernels.scratch = lambda purpose, *a: misses.append(purpose) or real(purpose, *a)
    try:
        sum((o * dy).sum() for o, (_, _, dy) in zip(outs, adapters, strict=True)).backward()
    finally:
        kernels.scratch = real
    assert misses.count("xt") == 1
    assert getattr(kernels._LOCAL, "xt", None) is None and not getattr(kernels._LOCAL, "buffers", {})
    for v, idx, dy in adapters:
        ref = (dy.reshape(24, -1).t() @ x.detach().reshape(24, 16)).view(-1)[idx.long()]
        torch.testing.assert_close(v.grad, ref)


@pytest.mark.parametrize("path", ["sampled", "dense_rows"])
def test_inference_mode_then_training_reuses_no_inference_buffer(path):
    """A forward under ``torch.inference_mode`` (as peft's own tests and ``generate`` do) must not leave reused
    buffers or cached patterns that a later training step writes to ("inplace update to inference tensor"); the
    logits agree between the two modes."""
    kernels.release_scratch()
    model = make_model()
    pm = get_peft_model(model, SparseOPDConfig(mask=random_mask(model, 0.05), grad_path=path))
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = pm(input_ids=ids).logits.clone()
    out = pm(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits.detach(), ref, rtol=0, atol=0)
    out.loss.backward()
    grads = [p.grad for n, p in pm.named_parameters() if "sparse_opd_values" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    with torch.inference_mode():
        torch.testing.assert_close(pm(input_ids=ids).logits, ref, rtol=0, atol=0)
