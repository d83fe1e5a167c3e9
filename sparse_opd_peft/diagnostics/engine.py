"""Streaming diagnostics engine: per-matrix metrics over a checkpoint pair (or a trajectory), then aggregation.

Tensor pairs are read one at a time from :mod:`~sparse_opd_peft.diagnostics.sources` (peak memory: a few copies of
the largest matrix). Aggregation follows the paper (appendix C.3): bf16 and absolute-threshold sparsity are
parameter-count weighted over all analysed weights; every other metric is computed per matrix and averaged over
matrices (unweighted), overall, per module type and per layer. Energy shares are shares of ``Σ ‖ΔW‖_F²``.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..module_types import MODULE_TYPES, layer_index, module_type
from . import catalog
from . import metrics as M
from .catalog import MatrixView, computed
from .sources import module_name, open_source, paired_weights
from .spectral import gram_sigma_error, svd_topk, svd_topk_many

NSS_RTOL = 1e-10  # the Gram route falls back to svdvals when its error bound exceeds this share of the NSS numerator


@dataclass
class DiagnoseConfig:
    """Metric parameters (paper defaults). ``spectral=False`` skips every SVD-based metric (fast pass)."""

    top_k: int = 512  # principal-angle subspace size (capped by the matrix)
    principal_rank: int = 64  # rank of the W0 reconstruction for the principal mask
    alpha: float = 0.5  # fraction of entries in the principal / low-magnitude masks (= random baseline)
    eta: float = M.ETA  # bf16 relative tolerance
    abs_threshold: float = M.ABS_THRESHOLD  # |ΔW| threshold of the absolute coordinate sparsity
    hill_k: int = 64  # top singular values used by the Hill estimate
    rank_rtol: float | None = None  # numerical-rank tolerance (None: max(out, in) · eps(float32))
    spectral: bool = True
    method: str = "auto"  # "auto" | "gram" | "svd", see spectral.svd_topk
    device: str = "auto"  # "cpu" | "cuda" | "auto" (CUDA when present)
    type_overrides: dict[str, str] | None = None  # {regex: ffn|attention|other}, tried before the defaults

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.top_k < 1 or self.principal_rank < 1 or self.hill_k < 2:
            raise ValueError("top_k and principal_rank must be >= 1 and hill_k >= 2")
        if self.eta <= 0 or self.abs_threshold <= 0:
            raise ValueError("eta and abs_threshold must be positive")


def resolve_device(device: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` (must be available) or ``"auto"`` (CUDA when present) -> ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"--device {device!r}: use 'cpu', 'cuda' or 'auto'")
    return torch.device(device)


def _deg(x: torch.Tensor) -> float:
    return float(torch.rad2deg(x).mean()) if x.numel() else math.nan


def analyze_matrix(
    w0: torch.Tensor, w1: torch.Tensor, name: str = "weight", config: DiagnoseConfig | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """All per-matrix metrics of one weight pair.

    Args:
        w0: (out, in) source weight, any float dtype. w1: (out, in) tuned weight. name: parameter or module name
            (module type / layer come from it). config: metric parameters.

    Returns:
        ``(row, extras)``: ``row`` is a JSON-able dict of scalars (keys as in ``report.json``'s ``matrices``),
        ``extras`` holds ``angles_u`` / ``angles_v`` ((k,) float64 radians) when spectral metrics ran.
    """
    cfg = config or DiagnoseConfig()
    t0 = time.perf_counter()
    M._pair(w0, w1, name)
    dev = resolve_device(cfg.device)
    w0, w1 = w0.to(dev), w1.to(dev)
    numel = w0.numel()
    row: dict = {"name": module_name(name), "type": module_type(name, cfg.type_overrides), "layer": layer_index(name)}
    row.update(shape=list(w0.shape), numel=numel)
    visible = M.bf16_visible_mask(w0, w1, cfg.eta)
    n_vis = int(visible.sum())
    w0d, w1d = w0.double(), w1.double()
    dd = w1d - w0d
    # float32 ΔW as in the definition: rounding the (exact or nearly exact) float64 difference gives the same value
    n_abs = int((dd.abs().float() >= cfg.abs_threshold).sum())
    delta_fro, w0_fro = float(torch.linalg.vector_norm(dd)), float(torch.linalg.vector_norm(w0d))
    row.update(
        bf16_changed=n_vis, bf16_sparsity=1 - n_vis / numel, update_density=n_vis / numel,
        abs_changed=n_abs, abs_sparsity=1 - n_abs / numel, delta_fro=delta_fro, w0_fro=w0_fro,
        relative_norm=delta_fro / w0_fro if w0_fro > 0 else (0.0 if delta_fro == 0 else math.nan),
    )  # fmt: skip
    extras: dict[str, torch.Tensor] = {}
    sigma = None  # singular values of ΔW, for the catalog's own metrics
    low = M.low_magnitude_mask(w0, cfg.alpha) if n_vis else None
    # share of the visible coordinates in the mask: mask_overlap(mask, visible)["share_of_b"], counted directly
    row["low_magnitude_overlap"] = int((low & visible).sum()) / n_vis if n_vis else math.nan
    row["principal_overlap"] = math.nan
    if cfg.spectral:
        k = min(cfg.top_k, min(w0.shape))
        if delta_fro == 0:  # identical matrices: every spectral comparison is exactly zero
            zeros, sigma = torch.zeros(k, dtype=torch.float64), dd.new_zeros(0)
            extras.update(angles_u=zeros, angles_v=zeros)
            row.update(nss=0.0, route="identical", **M.update_spectrum(sigma, tuple(w0.shape), 16, cfg.hill_k))
        else:
            k0 = max(k, min(cfg.principal_rank, min(w0.shape)))
            r0, r1, rd = svd_topk_many([(w0d, k0), (w1d, k), (dd, 0)], method=cfg.method)
            row["route"], s0, s1 = r0.route, r0.S, r1.S
            if r0.route != "svd":  # Gram route: make sure NSS is exact to float64 tolerance, else use svdvals
                err = torch.linalg.vector_norm(torch.cat([gram_sigma_error(s0, min(w0.shape)),
                                                          gram_sigma_error(s1, min(w0.shape))]))  # fmt: skip
                if not float(err) <= NSS_RTOL * float(torch.linalg.vector_norm(s1 - s0)):
                    s0, s1 = torch.linalg.svdvals(w0d), torch.linalg.svdvals(w1d)
                    row["route"] += "+svdvals"
            row["nss"] = M.nss_from_values(s0, s1)
            extras.update(
                angles_u=M.principal_angles(r0.U[:, :k], r1.U).cpu(),
                angles_v=M.principal_angles(r0.V[:, :k], r1.V).cpu(),
            )
            if n_vis:
                princ = M.principal_mask(w0d, cfg.principal_rank, cfg.alpha, u=r0.U)
                row["principal_overlap"] = int((princ & visible).sum()) / n_vis
                del princ
            del r0, r1, w0d, w1d
            sigma = rd.S
            row.update(M.update_spectrum(sigma, tuple(w0.shape), 16, cfg.hill_k, cfg.rank_rtol))
        au, av = _deg(extras["angles_u"]), _deg(extras["angles_v"])
        row.update(
            angle_k=k, principal_angle_u_deg=au, principal_angle_v_deg=av, principal_angle_deg=(au + av) / 2,
            principal_angle_u_max_deg=float(torch.rad2deg(extras["angles_u"]).max()),
            principal_angle_v_max_deg=float(torch.rad2deg(extras["angles_v"]).max()),
        )  # fmt: skip
    row.update(computed(MatrixView(module_name(name), w0, w1, dd, visible, sigma, cfg)))
    row["seconds"] = time.perf_counter() - t0
    return row, extras


def _mean(rows: Sequence[Mapping], key: str) -> float | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return sum(vals) / len(vals) if vals else None


def aggregate(rows: Sequence[Mapping]) -> dict:
    """Aggregate per-matrix rows: parameter-weighted sparsities, per-matrix means of everything else."""
    numel = sum(r["numel"] for r in rows)
    energy = sum(r["delta_fro"] ** 2 for r in rows)
    w0_energy = sum(r["w0_fro"] ** 2 for r in rows)
    out = {
        "n_matrices": len(rows),
        "n_params": numel,
        "bf16_sparsity": 1 - sum(r["bf16_changed"] for r in rows) / numel if numel else None,
        "abs_sparsity": 1 - sum(r["abs_changed"] for r in rows) / numel if numel else None,
        "update_density": sum(r["bf16_changed"] for r in rows) / numel if numel else None,
        "global_relative_norm": math.sqrt(energy / w0_energy) if w0_energy > 0 else None,
        "delta_energy": energy,
    }
    out.update({key: _mean(rows, key) for key in catalog.mean_keys()})
    return out


@dataclass
class DiagnosticsResult:
    """Output of :func:`diagnose`; ``to_dict()`` is what ``report.json`` holds."""

    source: str
    tuned: str
    config: dict
    summary: dict
    by_type: dict
    by_layer: dict
    matrices: list[dict]
    angle_profile: dict = field(default_factory=dict)  # {"u_deg": [...], "v_deg": [...]} mean over matrices
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(rows: Sequence[dict], alpha: float, overrides: Mapping[str, str] | None = None) -> tuple[dict, ...]:
    """``(summary, by_type, by_layer)`` from per-matrix rows (see module docstring for the rules)."""
    shares = M.energy_shares({r["name"]: r["delta_fro"] ** 2 for r in rows}, overrides)
    summary = aggregate(rows)
    summary.update({f"{t}_energy_share": (None if math.isnan(v) else v) for t, v in shares.items()})
    summary["random_baseline"] = alpha
    by_type = {}
    for t in MODULE_TYPES:
        sub = [r for r in rows if r["type"] == t]
        if sub:
            by_type[t] = aggregate(sub) | {"energy_share": summary[f"{t}_energy_share"]}
    by_layer = {}
    for layer in sorted({r["layer"] for r in rows if r["layer"] is not None}):
        sub = [r for r in rows if r["layer"] == layer]
        entry = aggregate(sub)
        entry["bf16_sparsity_by_type"] = {t: aggregate([r for r in sub if r["type"] == t])["bf16_sparsity"]
                                          for t in MODULE_TYPES if any(r["type"] == t for r in sub)}  # fmt: skip
        by_layer[str(layer)] = entry
    return summary, by_type, by_layer


def _profile(vectors: list[torch.Tensor]) -> list[float]:
    """Mean angle (degrees) at each index shared by all matrices (k differs when matrices are small)."""
    if not vectors:
        return []
    width = min(v.numel() for v in vectors)
    return torch.rad2deg(torch.stack([v[:width].double() for v in vectors])).mean(0).tolist()


def diagnose(
    source,
    tuned,
    *,
    modules: str | Iterable[str] | None = None,
    device: str = "auto",
    progress: bool = True,
    config: DiagnoseConfig | None = None,
    **overrides,
) -> DiagnosticsResult:
    """Parameter-space diagnostics of a checkpoint pair.

    Args:
        source: W0 - a model directory (safetensors, sharded or not), a ``.safetensors`` file, a Hub id or an
            in-memory ``nn.Module``. tuned: W₊, same kinds. modules: None (all block Linear weights), a regex or a
            list of module names. device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when present) for the float64
            linear algebra.
        progress: show a progress bar. config / overrides: :class:`DiagnoseConfig` or its fields as keywords
            (``top_k=512, principal_rank=64, alpha=0.5, spectral=True, ...``).

    Returns:
        :class:`DiagnosticsResult` (``summary``, ``by_type``, ``by_layer``, ``matrices``, ``angle_profile``).

    Raises:
        ValueError / FileNotFoundError: missing files, mismatched architectures or shapes, non-finite weights.
    """
    if config is not None and overrides:
        raise ValueError(f"pass either config= or metric keywords ({', '.join(overrides)}), not both")
    cfg = config or DiagnoseConfig(device=device, **overrides)
    resolve_device(cfg.device)
    t0 = time.perf_counter()
    src, tun = open_source(source), open_source(tuned)
    with src, tun:
        names = paired_weights(src, tun, modules)
        rows, angles_u, angles_v = [], [], []
        for name in tqdm(names, desc="diagnose", unit="matrix", disable=not progress, dynamic_ncols=True):
            w0, w1 = src.get(name), tun.get(name)
            M.check_finite(w0, f"{src.location(name)}: tensor '{name}'")
            M.check_finite(w1, f"{tun.location(name)}: tensor '{name}'")
            row, extras = analyze_matrix(w0, w1, name, cfg)
            del w0, w1
            rows.append(row)
            if "angles_u" in extras:
                angles_u.append(extras["angles_u"])
                angles_v.append(extras["angles_v"])
    summary, by_type, by_layer = summarize(rows, cfg.alpha, cfg.type_overrides)
    return DiagnosticsResult(
        source=src.label, tuned=tun.label, config=asdict(cfg), summary=summary, by_type=by_type, by_layer=by_layer,
        matrices=rows, angle_profile={"u_deg": _profile(angles_u), "v_deg": _profile(angles_v)},
        seconds=time.perf_counter() - t0,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ trajectories
@dataclass
class TrajectoryResult:
    """Output of :func:`trajectory`: per-checkpoint means (``steps``) and per (matrix, checkpoint) rows."""

    source: str
    checkpoints: list[str]
    config: dict
    steps: list[dict]
    matrices: list[dict]
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _trajectory_rows(src, tuned: list, name: str, labels: Sequence[str], k: int, hill_k: int, dev, method: str):
    """One row per checkpoint of weight ``name``: the :data:`~.catalog.TRAJECTORY_METRICS` of ``ΔW_t`` (float64,
    top-``k`` singular values / right vectors), ``sim_k`` against the last checkpoint's right subspace."""
    w0 = src.get(name)
    M.check_finite(w0, f"{src.location(name)}: tensor '{name}'")
    w0 = w0.to(dev, torch.float64)
    bases, rows = [], []
    for i, t in enumerate(tuned):
        wt = t.get(name)
        M.check_finite(wt, f"{t.location(name)}: tensor '{name}'")
        dd = wt.to(dev, torch.float64) - w0
        fro = float(torch.linalg.vector_norm(dd))
        r = svd_topk(dd, k, method=method) if fro > 0 else None
        s = r.S if r is not None else dd.new_zeros(0)
        row = {"name": module_name(name), "type": module_type(name), "layer": layer_index(name), "checkpoint": i,
               "label": str(labels[i]), "fro_norm": fro}  # fmt: skip
        row.update({m.key: m.compute(s, tuple(dd.shape), hill_k) for m in catalog.TRAJECTORY_METRICS if m.compute})
        rows.append(row)
        bases.append(r.V.cpu() if r is not None else None)
    for row, basis in zip(rows, bases, strict=True):
        ok = basis is not None and bases[-1] is not None
        row["sim_k"] = M.sim_k(basis, bases[-1], k) if ok else math.nan
    return rows


