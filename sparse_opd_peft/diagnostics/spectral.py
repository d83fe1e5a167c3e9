"""Fast float64 singular values and top-k singular vectors of weight matrices.

The diagnostics need, per matrix, *all* singular values (NSS, update spectrum) but only the *top-k* singular
vectors (principal angles, rank-r reconstructions, early subspaces). A full ``torch.linalg.svd`` of a 4096 x 14336
matrix computes far more than that. The default route here is:

1. the Gram matrix of the short side, ``G = W Wᵀ`` (m x m, m = min(out, in)), in float64, computing only the
   lower block triangle (about half of a full matrix product);
2. a symmetric eigendecomposition of ``G`` that returns all eigenvalues but only the top-k eigenvectors: Householder
   tridiagonalisation (LAPACK ``dsytrd``), all eigenvalues of the tridiagonal (``dsterf``), top-k eigenvectors by
   MRRR (``dstemr``) and back-transformation of those k vectors only (``dormtr``). These LAPACK routines are taken
   from the OpenBLAS build bundled with numpy; when it is not available the route falls back to
   ``torch.linalg.eigh`` (all eigenvectors, slower, same result);
3. ``σ = sqrt(λ)``, the short-side singular vectors are the eigenvectors, the long-side ones are ``Wᵀ U / σ``
   (re-orthonormalised).

The OpenBLAS calls run single-threaded by default: tridiagonalisation is memory-bound and scales poorly with
threads, and OpenBLAS worker threads that spin next to torch's OpenMP threads slow both down badly
(``SPARSE_OPD_LAPACK_THREADS`` changes the per-call thread count, ``SPARSE_OPD_LAPACK_JOBS`` runs several
eigensolves concurrently, ``SPARSE_OPD_LAPACK=torch`` disables the backend).

Accuracy: a singular value computed through the Gram matrix has absolute error about ``eps · σ₁² / σᵢ``, so it is
exact to float64 tolerance for well-conditioned matrices (random matrices, most trained weights) and loses digits
for tiny singular values. :func:`gram_sigma_error` gives that bound, and callers that need more (NSS with a tiny numerator)
fall back to ``torch.linalg.svdvals``. With CUDA the same Gram route runs on the GPU with ``torch.linalg.eigh``.
"""

from __future__ import annotations

import ctypes
import glob
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

EPS64 = float(torch.finfo(torch.float64).eps)
SMALL_SVD_DIM = 256  # below this short-side size a plain float64 SVD is as fast and simplest


