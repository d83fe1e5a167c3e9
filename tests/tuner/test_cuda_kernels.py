"""The CUDA path of the sparse step (issue 15 item 1): values' gradient at the coordinates only, activations read in
their own dtype with float32 accumulation, forward without a float32 full-weight copy.

Tolerances: float64 is checked by ``gradcheck``; float32 against the dense autograd reference to rounding
(rtol 1e-5, atol 1e-5 · scale); bf16 values' gradient against a float64 sum of the same bf16 products (rtol 2e-3,
atol 2e-3 · scale: float32 accumulation of N bf16 products), bf16 forward bit for bit against the merged weight.

The CUDA tests skip without a GPU; the CPU tests check that the same path choice falls back to the CPU kernels, and
the Triton kernel runs in Triton's interpreter when ``TRITON_INTERPRET=1`` and Triton is importable.
"""

from __future__ import annotations

import os

import pytest
import torch

from sparse_opd_peft.tuner import triton_sddmm
from sparse_opd_peft.tuner.sparse_matmul import DeltaSpec, resolve_path, sparse_delta_linear, values_grad

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
PATHS = ["dense_rows", "sampled", "gather", "auto"]


def _problem(device, dtype, out_f=33, in_f=21, nnz=120, n=(3, 40), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(out_f, generator=g).to(device=device, dtype=dtype)
    idx = torch.randperm(out_f * in_f, generator=g)[:nnz].sort().values.to(device=device, dtype=torch.int32)
    vals = (0.1 * torch.randn(nnz, generator=g)).to(
        device=device, dtype=torch.float32 if dtype != torch.float64 else dtype
    )
    x = torch.randn(*n, in_f, generator=g).to(device=device, dtype=dtype)
    return w, b, idx, vals.requires_grad_(), x.requires_grad_()


def _dense_reference(w, b, idx, vals, x, dy):
    """Autograd through ``F.linear(x, W + scatter(values), b)`` in float64."""
    v = vals.detach().double().requires_grad_()
    xr = x.detach().double().requires_grad_()
    delta = torch.zeros(w.numel(), dtype=torch.float64, device=w.device).index_add(0, idx.long(), v)
    y = torch.nn.functional.linear(xr, w.double() + delta.view_as(w), b.double())
    y.backward(dy.double())
    return y, xr.grad, v.grad


@needs_cuda
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("with_weight", [True, False])
def test_gradcheck_float64_cuda(path, with_weight):
    w, b, idx, vals, x = _problem("cuda", torch.float64, out_f=9, in_f=7, nnz=20, n=(2, 5))
    specs = (DeltaSpec(True, False),)

    def fn(x, vals):
        weight, bias = (w, b) if with_weight else (None, None)
        return sparse_delta_linear(x, weight, bias, specs, (vals, idx), tuple(w.shape), path, 64)

    assert torch.autograd.gradcheck(fn, (x, vals))


@needs_cuda
@pytest.mark.parametrize("path", PATHS)
def test_float32_cuda_matches_dense_reference(path):
    w, b, idx, vals, x = _problem("cuda", torch.float32)
    y = sparse_delta_linear(x, w, b, (DeltaSpec(True, False),), (vals, idx), tuple(w.shape), path, 256)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, dx_ref, dv_ref = _dense_reference(w, b, idx, vals, x, dy)
    for got, ref in ((y, y_ref), (x.grad, dx_ref), (vals.grad, dv_ref)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", PATHS)
def test_half_cuda_values_grad_accumulates_in_float32(dtype, path):
    w, b, idx, vals, x = _problem("cuda", dtype, out_f=64, in_f=48, nnz=400, n=(4, 512))
    y = sparse_delta_linear(x, w, b, (DeltaSpec(True, False),), (vals, idx), tuple(w.shape), path, 4096)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert vals.grad.dtype == torch.float32 and x.grad.dtype == dtype
    ref = (dy.double().reshape(-1, 64).t() @ x.detach().double().reshape(-1, 48)).view(-1)[idx.long()]
    torch.testing.assert_close(vals.grad.double(), ref, rtol=2e-3, atol=2e-3 * float(ref.abs().max()))
    merged = (w.float().view(-1).index_add(0, idx, vals.detach()).to(dtype)).view_as(w)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, merged, b), rtol=0, atol=0)


