"""The adapter's linear map ``y = x (W + ΔW)ᵀ + b`` as one custom autograd function.

``ΔW = Σ_a scatter(values_a at indices_a) + coeff_a @ basis_aᵀ`` over the active adapters. The function saves only
``(x, W, values, indices, coeff, basis)`` — never a dense ``W + ΔW`` — and in backward

* ``dx = dy (W + ΔW)`` with ``W + ΔW`` rebuilt as a temporary,
* ``d values = gather(dyᵀ x)`` at the coordinates, either by row blocks of ``dyᵀ x`` whose size is bounded by
  ``block_bytes`` (``"dense_rows"``), or without forming any dense block: ``torch.sparse.sampled_addmm`` on the
  coordinates' CSR pattern (``"sampled"``) or coordinate-wise products (``"gather"``),
* ``d coeff = dyᵀ (x basis)`` (out, r).

``W`` may be ``None`` (quantized bases): the function then returns only ``x ΔWᵀ`` and the caller adds the base
layer's own output.

The forward weight is ``dtype(float32(W) + ΔW)`` — one rounding, exactly what :meth:`merge` writes — so a model
trained in bf16 computes what its merged weights will compute, while ``values`` keep accumulating in float32.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

# Up to this density torch.sparse.sampled_addmm beats the row-block GEMM for d values (measured on 2 CPU cores,
# 1536x512 weight, 1024 tokens: 8 ms vs 40 ms at 1 %, 16 ms vs 34 ms at 5 %, 59 ms vs 24 ms at 50 %).
SAMPLED_MAX_DENSITY = 0.15
_GATHER_CHUNK_ELEMS = 2**22


@dataclass(frozen=True)
class DeltaSpec:
    """Static description of one adapter's delta: whether it has sparse values and/or a subspace term, and this
    adapter's own backward settings for ``d values`` (None: the call's ``grad_path`` / ``block_bytes``)."""

    sparse: bool
    subspace: bool
    grad_path: str | None = None
    block_bytes: int | None = None


def dense_delta(
    shape: tuple[int, int],
    specs: tuple[DeltaSpec, ...],
    tensors: tuple[torch.Tensor, ...],
    out: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Accumulate the adapters' ΔW into ``out`` ((out, in); zeros of ``dtype`` when None) and return it.

    ``tensors`` is the flat tuple ``(values, indices)?, (coeff, basis)?`` per spec, in order; ``values`` 1-D float,
    ``indices`` 1-D integer flat indices, ``coeff`` (out, r), ``basis`` (in, r).
    """
    if out is None:
        out = torch.zeros(shape, dtype=dtype, device=tensors[0].device)
    flat = out.view(-1)
    pos = 0
    for spec in specs:
        if spec.sparse:
            values, indices = tensors[pos], tensors[pos + 1]
            pos += 2
            flat.index_add_(0, indices.long(), values.to(out.dtype))
        if spec.subspace:
            coeff, basis = tensors[pos], tensors[pos + 1]
            pos += 2
            out.addmm_(coeff.to(out.dtype), basis.to(out.dtype).t())
    return out