def trajectory(
    source,
    checkpoints: Sequence,
    *,
    labels: Sequence[str] | None = None,
    modules: str | Iterable[str] | None = None,
    k: int = 16,
    hill_k: int = 64,
    device: str = "auto",
    method: str = "auto",
    progress: bool = True,
) -> TrajectoryResult:
    """Trajectory diagnostics of cumulative updates ``ΔW_t = W_t − W0`` (paper section 4, appendix E).

    Per matrix and checkpoint: stable rank, ``‖ΔW_t‖_F``, Hill estimate (top ``hill_k`` singular values) and
    ``Sim_K(t, end)`` between the top-K right singular subspaces of ΔW_t and of the *last* checkpoint's ΔW.
    Modules are streamed one at a time (W0 once, then each W_t).

    Args:
        source: W0 (any source kind, see :func:`diagnose`). checkpoints: ordered W_t sources, the last is "end".
        labels: names for the checkpoints (default: the step number in names like ``step_250.safetensors``, else
            their paths). k: K of Sim_K. device / method: linear algebra.

    Returns:
        :class:`TrajectoryResult`; ``steps[i]`` holds matrix means of ``stable_rank``, ``fro_norm``,
        ``hill_alpha`` and ``sim_k`` for checkpoint i.
    """
    if len(checkpoints) < 1:
        raise ValueError("trajectory needs at least one checkpoint after the source")
    dev = resolve_device(device)
    t0 = time.perf_counter()
    src = open_source(source)
    tuned = [open_source(c) for c in checkpoints]
    if labels is None:  # a step number where the checkpoint names one (".../step_250.safetensors"), else its path
        found = [re.search(r"step[_-]?(\d+)", Path(str(t.label)).name) for t in tuned]
        labels = [m.group(1) for m in found] if all(found) else [t.label for t in tuned]
    labels = list(labels)
    if len(labels) != len(tuned):
        raise ValueError(f"{len(labels)} labels for {len(tuned)} checkpoints; pass one label per checkpoint")
    rows: list[dict] = []
    try:
        names = paired_weights(src, tuned[0], modules)
        for t in tuned[1:]:
            paired_weights(src, t, names)
        for name in tqdm(names, desc="trajectory", unit="matrix", disable=not progress, dynamic_ncols=True):
            rows.extend(_trajectory_rows(src, tuned, name, labels, k, hill_k, dev, method))
    finally:
        src.close()
        for t in tuned:
            t.close()
    steps = []
    for i, label in enumerate(labels):
        sub = [r for r in rows if r["checkpoint"] == i]
        means = {m.key: _mean(sub, m.key) for m in catalog.TRAJECTORY_METRICS}
        steps.append({"checkpoint": i, "label": str(label), **means})
    config = {"k": k, "hill_k": hill_k, "device": str(dev), "method": method, "modules": modules}
    return TrajectoryResult(
        source=src.label, checkpoints=[t.label for t in tuned], config=config, steps=steps, matrices=rows,
        seconds=time.perf_counter() - t0,
    )  # fmt: skip
