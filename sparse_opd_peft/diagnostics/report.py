"""Reports of diagnostics results: ``report.json``, a markdown summary and PNG plots (matplotlib, Agg backend).

Pair reports (:func:`write_report`): ``report.json`` (``summary``, ``by_type``, ``by_layer``, ``matrices``,
``angle_profile``, ``config``), ``report.md`` (a Table-1-style line per pair plus per-type / per-layer tables) and
``sparsity_by_layer.png``, ``principal_angles.png``, ``mask_overlap.png``, ``energy_by_type.png``.
Trajectory reports (:func:`write_trajectory_report`): ``trajectory.json``, ``trajectory.md``, ``trajectory.png``.
Files are written atomically; existing files are only replaced with ``overwrite=True``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

from ..atomic import write_bytes_atomic
from ..module_types import MODULE_TYPES
from . import catalog
from .catalog import metrics

PAIR_FILES = ("report.json", "report.md", "sparsity_by_layer.png", "principal_angles.png", "mask_overlap.png",
              "energy_by_type.png")  # fmt: skip
TRAJECTORY_FILES = ("trajectory.json", "trajectory.md", "trajectory.png")
_COLORS = {"ffn": "tab:orange", "attention": "tab:blue", "other": "tab:gray"}


def sanitize(obj):
    """Recursively replace NaN / Inf floats by None (strict JSON) and tuples by lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    return obj


def check_outputs(out_dir: str | os.PathLike, files: Sequence[str], overwrite: bool) -> Path:
    """Raise ``FileExistsError`` naming the first of ``files`` that already exists in ``out_dir`` (unless overwrite)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; pass another --out")
    if not overwrite:
        for f in files:
            if (out / f).exists():
                raise FileExistsError(
                    f"{out / f} already exists; pass --overwrite to replace it or choose another --out"
                )
    return out


def _fmt(x, pct: bool = False, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if pct:
        return f"{100 * x:.1f}%"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}g}"


def _cells(values: dict, place: str) -> list[str]:
    """The formatted values of the catalog's metrics shown at ``place`` (``"–"`` where one is missing)."""
    return [_fmt(values.get(m.key), m.pct) for m in metrics(place)]


def _labels(place: str) -> list[str]:
    return [m.label for m in metrics(place)]


def table1_line(result: dict) -> str:
    """One markdown table row (Table-1 style) for a pair result dict (``DiagnosticsResult.to_dict()``)."""
    names = [Path(str(result[k])).name or result[k] for k in ("source", "tuned")]
    return "| " + " | ".join(names + _cells(result["summary"], "table1")) + " |"


def table1_header() -> str:
    """The header (and rule) of the Table-1 markdown table that :func:`table1_line` rows fill."""
    return "| " + " | ".join(["Base", "Tuned", *_labels("table1")]) + " |\n|" + "---|" * (2 + len(metrics("table1")))


def markdown_summary(result: dict) -> str:
    """Markdown report of a pair result dict: Table-1 line, per type, per layer, definitions."""
    s, cfg = result["summary"], result["config"]
    lines = ["# Parameter-space diagnostics", "", f"Source `{result['source']}` → tuned `{result['tuned']}`: "
             f"{s['n_matrices']} matrices, {s['n_params']:,} parameters, {result['seconds']:.1f} s.", "",
             table1_header(), table1_line(result), "",
             f"Random baseline of both overlaps: α = {cfg['alpha']}. Angles: top-k singular subspaces, k = {cfg['top_k']} "
             "capped by min(out, in) (left and right, mean over the angle vector, then over matrices).", "", "## By module type", "",
             "| " + " | ".join(["type", "matrices", "params", *_labels("by_type")]) + " |",
             "|" + "---|" * (3 + len(metrics("by_type")))]  # fmt: skip
    for t, r in result["by_type"].items():
        lines.append("| " + " | ".join([t, str(r["n_matrices"]), f"{r['n_params']:,}", *_cells(r, "by_type")]) + " |")
    # the by-layer table follows sparsity_bf16 with its split by module type
    split_after = [m.key == "bf16_sparsity" for m in metrics("by_layer")]

    def columns(values: list[str], split: list[str]) -> list[str]:
        return [c for v, s in zip(values, split_after, strict=True) for c in [v, *(split if s else [])]]

    header = columns(_labels("by_layer"), [f"{t} sparsity" for t in MODULE_TYPES])
    lines += ["", "## By layer", "", "| " + " | ".join(["layer", *header]) + " |", "|" + "---|" * (1 + len(header))]
    for layer, r in result["by_layer"].items():
        per_type = [_fmt(r["bf16_sparsity_by_type"].get(t), True) for t in MODULE_TYPES]
        lines.append("| " + " | ".join([layer, *columns(_cells(r, "by_layer"), per_type)]) + " |")
    lines += ["", "## Definitions", "",
              f"- sparsity_bf16: share of entries with |bf16(W₊) − bf16(W0)| ≤ η·max(|·|,|·|), η = {cfg['eta']}, "
              "parameter-weighted; sparsity abs: share with |ΔW| < " f"{cfg['abs_threshold']} (float32 ΔW).",
              "- every other column: computed per matrix, then averaged over matrices (float64 spectra).",
              f"- principal overlap: |M_princ ∩ M|/|M|, M_princ = top-α of |rank-{cfg['principal_rank']} "
              "reconstruction of W0|; low-mag overlap: same with the bottom-α |W0| mask.",
              "- NSS = ‖σ(W₊) − σ(W0)‖₂/‖σ(W0)‖₂; stable rank = ‖ΔW‖_F²/‖ΔW‖₂²; top-16 energy = share of ‖ΔW‖_F² in "
              f"the top 16 singular values; Hill α̂ (eq. 33, top-{cfg['hill_k']} singular values of ΔW): "
              f"{_fmt(s['hill_alpha'])}; numerical rank / min(out, in): {_fmt(s['numerical_rank_ratio'], True)}.",
              ""]  # fmt: skip
    return "\n".join(lines)


