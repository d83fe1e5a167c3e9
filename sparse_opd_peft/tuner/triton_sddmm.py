"""Sampled dense-dense product on CUDA with Triton: ``out[k] = Σ_n dy[n, row_k] · x[n, col_k]`` at the coordinates only.

Reads ``dy`` / ``x`` in their own dtype (fp32, bf16 or fp16) and accumulates in float32; no float32 copy of either is
made. The operands are read through their strides, so any layout works; :func:`sddmm` hands the kernel transposed
copies in the activations' dtype (``dyᵀ`` (out, N) per call, ``xᵀ`` (in, N) shared by the layers that read the same
input) so that each coordinate's two length-N vectors are contiguous (coalesced loads).

Without Triton (CPU-only installs) :data:`AVAILABLE` is False and nothing here is called; the choice of path is in
:func:`sparse_opd_peft.tuner.sparse_matmul.values_grad`.
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU wheels have none
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None
    AVAILABLE = False

BLOCK_K = 32
BLOCK_N = 128
_DISABLED: list[str] = []  # set by disable(): a compile / launch failure turns the kernel off for this process


if AVAILABLE:

    @triton.jit
    def _sddmm_kernel(
        a_ptr,  # (out, N) view: a[r, n] = dy[n, r]
        b_ptr,  # (in, N) view:  b[c, n] = x[n, c]
        idx_ptr,  # (nnz,) sorted flat indices r * in_features + c
        out_ptr,  # (nnz,) float32
        nnz,
        n_tokens,
        in_features,
        stride_ar,
        stride_an,
        stride_bc,
        stride_bn,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = offs_k < nnz
        flat = tl.load(idx_ptr + offs_k, mask=kmask, other=0).to(tl.int64)
        rows = flat // in_features
        cols = flat % in_features
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for n0 in range(0, n_tokens, BLOCK_N):
            offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            m = kmask[:, None] & (offs_n < n_tokens)[None, :]
            a = tl.load(a_ptr + rows[:, None] * stride_ar + offs_n[None, :] * stride_an, mask=m, other=0.0)
            b = tl.load(b_ptr + cols[:, None] * stride_bc + offs_n[None, :] * stride_bn, mask=m, other=0.0)
            acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=1)
        tl.store(out_ptr + offs_k, acc, mask=kmask)


def supported(dy: torch.Tensor) -> bool:
    """True when :func:`sddmm` can run on ``dy``'s device and dtype (Triton importable, CUDA, fp32/bf16/fp16)."""
    return (
        AVAILABLE
        and not _DISABLED
        and dy.device.type == "cuda"
        and dy.dtype in (torch.float32, torch.bfloat16, torch.float16)
    )


def disable(error: BaseException) -> None:
    """Turn the kernel off for this process after ``error`` (warned once); callers fall back to the GEMM path."""
    import warnings

    _DISABLED.append(f"{type(error).__name__}: {error}")
    warnings.warn(
        f"sparse_opd_peft: the Triton sampled kernel failed ({_DISABLED[-1][:300]}); using the row-block GEMM "
        "path for the values' gradient from now on in this process",
        RuntimeWarning,
        stacklevel=3,
    )


def sddmm_strided(a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """Raw kernel call: float32 (nnz,) with ``out[k] = Σ_n a[row_k, n] · b[col_k, n]``.

    Args:
        a: (out, N) any strides, fp32 / bf16 / fp16 (e.g. ``dy.t()`` or a contiguous ``dyᵀ``).
        b: (in, N) any strides, same dtype as ``a``.
        indices: (nnz,) int32 / int64 flat indices ``row * in_features + col`` on ``a``'s device.
        in_features: number of columns of the (out, in) weight.
    """
    if a.dtype != b.dtype or a.shape[1] != b.shape[1]:
        raise ValueError(f"triton_sddmm: a {tuple(a.shape)} {a.dtype} and b {tuple(b.shape)} {b.dtype} do not match")
    nnz = indices.numel()
    out = torch.empty(nnz, dtype=torch.float32, device=a.device)
    if nnz == 0:
        return out
    grid = (triton.cdiv(nnz, BLOCK_K),)
    _sddmm_kernel[grid](
        a, b, indices, out, nnz, a.shape[1], in_features,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N,
    )  # fmt: skip
    return out


def sddmm(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """``gather(dyᵀ x)`` at sorted flat ``indices``: float32 (nnz,) from ``dy`` (N, out) and ``x`` (N, in) of one dtype.

    Transposes ``dy`` (per call) and ``x`` (shared, see :func:`.kernels.transposed_input`) in their own dtype so
    the kernel's loads are contiguous; both copies are in the activations' dtype, never float32 (unless they are
    float32 already).
    """
    from .kernels import transposed_input

    dyt = dy.t().contiguous()
    xt = transposed_input(x, x.dtype)
    return sddmm_strided(dyt, xt, indices, in_features)
