"""Caches and helpers the sparse step uses to avoid per-call work (see :mod:`.sparse_matmul`).

* :func:`csr_pattern` - the CSR pattern ``(crow, col, zeros)`` of one adapter's coordinates, built once per
  indices tensor and rebuilt only when that tensor changes (new object, new storage or an in-place write);
* :func:`scratch` - a per-thread, per-purpose CPU buffer that is reused across calls instead of allocating (a fresh
  multi-MB CPU allocation is an ``mmap`` plus page faults on every call); on other devices a plain ``empty``;
* :func:`transposed_input` - one transposed copy of a layer input, shared by every adapter layer that reads the
  same input in one backward pass (q / k / v, gate / up), dropped when the backward pass ends;
* :func:`mm_float32` - ``a @ b`` with float32 output from bf16 / fp16 inputs without float32 copies of them where
  the backend can (``torch.mm(..., out_dtype=float32)`` on CUDA), else through float32 casts.
"""

from __future__ import annotations

import threading
import warnings
import weakref

import torch

_CSR: dict[int, tuple] = {}
_LOCAL = threading.local()


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t._version, tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


def csr_pattern(indices: torch.Tensor, out_features: int, in_features: int) -> tuple[torch.Tensor, ...]:
    """CSR pattern of sorted flat ``indices`` (nnz,) of an (out, in) matrix: ``(crow (out+1,), col (nnz,), zeros
    (nnz,) float32)``, indices int32 when they fit (int64 otherwise); cached per ``indices`` tensor.

    The cache entry is keyed by the tensor object (a weak reference: it disappears with the tensor) and checked
    against its data pointer, version counter and shape, so an in-place change (``load_state_dict``) or a new tensor
    rebuilds it.
    """
    key = id(indices)
    check = (_key(indices), out_features, in_features, torch.is_inference_mode_enabled())
    hit = _CSR.get(key)
    if hit is not None and hit[0]() is indices and hit[1] == check:
        return hit[2]
    idx = indices.long()
    itype = torch.int32 if max(out_features, in_features, idx.numel()) < 2**31 - 1 else torch.int64
    rows, col = idx // in_features, (idx % in_features).to(itype)
    crow = torch.zeros(out_features + 1, dtype=itype, device=idx.device)
    crow[1:] = torch.bincount(rows, minlength=out_features).cumsum(0)
    pattern = (crow, col, torch.zeros(idx.numel(), dtype=torch.float32, device=idx.device))
    ref = weakref.ref(indices, lambda _r, key=key: _CSR.pop(key, None))
    _CSR[key] = (ref, check, pattern)
    return pattern


def csr_matrix(pattern: tuple[torch.Tensor, ...], shape: tuple[int, int], values: torch.Tensor) -> torch.Tensor:
    """A ``torch.sparse_csr_tensor`` of ``pattern`` (from :func:`csr_pattern`) with ``values`` (nnz,)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(pattern[0], pattern[1], values, shape, check_invariants=False)


def scratch(purpose: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised (shape) tensor; on CPU a view of this thread's reusable buffer for ``purpose`` (its
    contents are overwritten by the next call with the same purpose, so use it only as a temporary that no
    autograd graph keeps), elsewhere a fresh ``torch.empty`` (the CUDA caching allocator already reuses memory).

    The buffers are dropped when a backward pass that used them ends (:func:`end_of_backward`), so training holds
    them for one step at most; a forward-only use keeps the ``"w_eff"`` buffer (the largest adapted weight) until
    :func:`release_scratch`.
    """
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = getattr(_LOCAL, "buffers", None)
    if buffers is None:
        buffers = _LOCAL.buffers = {}
    numel = 1
    for s in shape:
        numel *= s
    # inference tensors (made under torch.inference_mode) cannot be written outside it: one buffer per mode
    key = (purpose, dtype, torch.is_inference_mode_enabled())
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = buffers[key] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


def release_scratch() -> None:
    """Free this thread's scratch buffers and transposed-input cache (they are otherwise kept for reuse)."""
    _LOCAL.buffers = {}
    _LOCAL.xt = None


def end_of_backward() -> None:
    """Called from a backward function: at the end of the running backward pass, drop this thread's scratch
    buffers and transposed-input cache (registered once per pass; a no-op outside a backward pass). The callback
    clears the state of the thread that registered it, whichever thread the engine runs it on."""
    state = _LOCAL.__dict__  # this thread's own attribute dict
    if state.get("cleanup_queued", False):
        return

    def release(state: dict = state) -> None:
        state["buffers"], state["xt"], state["cleanup_queued"] = {}, None, False

    try:
        torch.autograd.Variable._execution_engine.queue_callback(release)
    except RuntimeError:  # not inside a backward pass
        return
    state["cleanup_queued"] = True


def transposed_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.t()`` (in, N) contiguous in ``dtype`` for ``x`` (N, in); the last result is reused while the same input
    (same memory, same version) comes back, e.g. for q / k / v in one backward pass.

    The cache holds a reference to ``x`` (so its memory cannot be reused by another tensor while cached) and is
    cleared when the running backward pass ends (see :func:`end_of_backward`).
    """
    hit = getattr(_LOCAL, "xt", None)
    if hit is not None and hit[1] == (_key(x), dtype):
        return hit[2]
    xt = scratch("xt", (x.shape[1], x.shape[0]), dtype, x.device).copy_(x.t())
    _LOCAL.xt = (x, (_key(x), dtype), xt)
    end_of_backward()
    return xt


_MM_DTYPE_OK: dict[str, bool] = {}


def has_float32_mm(t: torch.Tensor) -> bool:
    """True when ``t``'s device runs ``torch.mm(a, b, out_dtype=float32)`` for ``t``'s dtype (bf16 / fp16 -> float32
    in one GEMM, e.g. CUDA), or ``t`` is float32 / float64 already; probed once per device type."""
    if t.dtype in (torch.float32, torch.float64):
        return True
    dev = t.device.type
    if dev not in _MM_DTYPE_OK:
        probe = torch.zeros(2, 2, dtype=t.dtype, device=t.device)
        try:
            _MM_DTYPE_OK[dev] = torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_DTYPE_OK[dev] = False
    return _MM_DTYPE_OK[dev]


def mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated and returned in float32 (float64 for float64 inputs) for 2-D ``a`` (m, k), ``b`` (k, n).
    bf16 / fp16 inputs run one GEMM with a float32 output where :func:`has_float32_mm`, else through float32 casts
    of the operands that are not float32 already (callers cast large shared operands once beforehand)."""
    if a.dtype == b.dtype and a.dtype not in (torch.float32, torch.float64) and has_float32_mm(a):
        return torch.mm(a, b, out_dtype=torch.float32)
    acc = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return a.to(acc).mm(b.to(acc))