# --------------------------------------------------------------------------------------------- LAPACK via numpy
class _OpenBLAS:
    """ctypes bindings to the ILP64 LAPACK symbols (``scipy_d*_64_``) of numpy's bundled OpenBLAS."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        self.sytrd = lib.scipy_dsytrd_64_
        self.sterf = lib.scipy_dsterf_64_
        self.stemr = lib.scipy_dstemr_64_
        self.ormtr = lib.scipy_dormtr_64_
        self.path = path
        # per-calling-thread thread count (OpenBLAS >= 0.3.27); None: leave OpenBLAS's setting alone
        self._set_local = getattr(lib, "openblas_set_num_threads_local", None)
        if self._set_local is not None:
            self._set_local.argtypes, self._set_local.restype = [ctypes.c_int], ctypes.c_int
        self.threads = max(1, int(os.environ.get("SPARSE_OPD_LAPACK_THREADS", "1")))

    def eig_topk(self, g: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """All eigenvalues (ascending) and the top-k eigenvectors (n x k, ascending order) of symmetric ``g``.

        ``g`` (n x n float64, C-contiguous) is overwritten; only its row-major lower triangle is read. Runs with
        ``SPARSE_OPD_LAPACK_THREADS`` OpenBLAS threads (default 1: OpenBLAS worker threads that spin next to
        torch's OpenMP threads slow both down badly; parallelism comes from running jobs concurrently instead).
        """
        prev = self._set_local(self.threads) if self._set_local is not None else None
        try:
            return self._eig_topk(g, k)
        finally:
            if prev is not None:
                self._set_local(prev)

    @staticmethod
    def _p(a: np.ndarray):
        return a.ctypes.data_as(ctypes.c_void_p)

    def _eig_topk(self, g: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        i64, ref, p = ctypes.c_int64, ctypes.byref, self._p
        n = g.shape[0]
        one = ctypes.c_size_t(1)
        d, e, tau = np.empty(n), np.zeros(max(n, 1)), np.empty(max(n - 1, 1))
        info = i64(0)
        # row-major lower triangle == column-major upper triangle
        wq = np.empty(1)
        self.sytrd(b"U", ref(i64(n)), p(g), ref(i64(n)), p(d), p(e), p(tau), p(wq), ref(i64(-1)), ref(info), one)
        work = np.empty(max(int(wq[0]), 1))
        self.sytrd(
            b"U", ref(i64(n)), p(g), ref(i64(n)), p(d), p(e), p(tau), p(work), ref(i64(work.size)), ref(info), one
        )
        if info.value != 0:
            raise RuntimeError(f"dsytrd failed (info={info.value})")
        evals, e2 = d.copy(), e.copy()
        self.sterf(ref(i64(n)), p(evals), p(e2), ref(info))
        if info.value != 0:
            raise RuntimeError(f"dsterf failed (info={info.value})")
        evals.sort()
        if k == 0:
            return evals, np.empty((n, 0))
        z = np.zeros((k, n))  # C-order (k, n) == Fortran (n, k)
        w, isuppz = np.empty(n), np.empty(2 * k, dtype=np.int64)
        m, tryrac = i64(0), i64(1)
        vl = vu = ctypes.c_double(0.0)
        args = [b"V", b"I", ref(i64(n)), p(d), p(e), ref(vl), ref(vu), ref(i64(n - k + 1)), ref(i64(n)), ref(m), p(w)]
        wq, iwq = np.empty(1), np.empty(1, dtype=np.int64)
        self.stemr(*args, p(z), ref(i64(n)), ref(i64(k)), p(isuppz), ref(tryrac), p(wq), ref(i64(-1)), p(iwq),
                   ref(i64(-1)), ref(info), one, one)  # fmt: skip
        work, iwork = np.empty(max(int(wq[0]), 1)), np.empty(max(int(iwq[0]), 1), dtype=np.int64)
        self.stemr(*args, p(z), ref(i64(n)), ref(i64(k)), p(isuppz), ref(tryrac), p(work), ref(i64(work.size)),
                   p(iwork), ref(i64(iwork.size)), ref(info), one, one)  # fmt: skip
        if info.value != 0 or m.value != k:
            raise RuntimeError(f"dstemr failed (info={info.value}, found {m.value} of {k} eigenvectors)")
        self.ormtr(b"L", b"U", b"N", ref(i64(n)), ref(i64(k)), p(g), ref(i64(n)), p(tau), p(z), ref(i64(n)),
                   p(wq), ref(i64(-1)), ref(info), one, one, one)  # fmt: skip
        work = np.empty(max(int(wq[0]), 1))
        self.ormtr(b"L", b"U", b"N", ref(i64(n)), ref(i64(k)), p(g), ref(i64(n)), p(tau), p(z), ref(i64(n)),
                   p(work), ref(i64(work.size)), ref(info), one, one, one)  # fmt: skip
        if info.value != 0:
            raise RuntimeError(f"dormtr failed (info={info.value})")
        return evals, z.T


_LAPACK: _OpenBLAS | None | bool = False  # False: not probed yet


def _find_openblas() -> str | None:
    root = Path(np.__file__).resolve().parent
    patterns = [root.parent / "numpy.libs" / "libscipy_openblas64_*", root / ".dylibs" / "libscipy_openblas64_*"]
    for pattern in patterns:
        hits = sorted(glob.glob(str(pattern)))
        if hits:
            return hits[0]
    return None


def lapack_backend() -> _OpenBLAS | None:
    """The partial-eigenvector LAPACK backend, or None (then ``torch.linalg.eigh`` is used).

    Probed once and checked against ``torch.linalg.eigh`` on a small matrix. ``SPARSE_OPD_LAPACK=torch`` disables it.
    """
    global _LAPACK
    if _LAPACK is False:
        _LAPACK = None
        path = _find_openblas() if os.environ.get("SPARSE_OPD_LAPACK", "auto") != "torch" else None
        if path is not None:
            try:
                backend = _OpenBLAS(path)
                a = torch.randn(12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
                g = a @ a.T
                ref_vals, ref_vecs = torch.linalg.eigh(g)
                vals, vecs = backend.eig_topk(g.numpy().copy(), 3)
                ok = np.allclose(vals, ref_vals.numpy(), atol=1e-10)
                ok = ok and np.allclose(np.abs(vecs.T @ ref_vecs[:, -3:].numpy()), np.eye(3), atol=1e-8)
                _LAPACK = backend if ok else None
            except (OSError, AttributeError, RuntimeError):
                _LAPACK = None
    return _LAPACK


# --------------------------------------------------------------------------------------------- building blocks
def gram(w: torch.Tensor, block: int = 512) -> torch.Tensor:
    """Lower block triangle of ``w @ w.T`` (the strict upper part is left unset).

    Args:
        w: (m, n) float64 tensor; best with m <= n.
        block: row block size; only blocks on or below the diagonal are multiplied (about half the flops).

    Returns:
        (m, m) float64 tensor whose lower triangle (row-major) holds the Gram matrix.
    """
    m = w.shape[0]
    g = torch.empty(m, m, dtype=w.dtype, device=w.device)
    for i in range(0, m, block):
        j = min(i + block, m)
        g[i:j, :j] = w[i:j] @ w[:j].T
    return g


def _eigh_torch(g: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if k == 0:
        return torch.linalg.eigvalsh(g, UPLO="L").flip(0), g.new_empty(g.shape[0], 0)
    vals, vecs = torch.linalg.eigh(g, UPLO="L")
    return vals.flip(0), vecs[:, -k:].flip(1)


def _eig_lapack(backend: _OpenBLAS, g: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        vals, vecs = backend.eig_topk(np.ascontiguousarray(g.numpy()), k)
    except RuntimeError:  # rare MRRR failure (g is overwritten by then)
        return None
    return torch.from_numpy(vals[::-1].copy()), torch.from_numpy(np.ascontiguousarray(vecs[:, ::-1]))


def sym_eig_many(jobs: Sequence[tuple[torch.Tensor, int]]) -> list[tuple[tuple[torch.Tensor, torch.Tensor], str]]:
    """Eigenvalues (all, descending) and top-k eigenvectors of several symmetric matrices.

    Args:
        jobs: ``[(g, k)]`` with ``g`` (m, m) float64 given by its row-major lower triangle (may be overwritten) and
            ``0 <= k <= m``.

    Returns:
        ``[((evals (m,) descending, evecs (m, k)), route)]`` in job order. Routes: on CPU with the LAPACK backend,
        jobs with ``0 < k < m / 2`` use the partial eigensolver (``"gram-lapack"``; ``SPARSE_OPD_LAPACK_JOBS``
        of them at a time, default 1: tridiagonalisation is memory-bound, concurrent jobs only compete for
        bandwidth); values-only jobs use ``torch.linalg.eigvalsh`` and the rest ``torch.linalg.eigh``
        (``"gram-eigh"``); on CUDA everything uses ``torch.linalg.eigh`` on the device (``"gram-cuda"``).
    """
    out: list = [None] * len(jobs)
    backend = lapack_backend()
    partial = [i for i, (g, k) in enumerate(jobs) if backend and g.device.type == "cpu" and 0 < k < g.shape[0] // 2]
    workers = max(1, int(os.environ.get("SPARSE_OPD_LAPACK_JOBS", "1")))
    if len(partial) > 1 and workers > 1:
        with ThreadPoolExecutor(min(workers, len(partial))) as pool:  # ctypes releases the GIL
            results = dict(zip(partial, pool.map(lambda i: _eig_lapack(backend, *jobs[i]), partial), strict=True))
    else:
        results = {i: _eig_lapack(backend, *jobs[i]) for i in partial}
    for i, (g, k) in enumerate(jobs):
        if i in results:
            if results[i] is None:
                raise RuntimeError("LAPACK partial eigensolver failed; set SPARSE_OPD_LAPACK=torch and rerun")
            out[i] = (results[i], "gram-lapack")
        else:
            out[i] = (_eigh_torch(g, k), "gram-cuda" if g.device.type == "cuda" else "gram-eigh")
    return out


def gram_sigma_error(s: torch.Tensor, m: int) -> torch.Tensor:
    """Estimated absolute error of singular values computed through an m x m Gram matrix.

    Args:
        s: (r,) float64 singular values, descending. m: size of the Gram matrix (kept for API stability).

    Returns:
        (r,) float64: ``2 · eps · σ₁² / σᵢ`` (``inf`` where ``σᵢ = 0``) - the size of a backward-stable eigensolver's
        error on ``σᵢ²`` mapped through the square root. An estimate, not a rigorous bound.
    """
    if s.numel() == 0:
        return s
    return 2.0 * EPS64 * float(s[0]) ** 2 / s


@dataclass
class SVDResult:
    """Singular values (all, descending float64, length min(m, n)), top-k vectors and the route taken.

    ``U``: (m, k) float64 left vectors, ``V``: (n, k) float64 right vectors (None when not requested);
    ``route``: ``"svd"`` | ``"gram-lapack"`` | ``"gram-eigh"`` | ``"gram-cuda"``.
    """

    S: torch.Tensor
    U: torch.Tensor | None
    V: torch.Tensor | None
    route: str


def _orthonormalize(x: torch.Tensor) -> torch.Tensor:
    q, r = torch.linalg.qr(x)
    return q * torch.sign(torch.diagonal(r)).where(
        torch.diagonal(r) != 0, torch.ones(1, dtype=x.dtype, device=x.device)
    )


def svd_topk(w: torch.Tensor, k: int, *, vectors: bool = True, method: str = "auto") -> SVDResult:
    """All singular values and the top-k left/right singular vectors of a matrix, in float64.

    Args:
        w: (m, n) float tensor (any float dtype, CPU or CUDA); converted to float64.
        k: number of leading singular vectors (capped at min(m, n)); 0 for values only.
        vectors: False to skip the vectors (same as k=0).
        method: ``"auto"`` (plain SVD for min(m, n) <= 256, else the Gram route), ``"gram"`` or ``"svd"``.

    Returns:
        :class:`SVDResult` with ``S`` (min(m, n),), ``U`` (m, k), ``V`` (n, k) (None for k = 0); vectors follow
        the route's sign convention (compare subspaces, not individual vectors).

    Raises:
        ValueError: for a non-2-D input or an unknown method.
    """
    return svd_topk_many([(w, k if vectors else 0)], method=method)[0]


def svd_topk_many(items: Sequence[tuple[torch.Tensor, int]], *, method: str = "auto") -> list[SVDResult]:
    """:func:`svd_topk` for several matrices at once; their eigensolves run concurrently (see ``sym_eig_many``).

    Args:
        items: ``[(w (m, n) float tensor, k)]``. method: as in :func:`svd_topk`.

    Returns:
        One :class:`SVDResult` per item, in order.
    """
    if method not in ("auto", "gram", "svd"):
        raise ValueError(f"unknown spectral method {method!r}; use 'auto', 'gram' or 'svd'")
    results: list = [None] * len(items)
    pending = []  # (index, short-side matrix, wide?, k)
    for i, (w, k) in enumerate(items):
        if w.dim() != 2:
            raise ValueError(f"svd_topk expects a 2-D matrix, got shape {tuple(w.shape)}")
        w = w.to(torch.float64)
        r = min(w.shape)
        k = max(0, min(int(k), r))
        if method == "svd" or (method == "auto" and r <= SMALL_SVD_DIM) or r == 0:
            if k == 0:
                results[i] = SVDResult(torch.linalg.svdvals(w), None, None, "svd")
            else:
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                results[i] = SVDResult(s, u[:, :k], vh[:k].T, "svd")
            continue
        wide = w.shape[0] <= w.shape[1]
        pending.append((i, w if wide else w.T, wide, k))
    if not pending:
        return results
    solved = sym_eig_many([(gram(short), k) for _, short, _, k in pending])
    for (i, short, wide, k), ((vals, vecs), route) in zip(pending, solved, strict=True):
        s = vals.clamp_min(0).sqrt()
        if k == 0:
            results[i] = SVDResult(s, None, None, route)
            continue
        if route == "gram-lapack":
            vecs = _orthonormalize(vecs)  # MRRR vectors are orthogonal to ~n·eps; tidy them to ~eps
        s_k = s[:k]
        nz = int((s_k > 0).sum())
        long_vecs = short.T @ vecs[:, :nz] / s_k[:nz]
        if nz < k:  # rank-deficient: long-side vectors of zero singular values are arbitrary; complete them
            gen = torch.Generator().manual_seed(0)
            filler = torch.randn(short.shape[1], k - nz, dtype=short.dtype, generator=gen).to(short.device)
            long_vecs = torch.cat([long_vecs, filler], dim=1)
        long_vecs = _orthonormalize(long_vecs)
        u, v = (vecs, long_vecs) if wide else (long_vecs, vecs)
        results[i] = SVDResult(s, u, v, route)
    return results
