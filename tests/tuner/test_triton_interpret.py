"""The CUDA values-gradient kernel (``tuner/triton_sddmm.py``) checked without a GPU, in Triton's CPU interpreter.

``TRITON_INTERPRET=1`` runs ``@triton.jit`` kernels on CPU tensors with the same indexing, masking and float32
accumulation as on the GPU (not its speed). The variable must be set before the kernel is decorated, so each check
runs in a fresh interpreter. Skipped where Triton is not installed (the ``dev`` extra brings it on Linux x86-64).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from sparse_opd_peft.tuner import triton_sddmm as T
    from sparse_opd_peft.tuner.sparse_matmul import values_grad
    assert T.AVAILABLE
    dtype = getattr(torch, sys.argv[1])
    torch.manual_seed(0)
    rows = []
    # (tokens, out, in, nnz): odd sizes so every block has masked lanes; N > BLOCK_N for the token loop
    for n, out, inn, nnz in ((37, 50, 30, 101), (300, 64, 48, 700), (5, 7, 3, 21), (129, 33, 17, 33 * 17)):
        dy, x = torch.randn(n, out).to(dtype), torch.randn(n, inn).to(dtype)
        idx = torch.randperm(out * inn)[:nnz].sort().values
        ref = (dy.double().t() @ x.double()).view(-1)[idx]  # float64 reference of the same (rounded) inputs
        cpu = values_grad(dy, x, idx, inn, "sampled", 1 << 20).double()  # the CPU path the tests already trust
        for layout in ("contiguous", "strided"):
            a, b = (dy.t().contiguous(), x.t().contiguous()) if layout == "contiguous" else (dy.t(), x.t())
            for itype in (torch.int32, torch.int64):
                got = T.sddmm_strided(a, b, idx.to(itype), inn)
                rows.append({"shape": [n, out, inn, nnz], "layout": layout, "itype": str(itype),
                             "dtype": str(got.dtype), "err": float((got.double() - ref).abs().max()),
                             "scale": float(ref.abs().max()), "cpu_err": float((cpu - ref).abs().max())})
        got = T.sddmm(dy, x, idx, inn)  # the entry point the layer calls on CUDA
        rows.append({"shape": [n, out, inn, nnz], "layout": "sddmm", "itype": "int64", "dtype": str(got.dtype),
                     "err": float((got.double() - ref).abs().max()), "scale": float(ref.abs().max()),
                     "cpu_err": float((cpu - ref).abs().max())})
    empty = T.sddmm_strided(dy.t(), x.t(), idx[:0], inn)
    # the layer's autograd function taking the Triton branch (as on CUDA) vs the CPU branch: same values' gradient
    from sparse_opd_peft.tuner.sparse_matmul import DeltaSpec, sparse_delta_linear
    w = torch.randn(40, 24).to(dtype)
    idx = torch.randperm(40 * 24)[:97].sort().values
    xin = torch.randn(3, 11, 24).to(dtype)
    grads = {}
    for branch in ("triton", "cpu"):
        T.supported = (lambda dy: True) if branch == "triton" else (lambda dy: False)
        v = torch.zeros(97, requires_grad=True)
        y = sparse_delta_linear(xin, w, None, (DeltaSpec(True, False),), (v, idx), (40, 24), grad_path="sampled")
        (y.float() ** 2).sum().backward()
        grads[branch] = v.grad.double()
    layer_err = float((grads["triton"] - grads["cpu"]).abs().max())
    layer_scale = float(grads["cpu"].abs().max())
    calls = []
    real = T.sddmm
    T.sddmm = lambda *a: calls.append(1) or real(*a)
    T.supported = lambda dy: True
    v = torch.zeros(97, requires_grad=True)
    sparse_delta_linear(xin, w, None, (DeltaSpec(True, False),), (v, idx), (40, 24), grad_path="sampled").sum().backward()
    print(json.dumps({"rows": rows, "empty": list(empty.shape), "layer_err": layer_err, "layer_scale": layer_scale,
                      "kernel_calls": len(calls), "disabled": T._DISABLED}))
    """
)


def _run(dtype: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT, dtype], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_triton_kernel_matches_the_float64_reference_in_the_interpreter(dtype):
    """Every layout (contiguous / strided operands), index type and the ``sddmm`` entry point give float32 results
    within float32 summation rounding of a float64 reference computed from the same (bf16 / fp16-rounded) inputs: the
    kernel reads the low-precision values as they are and accumulates in float32, as ``sampled_addmm`` does on CPU."""
    res = _run(dtype)
    assert res["empty"] == [0]
    assert len(res["rows"]) == 4 * 5
    for row in res["rows"]:
        assert row["dtype"] == "torch.float32"
        n = row["shape"][0]
        bound = 4 * n * 2.0**-24 * max(row["scale"], 1.0) + 1e-6  # float32 accumulation of n products
        assert row["err"] <= bound, row
        assert row["err"] <= 4 * row["cpu_err"] + 1e-5, row  # no worse than the trusted CPU path
    # through the layer's autograd function: the Triton branch gives the CPU branch's values' gradient
    assert res["layer_scale"] > 1.0 and res["layer_err"] <= 1e-5 * res["layer_scale"], res
    assert res["kernel_calls"] == 1 and res["disabled"] == []  # the kernel ran; no silent fall-back to the GEMM path
