"""Parameter-space metrics of a weight update (pure functions on tensors).

Notation as in *On the Geometry of On-Policy Distillation* (sections 3.1 and 4, appendices C.3 and E): ``W0`` is the
source weight, ``W1`` (the paper's W₊) the tuned weight, ``ΔW = W1 − W0``, all of shape (out, in). Spectral metrics
are computed in float64 (see :mod:`sparse_opd_peft.diagnostics.spectral`). Functions that take weights reject
NaN / Inf with a ``ValueError``; metrics that are undefined for an input (e.g. an overlap with an empty update mask,
NSS of an all-zero W0) return ``nan``, which the reports write as ``null``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..module_types import MODULE_TYPES, module_type
from .spectral import svd_topk

ETA = 1e-3  # bf16 relative tolerance (eq. 1)
ABS_THRESHOLD = 1e-5  # coordinate-sparsity threshold on |ΔW|
F32_EPS = float(torch.finfo(torch.float32).eps)


# ------------------------------------------------------------------------------------------------ input checks
def check_finite(t: torch.Tensor, where: str = "tensor") -> None:
    """Raise ``ValueError`` naming ``where`` if ``t`` (any float tensor) contains NaN or Inf."""
    if t.dtype.is_floating_point and t.numel() and not math.isfinite(float(t.sum(dtype=torch.float64))):
        # one pass without temporaries: a float64 sum of finite float32/bf16 values cannot overflow
        n_bad = int((~torch.isfinite(t)).sum())
        raise ValueError(
            f"{where} contains {n_bad} non-finite value(s) (NaN/Inf); the checkpoint is corrupt or diverged - "
            "re-save it from a healthy run or exclude this module with --modules"
        )


def _pair(w0: torch.Tensor, w1: torch.Tensor, where: str) -> None:
    if w0.shape != w1.shape:
        raise ValueError(f"{where}: shapes differ ({tuple(w0.shape)} vs {tuple(w1.shape)}); compare matching weights")
    check_finite(w0, f"{where} (source)")
    check_finite(w1, f"{where} (tuned)")


# ------------------------------------------------------------------------------------------------ sparsity / norm
def bf16_visible_mask(w0: torch.Tensor, w1: torch.Tensor, eta: float = ETA) -> torch.Tensor:
    """bf16-visible update mask (eq. 1 / appendix C.3).

    Both weights are cast to bf16 and back to float32; an entry is *changed* iff
    ``|b1 − b0| > eta · max(|b0|, |b1|)``. For finite nonzero values this equals "the bf16 bit patterns differ";
    ``+0`` vs ``−0`` counts as unchanged.

    Args:
        w0, w1: float tensors of the same shape (any float dtype).
        eta: relative tolerance, 1e-3 in the paper.

    Returns:
        bool tensor of the input shape, True where the update is visible.
    """
    _pair(w0, w1, "bf16_visible_mask")
    if eta < 2.0**-9:
        # distinct finite bf16 values differ by more than 2^-9 of the larger magnitude, so for such eta the rule is
        # exactly "bit patterns differ, except +0 vs -0" - much cheaper on large matrices
        b0, b1 = w0.to(torch.bfloat16).view(torch.int16), w1.to(torch.bfloat16).view(torch.int16)
        return (b0 != b1) & (((b0 | b1) & 0x7FFF) != 0)
    b0 = w0.to(torch.bfloat16).float()
    b1 = w1.to(torch.bfloat16).float()
    return (b1 - b0).abs() > eta * torch.maximum(b0.abs(), b1.abs())


def bf16_sparsity(w0: torch.Tensor, w1: torch.Tensor, eta: float = ETA) -> float:
    """bf16-aware update sparsity (eq. 1): fraction of entries *unchanged* under :func:`bf16_visible_mask`."""
    mask = bf16_visible_mask(w0, w1, eta)
    return 1.0 - float(mask.sum()) / max(mask.numel(), 1)


def abs_changed_mask(w0: torch.Tensor, w1: torch.Tensor, threshold: float = ABS_THRESHOLD) -> torch.Tensor:
    """bool mask of entries with ``|ΔW| >= threshold``, ΔW computed in float32 (shape of the inputs)."""
    _pair(w0, w1, "abs_changed_mask")
    return (w1.float() - w0.float()).abs() >= threshold


def abs_sparsity(w0: torch.Tensor, w1: torch.Tensor, threshold: float = ABS_THRESHOLD) -> float:
    """Coordinate sparsity at an absolute threshold: fraction of entries with ``|ΔW| < threshold`` (float32 ΔW)."""
    mask = abs_changed_mask(w0, w1, threshold)
    return 1.0 - float(mask.sum()) / max(mask.numel(), 1)


def relative_norm(w0: torch.Tensor, w1: torch.Tensor) -> float:
    """``‖ΔW‖_F / ‖W0‖_F`` in float64 (``nan`` when W0 = 0 and ΔW ≠ 0, 0 when both are 0)."""
    _pair(w0, w1, "relative_norm")
    d = float(torch.linalg.vector_norm(w1.double() - w0.double()))
    n0 = float(torch.linalg.vector_norm(w0.double()))
    return d / n0 if n0 > 0 else (0.0 if d == 0 else math.nan)


# ------------------------------------------------------------------------------------------------ subspaces
def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles between the column spaces of two orthonormal bases (eq. 2).

    Uses cosines (``σ(aᵀb)``) for large angles and sines (``σ(b − a aᵀb)``) for small ones, so angles near zero are
    accurate to ~1e-15 rad instead of ~1e-8 (Björck & Golub).

    Args:
        a: (d, k) float with orthonormal columns. b: (d, k) float with orthonormal columns.

    Returns:
        (k,) float64 angles in radians, ascending.
    """
    if a.shape != b.shape:
        raise ValueError(f"principal_angles: bases differ in shape ({tuple(a.shape)} vs {tuple(b.shape)})")
    a, b = a.double(), b.double()
    m = a.T @ b
    cos = torch.linalg.svdvals(m).clamp(-1.0, 1.0)  # descending
    sin = torch.linalg.svdvals(b - a @ m).clamp(0.0, 1.0).flip(0)  # ascending, pairs with descending cos
    small = cos**2 >= 0.5
    return torch.where(small, torch.arcsin(sin), torch.arccos(cos))


