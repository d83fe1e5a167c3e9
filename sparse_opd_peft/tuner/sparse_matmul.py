"""The adapter's linear map ``y = x (W + ΔW)ᵀ + b`` as one custom autograd function.

``ΔW = Σ_a scatter(values_a at indices_a) + coeff_a @ basis_aᵀ`` over the active adapters. The function saves only
``(x, W, values, indices, coeff, basis)`` — never a dense ``W + ΔW`` — and in backward

* ``dx = dy (W + ΔW)`` with ``W + ΔW`` rebuilt as a temporary,
* ``d values = gather(dyᵀ x)`` at the coordinates (float32 accumulation), by one of

  - ``"sampled"``: only the nnz dot products. CPU: ``torch.sparse.sampled_addmm`` on the coordinates' CSR pattern
    (cached with the indices tensor, :func:`.kernels.csr_pattern`) over a transposed ``dy`` and a transposed ``x``
    that the layers reading the same input share (q / k / v, gate / up); CUDA: the Triton kernel of
    :mod:`.triton_sddmm` (bf16 / fp16 read as they are, float32 accumulation), or ``sampled_addmm`` for float32
    without Triton;
  - ``"dense_rows"``: row blocks of ``dyᵀ x`` (at most ``block_bytes`` each) then a gather; on CUDA the blocks are
    one GEMM each with bf16 / fp16 inputs and a float32 output (``torch.mm(..., out_dtype=float32)``), so no float32
    copy of ``x`` or ``dy`` is made;
  - ``"gather"``: coordinate-wise products, chunked;
  - ``"auto"``: ``"sampled"`` up to :data:`SAMPLED_MAX_DENSITY` on CPU, up to :data:`CUDA_SAMPLED_MAX_DENSITY` on
    CUDA when Triton is importable, ``"dense_rows"`` otherwise;
* ``d coeff = dyᵀ (x basis)`` (out, r).

``W`` may be ``None`` (quantized bases): the function then returns only ``x ΔWᵀ`` and the caller adds the base
layer's own output.

The forward weight is ``dtype(float32(W) + ΔW)`` — one rounding, exactly what :meth:`merge` writes — so a model
trained in bf16 computes what its merged weights will compute ("forward == merged weight" holds bit for bit), while
``values`` keep accumulating in float32. With sparse adapters only it is built without a float32 copy of ``W``: a
copy of ``W`` in the activations' dtype (on CPU into a reused per-thread buffer) patched at the coordinates with
``dtype(float32(W[idx]) + values_1 + values_2 ...)`` (the adapters' values added in turn, as the dense sum does);
elsewhere the entries are ``dtype(float32(W) + 0) = W`` exactly. With a
subspace term ``ΔW`` is dense and the weight is built as ``dtype(float32(W) + ΔW)`` through a float32 temporary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import triton_sddmm
from .kernels import csr_matrix, csr_pattern, end_of_backward, has_float32_mm, mm_float32, scratch, transposed_input

# CPU: up to this density the sampled product (with cached pattern and shared transposes) beats the row-block GEMM
# for d values (1 thread, 1536x512 weight, 1024 tokens, fp32: 1.0 ms vs 32 ms at 1 %, 4.5 ms vs 32 ms at 5 %,
# 37 ms vs 32 ms at 50 %).
SAMPLED_MAX_DENSITY = 0.3
# CUDA (Triton kernel vs one bf16 GEMM with float32 output): a provisional value, to be set from
# benchmarks/gpu_check.sh (the coordinate-wise product is memory-bound; the GEMM runs on tensor cores).
CUDA_SAMPLED_MAX_DENSITY = 0.01
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
            flat.index_add_(0, indices, values.to(out.dtype))
        if spec.subspace:
            coeff, basis = tensors[pos], tensors[pos + 1]
            pos += 2
            out.addmm_(coeff.to(out.dtype), basis.to(out.dtype).t())
    return out


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half / bfloat16 / float32 inputs, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _patched_entries(
    weight: torch.Tensor, specs: tuple[DeltaSpec, ...], tensors: tuple[torch.Tensor, ...], acc: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse-only specs: ``(coords (m,), float32(W[coords]) + values of each adapter in turn (m,) in acc)`` over
    the union of the adapters' coordinates: per coordinate the same sums, in the same order, as :func:`dense_delta`
    accumulating into ``float32(W)``."""
    if len(specs) == 1:
        return tensors[1], weight.reshape(-1)[tensors[1]].to(acc) + tensors[0].to(acc)
    coords, inverse = torch.unique(
        torch.cat([tensors[2 * i + 1].long() for i in range(len(specs))]), return_inverse=True
    )
    entries = weight.reshape(-1)[coords].to(acc)
    start = 0
    for i in range(len(specs)):
        n = tensors[2 * i].numel()
        entries.index_add_(0, inverse[start : start + n], tensors[2 * i].to(acc))
        start += n
    return coords, entries