@needs_cuda
def test_cuda_forward_makes_no_float32_weight_copy():
    out_f, in_f = 4096, 4096
    w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16)
    idx = torch.randperm(out_f * in_f, device="cuda")[: out_f * in_f // 20].sort().values.to(torch.int32)
    vals = torch.zeros(idx.numel(), device="cuda", requires_grad=True)
    x = torch.randn(8, in_f, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    sparse_delta_linear(x, w, None, (DeltaSpec(True, False),), (vals, idx), (out_f, in_f))
    torch.cuda.synchronize()
    grown = torch.cuda.max_memory_allocated() - before
    assert grown < 1.5 * w.numel() * w.element_size()  # one bf16 copy (+ the coordinates' float32 sums)


@needs_cuda
@pytest.mark.parametrize("path", ["dense_rows", "sampled"])
def test_cuda_backward_makes_no_float32_activation_copies(path):
    n_tok, out_f, in_f = 16384, 1024, 1024
    w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16)
    idx = torch.randperm(out_f * in_f, device="cuda")[: out_f * in_f // 100].sort().values.to(torch.int32)
    vals = torch.zeros(idx.numel(), device="cuda", requires_grad=True)
    x = torch.randn(n_tok, in_f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = sparse_delta_linear(x, w, None, (DeltaSpec(True, False),), (vals, idx), (out_f, in_f), path, 2**20)
    dy = torch.randn_like(y)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    y.backward(dy)
    torch.cuda.synchronize()
    grown = torch.cuda.max_memory_allocated() - before
    act = x.numel() * x.element_size()  # one bf16 activation; a float32 copy of x or dy would be 2 of these
    budget = 1.5 * act if path == "dense_rows" or not triton_sddmm.supported(dy) else 3.5 * act  # dx (+ bf16 ᵀs)
    assert grown < budget, (path, grown / act)


@needs_cuda
def test_cuda_bf16_training_merges_exactly():
    from conftest import make_model, random_mask
    from peft import get_peft_model

    from sparse_opd_peft import SparseOPDConfig

    model = make_model(dtype=torch.bfloat16).cuda()
    pm = get_peft_model(model, SparseOPDConfig(mask=random_mask(model, 0.05)))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), device="cuda")
    for _ in range(3):
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        unmerged = pm(input_ids=ids).logits
        pm.merge_adapter()
        merged = pm(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=0)


@pytest.mark.skipif(not (CUDA and triton_sddmm.AVAILABLE), reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_kernel_on_cuda_directly(dtype):
    """The kernel itself (no fallback): native strided layouts and contiguous transposes, float32 out."""
    g = torch.Generator().manual_seed(0)
    dy, x = torch.randn(3000, 70, generator=g).to(dtype).cuda(), torch.randn(3000, 90, generator=g).to(dtype).cuda()
    idx = torch.randperm(70 * 90, generator=g)[:900].sort().values.to(torch.int32).cuda()
    ref = (dy.double().t() @ x.double()).view(-1)[idx.long()]
    for a, b in ((dy.t(), x.t()), (dy.t().contiguous(), x.t().contiguous())):
        got = triton_sddmm.sddmm_strided(a, b, idx, 90)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4 * float(ref.abs().max()))
    assert triton_sddmm.supported(dy), f"the Triton kernel was disabled: {triton_sddmm._DISABLED}"


def test_cpu_path_choice_falls_back_to_cpu_kernels():
    """The same path names on CPU tensors run the CPU implementations (no Triton, no out_dtype GEMM) and agree."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        dy, x = torch.randn(50, 33, generator=g).to(dtype), torch.randn(50, 21, generator=g).to(dtype)
        idx = torch.randperm(33 * 21, generator=g)[:60].sort().values.to(torch.int32)
        assert resolve_path("auto", dy, idx.numel(), 21) == "sampled"
        assert resolve_path("auto", dy, 33 * 21, 21) == "dense_rows"
        ref = (dy.double().t() @ x.double()).view(-1)[idx.long()]
        for path in PATHS:
            got = values_grad(dy, x, idx, 21, path, 256)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    not (triton_sddmm.AVAILABLE and os.environ.get("TRITON_INTERPRET") == "1"),
    reason="runs the Triton kernel in Triton's interpreter (TRITON_INTERPRET=1 with Triton importable)",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_kernel_interpreted(dtype):
    g = torch.Generator().manual_seed(0)
    dy, x = torch.randn(300, 37, generator=g).to(dtype), torch.randn(300, 45, generator=g).to(dtype)
    idx = torch.randperm(37 * 45, generator=g)[:200].sort().values.to(torch.int32)
    ref = (dy.double().t() @ x.double()).view(-1)[idx.long()]
    for a, b in ((dy.t(), x.t()), (dy.t().contiguous(), x.t().contiguous())):
        got = triton_sddmm.sddmm_strided(a, b, idx, 45)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)