def effective_weight(
    weight: torch.Tensor, specs: tuple[DeltaSpec, ...], tensors: tuple[torch.Tensor, ...], dtype: torch.dtype
) -> torch.Tensor:
    """``dtype(float32(W) + ΔW)``: a fresh (out, in) tensor; ``W`` is not modified (float64 stays float64)."""
    base = weight.detach().to(accumulate_dtype(weight.dtype), copy=True)
    return dense_delta(tuple(weight.shape), specs, tensors, out=base).to(dtype)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half / bfloat16 / float32 inputs, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _values_grad_rows(
    dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, in_features: int, block_bytes: int
) -> torch.Tensor:
    """``gather(dyᵀ x)`` at sorted flat ``indices`` by row blocks of at most ``block_bytes`` (float32)."""
    out_features = dy.shape[1]
    rows_per_block = max(1, min(out_features, block_bytes // max(dy.element_size() * in_features, 1)))
    idx = indices.long()
    grad = torch.empty(idx.numel(), dtype=dy.dtype, device=dy.device)
    bounds = torch.arange(0, out_features + rows_per_block, rows_per_block, device=idx.device).clamp_(max=out_features)
    cuts = torch.searchsorted(idx, bounds * in_features).tolist()
    bounds = bounds.tolist()
    for b in range(len(bounds) - 1):
        start, stop = cuts[b], cuts[b + 1]
        if start == stop:
            continue
        r0, r1 = bounds[b], bounds[b + 1]
        block = dy[:, r0:r1].t().mm(x)  # (r1 - r0, in), bounded by block_bytes
        grad[start:stop] = block.view(-1)[idx[start:stop] - r0 * in_features]
    return grad


def _values_grad_gather(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """``gather(dyᵀ x)`` computed per coordinate as ``Σ_n dy[n, row] x[n, col]``, chunked over coordinates."""
    idx = indices.long()
    rows, cols = idx // in_features, idx % in_features
    grad = torch.empty(idx.numel(), dtype=dy.dtype, device=dy.device)
    dyt, xt = dy.t().contiguous(), x.t().contiguous()  # (out, N), (in, N): gathered rows are contiguous
    chunk = max(1, _GATHER_CHUNK_ELEMS // max(dy.shape[0], 1))
    for s in range(0, idx.numel(), chunk):
        e = min(s + chunk, idx.numel())
        grad[s:e] = (dyt[rows[s:e]] * xt[cols[s:e]]).sum(dim=1)
    return grad


def _values_grad_sampled(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """``gather(dyᵀ x)`` by ``torch.sparse.sampled_addmm`` on the CSR pattern of the coordinates: computes only the
    nnz dot products and never forms a dense block."""
    idx = indices.long()
    out_features = dy.shape[1]
    rows, cols = idx // in_features, idx % in_features
    crow = torch.zeros(out_features + 1, dtype=torch.long, device=dy.device)
    crow[1:] = torch.bincount(rows, minlength=out_features).cumsum(0)
    values = torch.zeros(idx.numel(), dtype=dy.dtype, device=dy.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(crow, cols, values, (out_features, in_features), check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, dy.t(), x, beta=0.0).values()


def values_grad(
    dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, in_features: int, path: str, block_bytes: int
) -> torch.Tensor:
    """Gradient of the loss w.r.t. the sparse values: float32 (nnz,) from ``dy`` (N, out) and ``x`` (N, in)."""
    if path == "auto":
        density = indices.numel() / max(dy.shape[1] * in_features, 1)
        path = "sampled" if density <= SAMPLED_MAX_DENSITY and dy.device.type == "cpu" else "dense_rows"
    if path == "sampled":
        return _values_grad_sampled(dy, x, indices, in_features)
    if path == "gather":
        return _values_grad_gather(dy, x, indices, in_features)
    return _values_grad_rows(dy, x, indices, in_features, block_bytes)


class SparseDeltaLinear(torch.autograd.Function):
    """Autograd function for ``x (W + ΔW)ᵀ + b`` (or ``x ΔWᵀ`` when ``weight`` is None); see module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, specs, grad_path, block_bytes, out_features, in_features, *tensors):
        """x: (..., in); weight: (out, in) or None; bias: (out,) or None; returns (..., out) in x's dtype."""
        if weight is not None:
            w_eff = effective_weight(weight, specs, tensors, x.dtype)
        else:
            w_eff = dense_delta((out_features, in_features), specs, tensors, dtype=accumulate_dtype(x.dtype)).to(
                x.dtype
            )
        y = torch.nn.functional.linear(x, w_eff, None if bias is None else bias.to(x.dtype))
        ctx.specs, ctx.grad_path, ctx.block_bytes = specs, grad_path, block_bytes
        ctx.shape = (out_features, in_features)
        ctx.has_weight = weight is not None
        ctx.save_for_backward(x, weight, bias, *tensors)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, *tensors = ctx.saved_tensors
        out_features, in_features = ctx.shape
        dy2 = dy.reshape(-1, out_features)
        grads_tensors: list[torch.Tensor | None] = [None] * len(tensors)
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            if ctx.has_weight:
                w_eff = effective_weight(weight, ctx.specs, tuple(tensors), dy.dtype)
            else:
                w_eff = dense_delta(ctx.shape, ctx.specs, tuple(tensors), dtype=accumulate_dtype(dy.dtype)).to(dy.dtype)
            dx = dy2.mm(w_eff).view(*dy.shape[:-1], in_features).to(x.dtype)
            del w_eff
        need_adapter = any(ctx.needs_input_grad[8:])
        if need_adapter or ctx.needs_input_grad[1]:
            acc = accumulate_dtype(dy.dtype)
            dy32 = dy2.to(acc)
            x32 = x.reshape(-1, in_features).to(acc)
            pos, k = 0, 8
            for spec in ctx.specs:
                if spec.sparse:
                    values, indices = tensors[pos], tensors[pos + 1]
                    if ctx.needs_input_grad[k]:
                        path = spec.grad_path or ctx.grad_path
                        block = spec.block_bytes or ctx.block_bytes
                        g = values_grad(dy32, x32, indices, in_features, path, block)
                        grads_tensors[pos] = g.to(values.dtype)
                    pos, k = pos + 2, k + 2
                if spec.subspace:
                    coeff, basis = tensors[pos], tensors[pos + 1]
                    if ctx.needs_input_grad[k]:
                        grads_tensors[pos] = dy32.t().mm(x32.mm(basis.to(acc))).to(coeff.dtype)
                    pos, k = pos + 2, k + 2
            if ctx.needs_input_grad[1]:
                dweight = dy32.t().mm(x32).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            dbias = dy2.sum(dim=0).to(bias.dtype)
        return (dx, dweight, dbias, None, None, None, None, None, *grads_tensors)


def sparse_delta_linear(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    specs: tuple[DeltaSpec, ...],
    tensors: tuple[torch.Tensor, ...],
    shape: tuple[int, int],
    grad_path: str = "auto",
    block_bytes: int = 64 * 2**20,
) -> torch.Tensor:
    """Functional entry point: ``x (W + ΔW)ᵀ + b`` for ``x`` (..., in) -> (..., out).

    Args:
        x: input activations (..., in), any float dtype; the output has the same dtype.
        weight: frozen base weight (out, in), or None to compute ``x ΔWᵀ`` only.
        bias: (out,) or None.
        specs: one :class:`DeltaSpec` per adapter (each may carry its own ``grad_path`` / ``block_bytes``).
        tensors: flat ``(values (nnz,), indices (nnz,) int)?, (coeff (out, r), basis (in, r))?`` per spec.
        shape: (out, in).
        grad_path: ``"auto" | "dense_rows" | "sampled" | "gather"`` for the values' gradient of specs without one.
        block_bytes: bound of one dense row block in backward, for specs without one.
    """
    return SparseDeltaLinear.apply(x, weight, bias, specs, grad_path, block_bytes, shape[0], shape[1], *tensors)