def effective_weight(
    weight: torch.Tensor,
    specs: tuple[DeltaSpec, ...],
    tensors: tuple[torch.Tensor, ...],
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dtype(float32(W) + ΔW)`` (out, in) (float64 stays float64); ``W`` is not modified.

    ``out``: an (out, in) ``dtype`` tensor to write into (e.g. a reused scratch buffer), or None for a fresh one.
    Sparse-only deltas patch a ``dtype`` copy of ``W`` at the coordinates (no float32 copy of ``W``); a subspace
    term goes through a float32 temporary.
    """
    acc = accumulate_dtype(weight.dtype)
    if any(s.subspace or not s.sparse for s in specs):
        base = weight.detach().to(acc, copy=True)
        w = dense_delta(tuple(weight.shape), specs, tensors, out=base)
        return w.to(dtype) if out is None else out.copy_(w)  # copy_ rounds to dtype exactly as .to does
    w = torch.empty(weight.shape, dtype=dtype, device=weight.device) if out is None else out
    w.copy_(weight.detach())
    if len(specs) == 1 and weight.dtype == dtype == acc:  # float32(W) + v in float32: add in place, one pass
        return w.view(-1).index_add_(0, tensors[1], tensors[0].to(acc)).view(weight.shape)
    coords, entries = _patched_entries(weight.detach(), specs, tensors, acc)
    w.view(-1)[coords] = entries.to(dtype)
    return w


def resolve_path(path: str, dy: torch.Tensor, nnz: int, in_features: int) -> str:
    """The concrete ``d values`` path for ``path`` (``"auto"`` resolved by device, density and Triton)."""
    if path != "auto":
        return path
    density = nnz / max(dy.shape[1] * in_features, 1)
    if dy.device.type == "cpu":
        return "sampled" if density <= SAMPLED_MAX_DENSITY else "dense_rows"
    if triton_sddmm.supported(dy) and density <= CUDA_SAMPLED_MAX_DENSITY:
        return "sampled"
    return "dense_rows"


def _values_grad_rows(
    dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, in_features: int, block_bytes: int
) -> torch.Tensor:
    """``gather(dyᵀ x)`` at sorted flat ``indices`` by row blocks of at most ``block_bytes`` (float32 blocks, one
    GEMM each from the activations' own dtype)."""
    out_features = dy.shape[1]
    rows_per_block = max(1, min(out_features, block_bytes // max(4 * in_features, 1)))
    grad = torch.empty(indices.numel(), dtype=accumulate_dtype(dy.dtype), device=dy.device)
    bounds = torch.arange(0, out_features + rows_per_block, rows_per_block, device=indices.device)
    bounds = bounds.clamp_(max=out_features)
    cuts = torch.searchsorted(indices, (bounds * in_features).to(indices.dtype)).tolist()
    bounds = bounds.tolist()
    if not has_float32_mm(x):  # no bf16 -> float32 GEMM on this device: one float32 copy of x, not one per block
        x = x.to(accumulate_dtype(x.dtype))
    for b in range(len(bounds) - 1):
        start, stop = cuts[b], cuts[b + 1]
        if start == stop:
            continue
        r0, r1 = bounds[b], bounds[b + 1]
        block = mm_float32(dy[:, r0:r1].t(), x)  # (r1 - r0, in), bounded by block_bytes
        grad[start:stop] = block.view(-1)[indices[start:stop] - r0 * in_features]
    return grad


def _values_grad_gather(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """``gather(dyᵀ x)`` computed per coordinate as ``Σ_n dy[n, row] x[n, col]``, chunked over coordinates."""
    idx = indices.long()
    rows, cols = idx // in_features, idx % in_features
    acc = accumulate_dtype(dy.dtype)
    grad = torch.empty(idx.numel(), dtype=acc, device=dy.device)
    dyt, xt = dy.t().contiguous(), transposed_input(x, x.dtype)  # (out, N), (in, N): gathered rows are contiguous
    chunk = max(1, _GATHER_CHUNK_ELEMS // max(dy.shape[0], 1))
    for s in range(0, idx.numel(), chunk):
        e = min(s + chunk, idx.numel())
        grad[s:e] = (dyt[rows[s:e]].to(acc) * xt[cols[s:e]].to(acc)).sum(dim=1)
    return grad


def _values_grad_sampled(
    dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, in_features: int, pattern: tuple | None
) -> torch.Tensor | None:
    """``gather(dyᵀ x)`` from the nnz dot products only; None when this device / dtype has no sampled kernel."""
    out_features = dy.shape[1]
    if triton_sddmm.supported(dy) and x.dtype == dy.dtype:
        try:
            return triton_sddmm.sddmm(dy, x, indices, in_features)
        except Exception as error:  # a compile / launch failure: warn once, then the GEMM path for good
            triton_sddmm.disable(error)
    acc = accumulate_dtype(dy.dtype)
    if dy.device.type != "cpu" and dy.dtype not in (torch.float32, torch.float64):
        return None  # cuSPARSE's sampled product has no bf16 / fp16 path here: the caller uses dense_rows
    pattern = pattern or csr_pattern(indices, out_features, in_features)
    zeros = pattern[2] if acc == torch.float32 else pattern[2].to(acc)
    csr = csr_matrix(pattern, (out_features, in_features), zeros)
    if dy.device.type == "cpu":  # the kernel wants rows of dyᵀ and of xᵀ contiguous: give it exactly that
        dyt = scratch("dyt", (out_features, dy.shape[0]), acc, dy.device).copy_(dy.t())
        return torch.sparse.sampled_addmm(csr, dyt, transposed_input(x, acc).t(), beta=0.0).values()
    return torch.sparse.sampled_addmm(csr, dy.t(), x, beta=0.0).values()


def values_grad(
    dy: torch.Tensor,
    x: torch.Tensor,
    indices: torch.Tensor,
    in_features: int,
    path: str,
    block_bytes: int,
    pattern: tuple | None = None,
) -> torch.Tensor:
    """Gradient of the loss w.r.t. the sparse values: float32 (nnz,) (float64 for float64 inputs) from ``dy``
    (N, out) and ``x`` (N, in) in their own dtype; ``pattern``: a cached :func:`.kernels.csr_pattern` or None."""
    path = resolve_path(path, dy, indices.numel(), in_features)
    if path == "sampled":
        grad = _values_grad_sampled(dy, x, indices, in_features, pattern)
        if grad is not None:
            return grad
        path = "dense_rows"
    if path == "gather":
        return _values_grad_gather(dy, x, indices, in_features)
    return _values_grad_rows(dy, x, indices, in_features, block_bytes)


def _weight_out(weight: torch.Tensor, dtype: torch.dtype, grad_mode: bool) -> torch.Tensor | None:
    """Where to build the effective weight: this thread's reused CPU buffer when nothing can keep a reference to
    it (no autograd recording), else None (a fresh tensor)."""
    if grad_mode or weight.device.type != "cpu":
        return None
    return scratch("w_eff", tuple(weight.shape), dtype, weight.device)


class SparseDeltaLinear(torch.autograd.Function):
    """Autograd function for ``x (W + ΔW)ᵀ + b`` (or ``x ΔWᵀ`` when ``weight`` is None); see module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, specs, grad_path, block_bytes, out_features, in_features, *tensors):
        """x: (..., in); weight: (out, in) or None; bias: (out,) or None; returns (..., out) in x's dtype."""
        if weight is not None:
            w_eff = effective_weight(weight, specs, tensors, x.dtype, _weight_out(weight, x.dtype, False))
        else:
            w_eff = dense_delta((out_features, in_features), specs, tensors, dtype=accumulate_dtype(x.dtype))
            w_eff = w_eff.to(x.dtype)
        y = torch.nn.functional.linear(x, w_eff, None if bias is None else bias.to(x.dtype))
        ctx.specs, ctx.grad_path, ctx.block_bytes = specs, grad_path, block_bytes
        ctx.shape = (out_features, in_features)
        ctx.has_weight = weight is not None
        ctx.patterns = _patterns(x, specs, grad_path, tensors, (out_features, in_features), ctx.needs_input_grad)
        ctx.save_for_backward(x, weight, bias, *tensors)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, *tensors = ctx.saved_tensors
        out_features, in_features = ctx.shape
        end_of_backward()  # the reused CPU buffers and the shared transposed input go when this backward pass ends
        dy2 = dy.reshape(-1, out_features)
        x2 = x.reshape(-1, in_features)
        grads_tensors: list[torch.Tensor | None] = [None] * len(tensors)
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            if ctx.has_weight:
                out = _weight_out(weight, dy.dtype, torch.is_grad_enabled())
                w_eff = effective_weight(weight, ctx.specs, tuple(tensors), dy.dtype, out)
            else:
                w_eff = dense_delta(ctx.shape, ctx.specs, tuple(tensors), dtype=accumulate_dtype(dy.dtype)).to(dy.dtype)
            dx = dy2.mm(w_eff).view(*dy.shape[:-1], in_features).to(x.dtype)
            del w_eff
        acc = accumulate_dtype(dy.dtype)
        f32: dict[str, torch.Tensor] = {}  # float32 copies, made only for a subspace term or a weight gradient

        def as_acc(name: str, t: torch.Tensor) -> torch.Tensor:
            if name not in f32:
                f32[name] = t.to(acc)
            return f32[name]

        pos = 0
        for i, spec in enumerate(ctx.specs):
            if spec.sparse:
                values, indices = tensors[pos], tensors[pos + 1]
                if ctx.needs_input_grad[8 + pos]:  # the values' slot among forward's inputs (8 fixed arguments first)
                    path = spec.grad_path or ctx.grad_path
                    block = spec.block_bytes or ctx.block_bytes
                    g = values_grad(dy2, x2, indices, in_features, path, block, ctx.patterns[i])
                    grads_tensors[pos] = g.to(values.dtype)
                pos += 2
            if spec.subspace:
                coeff, basis = tensors[pos], tensors[pos + 1]
                if ctx.needs_input_grad[8 + pos]:
                    xb = as_acc("x", x2).mm(basis.to(acc))
                    grads_tensors[pos] = as_acc("dy", dy2).t().mm(xb).to(coeff.dtype)
                pos += 2
        if ctx.needs_input_grad[1]:
            dweight = as_acc("dy", dy2).t().mm(as_acc("x", x2)).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            dbias = dy2.sum(dim=0).to(bias.dtype)
        return (dx, dweight, dbias, None, None, None, None, None, *grads_tensors)


def _patterns(
    x: torch.Tensor, specs: tuple, grad_path: str, tensors: tuple, shape: tuple[int, int], needs: tuple[bool, ...]
) -> list[tuple | None]:
    """Per spec, the cached CSR pattern when its ``d values`` will be computed (``needs``: the forward's
    ``ctx.needs_input_grad``; nothing under no_grad / inference) with the CPU sampled kernel, else None (looked up
    in forward, where ``indices`` is the layer's own buffer object, the cache's key)."""
    if x.device.type != "cpu":
        return [None] * len(specs)
    patterns: list[tuple | None] = []
    probe = None
    pos = 0
    for spec in specs:
        pattern = None
        if spec.sparse:
            if needs[8 + pos]:  # the values' slot among forward's inputs (8 fixed arguments first)
                indices = tensors[pos + 1]
                probe = x.new_empty((0, shape[0])) if probe is None else probe
                if resolve_path(spec.grad_path or grad_path, probe, indices.numel(), shape[1]) == "sampled":
                    pattern = csr_pattern(indices, shape[0], shape[1])
            pos += 2
        if spec.subspace:
            pos += 2
        patterns.append(pattern)
    return patterns


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