def subspace_angles(
    w0: torch.Tensor, w1: torch.Tensor, k: int = 512, method: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal angles between the top-k left and right singular subspaces of W0 and W1.

    Args:
        w0, w1: (out, in) float tensors. k: subspace size, capped at min(out, in). method: see ``svd_topk``.

    Returns:
        ``(angles_U, angles_V)``: two (k,) float64 tensors in radians, ascending.
    """
    _pair(w0, w1, "subspace_angles")
    r0, r1 = svd_topk(w0, k, method=method), svd_topk(w1, k, method=method)
    return principal_angles(r0.U, r1.U), principal_angles(r0.V, r1.V)


def nss_from_values(s0: torch.Tensor, s1: torch.Tensor) -> float:
    """Normalised spectral shift (eq. 3) from descending singular values: ``‖σ1 − σ0‖₂ / ‖σ0‖₂`` (float64)."""
    if s0.shape != s1.shape:
        raise ValueError(f"nss: spectra differ in length ({s0.numel()} vs {s1.numel()})")
    den = float(torch.linalg.vector_norm(s0.double()))
    num = float(torch.linalg.vector_norm(s1.double() - s0.double()))
    return num / den if den > 0 else (0.0 if num == 0 else math.nan)


def normalized_spectral_shift(w0: torch.Tensor, w1: torch.Tensor, method: str = "svd") -> float:
    """NSS(W0, W1) = ‖σ(W1) − σ(W0)‖₂ / ‖σ(W0)‖₂ with all singular values in float64 (eq. 3)."""
    _pair(w0, w1, "normalized_spectral_shift")
    return nss_from_values(svd_topk(w0, 0, method=method).S, svd_topk(w1, 0, method=method).S)


# ------------------------------------------------------------------------------------------------ masks
def _kth_smallest_key(key: torch.Tensor, k: int) -> int:
    """k-th smallest (1-based) of non-negative int32 keys, by two 16-bit histogram passes (radix select)."""
    hist = torch.bincount(key >> 16, minlength=1 << 15).cumsum(0)
    hi = int(torch.searchsorted(hist, torch.tensor(k, dtype=hist.dtype)))  # first bin with cumulative count >= k
    below = int(hist[hi - 1]) if hi else 0
    lo = torch.bincount(key[(key >> 16) == hi] & 0xFFFF, minlength=1 << 16).cumsum(0)
    return (hi << 16) | int(torch.searchsorted(lo, torch.tensor(k - below, dtype=lo.dtype)))


def top_fraction_mask(scores: torch.Tensor, fraction: float, largest: bool = True) -> torch.Tensor:
    """Exactly ``round(fraction · numel)`` entries with the largest (or smallest) scores.

    Ties at the threshold are broken by flat index (lowest first), so the result is deterministic. Non-negative
    scores (magnitudes) use a radix select on float32 bit patterns, others ``torch.kthvalue``.

    Args:
        scores: finite float tensor of any shape. fraction: in [0, 1]. largest: False for the bottom fraction.

    Returns:
        bool tensor of ``scores``' shape.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    flat = scores.reshape(-1)
    n = flat.numel()
    count = int(round(fraction * n))
    if count in (0, n):
        return torch.full(scores.shape, count == n, dtype=torch.bool, device=scores.device)
    rank = n - count + 1 if largest else count  # 1-based rank, from below, of the threshold value
    if flat.dtype != torch.float64 and float(flat.min()) >= 0:
        x = flat.float().view(torch.int32)  # non-negative float32 bit patterns sort like the values
        t = torch.tensor(_kth_smallest_key(x, rank), dtype=torch.int32, device=x.device)
    else:
        x = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
        t = torch.kthvalue(x, rank).values
    out = x > t if largest else x < t
    need = count - int(out.sum())
    if need > 0:
        ties = (x == t).nonzero().squeeze(1)[:need]
        out[ties] = True
    return out.view(scores.shape)


def principal_mask(w0: torch.Tensor, rank: int = 64, alpha: float = 0.5, u: torch.Tensor | None = None) -> torch.Tensor:
    """Principal mask M_princ: top-``alpha`` entries of ``|rank-r SVD reconstruction of W0|`` (appendix C.3).

    Args:
        w0: (out, in) float tensor. rank: r (capped at min(out, in)). alpha: fraction of entries kept.
        u: optional precomputed (out, >= r) float64 top left singular vectors of W0 (saves an SVD).

    Returns:
        bool tensor (out, in).
    """
    check_finite(w0, "principal_mask W0")
    w = w0.double()
    r = min(rank, min(w.shape))
    if u is None:
        u = svd_topk(w, r).U
    u = u[:, :r].to(w)
    recon = u.float() @ (u.T @ w).float()  # U_r U_rᵀ W0 = U_r Σ_r V_rᵀ (float32 is plenty for a ranking)
    return top_fraction_mask(recon.abs(), alpha, largest=True)


def low_magnitude_mask(w0: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Low-magnitude mask M_low: bottom-``alpha`` entries by ``|W0|`` (bool, shape of ``w0``)."""
    check_finite(w0, "low_magnitude_mask W0")
    return top_fraction_mask(w0.float().abs(), alpha, largest=False)


# ------------------------------------------------------------------------------------------------ update spectrum
def stable_rank(s: torch.Tensor) -> float:
    """Stable rank ``‖ΔW‖_F² / ‖ΔW‖₂²`` (eq. 31) from descending singular values (0 for ΔW = 0)."""
    s = s.double()
    return float((s**2).sum() / s[0] ** 2) if s.numel() and float(s[0]) > 0 else 0.0


def top_energy_share(s: torch.Tensor, k: int = 16) -> float:
    """Share of ``‖ΔW‖_F²`` carried by the top-k singular values: ``Σ_{i≤k} σᵢ² / Σ σᵢ²`` (``nan`` for ΔW = 0)."""
    e = s.double() ** 2
    total = float(e.sum())
    return float(e[:k].sum()) / total if total > 0 else math.nan


def numerical_rank(s: torch.Tensor, shape: tuple[int, int], rtol: float | None = None) -> int:
    """Number of singular values above ``rtol · σ₁``.

    The default ``rtol = max(out, in) · eps(float32)`` is ``torch.linalg.matrix_rank``'s default for a float32
    matrix: checkpoint deltas carry float32/bf16 rounding, so smaller singular values are storage noise.
    """
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    rtol = max(shape) * F32_EPS if rtol is None else rtol
    return int((s > rtol * s[0]).sum())


def hill_alpha(s: torch.Tensor, k: int = 64) -> float:
    """Hill tail estimate (eq. 33) on the top-k singular values of ΔW.

    ``α̂ = [ 1/(k−1) Σ_{i<k} log(σᵢ / σ_k) ]⁻¹`` with σ the *singular values* (not eigenvalues of ΔWᵀΔW). This is the
    tail index of the singular-value distribution, P(σ > x) ∝ x^(−α̂); the eigenvalue (σ²) tail index is α̂/2 and the
    WeightWatcher-style ESD density exponent is 1 + α̂/2. ``k`` is capped at the number of nonzero singular values
    given (:func:`update_spectrum` passes only the numerically nonzero ones, see :func:`numerical_rank`); returns
    ``nan`` when fewer than 2 remain and ``inf`` for a flat top spectrum.
    """
    s = s.double()
    k = min(k, int((s > 0).sum()))
    if k < 2:
        return math.nan
    logs = torch.log(s[: k - 1] / s[k - 1])
    mean = float(logs.mean())
    return 1.0 / mean if mean > 0 else math.inf


def update_spectrum(
    s: torch.Tensor, shape: tuple[int, int], top: int = 16, hill_k: int = 64, rtol: float | None = None
) -> dict[str, float]:
    """All update-spectrum metrics from the descending singular values of ΔW (shape (out, in)).

    Returns:
        ``{"stable_rank", "top16_energy_share" (key uses ``top``), "numerical_rank", "numerical_rank_ratio",
        "hill_alpha", "spectral_norm"}``.
    """
    rank = numerical_rank(s, shape, rtol)
    return {
        "stable_rank": stable_rank(s),
        f"top{top}_energy_share": top_energy_share(s, top),
        "numerical_rank": rank,
        "numerical_rank_ratio": rank / max(min(shape), 1),
        "hill_alpha": hill_alpha(s[:rank], hill_k),
        "spectral_norm": float(s[0]) if s.numel() else 0.0,
    }


def sim_k(v_a: torch.Tensor, v_b: torch.Tensor, k: int = 16) -> float:
    """Subspace similarity ``Sim_K = ‖V_K(a)ᵀ V_K(b)‖_F² / K`` (eq. 9).

    Args:
        v_a, v_b: (in, >= K) float, orthonormal top right singular vectors of ΔW_a and ΔW_b (columns beyond K are
            ignored; when fewer than K exist, K is the smaller count).
    """
    k = min(k, v_a.shape[1], v_b.shape[1])
    if k == 0:
        return math.nan
    return float(torch.linalg.matrix_norm(v_a[:, :k].double().T @ v_b[:, :k].double()) ** 2) / k


def energy_shares(energies: Mapping[str, float], overrides: Mapping[str, str] | None = None) -> dict[str, float]:
    """FFN / attention / other shares of ``Σ ‖ΔW‖_F²``.

    Args:
        energies: ``{module or parameter name: ‖ΔW‖_F²}``. overrides: module-type rules, see ``module_type``.

    Returns:
        ``{"ffn": share, "attention": share, "other": share}`` (``nan`` each when the total is 0).
    """
    totals = dict.fromkeys(MODULE_TYPES, 0.0)
    for name, e in energies.items():
        totals[module_type(name, overrides)] += float(e)
    total = sum(totals.values())
    return {t: (v / total if total > 0 else math.nan) for t, v in totals.items()}