def _plt():
    try:
        import matplotlib
    except ImportError as err:  # an optional extra: the JSON / markdown reports do not need it
        raise ImportError(
            "the diagnostics plots need matplotlib: pip install 'sparse_opd_peft[plots]' (or matplotlib)"
        ) from err

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _plot_sparsity(result: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    layers = sorted(result["by_layer"], key=int)
    xs = [int(x) for x in layers]
    for t in MODULE_TYPES:
        ys = [result["by_layer"][layer]["bf16_sparsity_by_type"].get(t) for layer in layers]
        if any(y is not None for y in ys):
            ax.plot(xs, [math.nan if y is None else 100 * y for y in ys], "o-", color=_COLORS[t], label=t)
    ax.plot(xs, [100 * result["by_layer"][la]["bf16_sparsity"] for la in layers], "k--", lw=1, label="all")
    ax.set(xlabel="layer", ylabel="bf16 update sparsity (%)", title="Unchanged weights per layer and module type")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_angles(result: dict, path: Path) -> None:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    prof = result.get("angle_profile") or {}
    for key, label, style in (("u_deg", "left (U)", "-"), ("v_deg", "right (V)", "--")):
        if prof.get(key):
            a1.plot(range(1, len(prof[key]) + 1), prof[key], style, label=label)
    a1.set(xlabel="rank index k", ylabel="principal angle (°)", title="Mean principal angle by index (all matrices)")
    a1.grid(alpha=0.3)
    a1.legend()
    rows = [r for r in result["matrices"] if r.get("principal_angle_u_deg") is not None]
    for t in MODULE_TYPES:
        idx = [i for i, r in enumerate(rows) if r["type"] == t]
        if idx:
            a2.scatter(idx, [rows[i]["principal_angle_u_deg"] for i in idx], s=14, color=_COLORS[t], label=f"{t} U")
            a2.scatter(idx, [rows[i]["principal_angle_v_deg"] for i in idx], s=14, color=_COLORS[t], marker="x",
                       label=f"{t} V")  # fmt: skip
    a2.set(xlabel="matrix (layer order)", ylabel="mean angle (°)", title="All analysed matrices")
    a2.grid(alpha=0.3)
    if rows:
        a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_overlap(result: dict, path: Path) -> None:
    plt = _plt()
    groups = ["all"] + list(result["by_type"])
    data = [result["summary"]] + [result["by_type"][t] for t in result["by_type"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for j, (key, label, color) in enumerate((("principal_overlap", "principal mask", "tab:red"),
                                             ("low_magnitude_overlap", "low-magnitude mask", "tab:green"))):  # fmt: skip
        vals = [100 * d[key] if d.get(key) is not None else 0.0 for d in data]
        bars = ax.bar([i + (j - 0.5) * width for i in range(len(groups))], vals, width, color=color, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    alpha = 100 * result["config"]["alpha"]
    ax.axhline(alpha, color="k", ls="--", lw=1, label=f"random baseline ({alpha:.0f}%)")
    ax.set_xticks(range(len(groups)), groups)
    ax.set(ylabel="overlap with visible updates (%)", title="Where visible updates land", ylim=(0, 110))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_energy(result: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    shares = [result["summary"].get(f"{t}_energy_share") or 0.0 for t in MODULE_TYPES]
    bars = ax.bar(MODULE_TYPES, [100 * s for s in shares], color=[_COLORS[t] for t in MODULE_TYPES])
    ax.bar_label(bars, fmt="%.1f%%", fontsize=8)
    ax.set(ylabel="share of Σ‖ΔW‖²_F (%)", title="Update energy by module type", ylim=(0, 105))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result, out_dir: str | os.PathLike, *, overwrite: bool = False, plots: bool = True) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and (``plots=True``) the PNGs for a ``DiagnosticsResult`` (or its dict).

    Returns:
        ``{file name: path}`` of the written files. Raises ``FileExistsError`` before writing anything when a
        target exists and ``overwrite`` is False.
    """
    data = sanitize(result.to_dict() if hasattr(result, "to_dict") else result)
    out = check_outputs(out_dir, PAIR_FILES if plots else PAIR_FILES[:2], overwrite)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    write_bytes_atomic(out / "report.json", json.dumps(data, indent=1, allow_nan=False).encode())
    write_bytes_atomic(out / "report.md", markdown_summary(data).encode())
    written.update({"report.json": out / "report.json", "report.md": out / "report.md"})
    if plots:
        for name, fn in (("sparsity_by_layer.png", _plot_sparsity), ("principal_angles.png", _plot_angles),
                         ("mask_overlap.png", _plot_overlap), ("energy_by_type.png", _plot_energy)):  # fmt: skip
            fn(data, out / name)
            written[name] = out / name
    return written


def trajectory_markdown(result: dict) -> str:
    """Markdown table of a trajectory result dict: one row per checkpoint."""
    lines = ["# Update trajectory", "", f"Source `{result['source']}`, {len(result['checkpoints'])} checkpoints, "
             f"Sim_K with K = {result['config']['k']}, Hill on the top-{result['config']['hill_k']} singular values.",
             "", "| " + " | ".join(["#", "checkpoint", *(m.label for m in catalog.TRAJECTORY_METRICS)]) + " |",
             "|" + "---|" * (2 + len(catalog.TRAJECTORY_METRICS))]  # fmt: skip
    for s in result["steps"]:
        values = [_fmt(s.get(m.key), m.pct) for m in catalog.TRAJECTORY_METRICS]
        cells = [str(s["checkpoint"]), str(s["label"]), *values]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def _plot_trajectory(result: dict, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    steps = result["steps"]
    numeric = all(re.fullmatch(r"-?\d+(\.\d+)?", str(s["label"])) for s in steps)
    xs = [float(s["label"]) for s in steps] if numeric else list(range(len(steps)))
    for ax, key, title in zip(axes.flat, ("stable_rank", "fro_norm", "hill_alpha", "sim_k"),
                              ("Stable rank of ΔW_t", "‖ΔW_t‖_F", "Hill α̂ of ΔW_t",
                               f"Sim_{result['config']['k']}(t, end)"), strict=True):  # fmt: skip
        ax.plot(xs, [math.nan if s[key] is None else s[key] for s in steps], "o-")
        ax.set_title(title)
        if numeric:
            ax.set_xlabel("optimizer step")
        else:  # short names, not full paths
            ax.set_xticks(xs, [Path(str(s["label"])).name for s in steps], rotation=30, ha="right", fontsize=8)
        ax.grid(alpha=0.3)
    axes[1, 1].set_ylim(0, 1.05)
    fig.suptitle("Trajectory (mean over matrices)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_trajectory_report(result, out_dir: str | os.PathLike, *, overwrite: bool = False) -> dict[str, Path]:
    """Write ``trajectory.json``, ``trajectory.md`` and ``trajectory.png`` for a ``TrajectoryResult`` (or dict)."""
    data = sanitize(result.to_dict() if hasattr(result, "to_dict") else result)
    out = check_outputs(out_dir, TRAJECTORY_FILES, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out / "trajectory.json", json.dumps(data, indent=1, allow_nan=False).encode())
    write_bytes_atomic(out / "trajectory.md", trajectory_markdown(data).encode())
    _plot_trajectory(data, out / "trajectory.png")
    return {f: out / f for f in TRAJECTORY_FILES}
