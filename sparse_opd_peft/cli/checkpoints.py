"""``sparse-opd diagnose | trajectory | mask | subspace``: compare checkpoints and extract masks / subspaces."""

from __future__ import annotations

from pathlib import Path

import typer

from .errors import cli_errors
from .options import (
    MODULES_HELP,
    RULE_HELP,
    SOURCE_HELP,
    Command,
    Device,
    Rule,
    check_file_target,
    flag,
    modules_regex,
    quiet_flag,
    type_overrides,
)

DIAGNOSE_EPILOG = (
    "Example: sparse-opd diagnose Qwen/Qwen3-1.7B ./opd-run/final --out diag/ (writes report.json, report.md, "
    "sparsity_by_layer.png, principal_angles.png, mask_overlap.png, energy_by_type.png)."
)


TRAJECTORY_EPILOG = "Example: sparse-opd trajectory ./sft ./run/step64 ./run/step128 ./run/final --out traj/"


MASK_EPILOG = (
    "Examples: sparse-opd mask ./sft ./opd-final --out opd.mask.safetensors; "
    "sparse-opd mask ./sft ./opd-final --rule topk --density 0.05 --ffn-share 0.8 --out top5.mask.safetensors"
)


SUBSPACE_EPILOG = "Example: sparse-opd subspace ./sft ./opd-run/step64 --rank 16 --out basis.safetensors"


def diagnose(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    tuned: str = typer.Argument(..., help="Tuned checkpoint W+ (same architecture as SOURCE)."),
    out: Path = typer.Option(Path("diagnostics"), "--out", "-o", help="Output directory for the report files."),
    modules: list[str] = typer.Option(None, "--modules", "-m", help=MODULES_HELP),
    device: Device = typer.Option(
        Device.auto, "--device", help="Where the float64 linear algebra runs (auto: CUDA if present)."
    ),
    top_k: int = typer.Option(512, "--top-k", help="Principal-angle subspace size (capped by each matrix)."),
    principal_rank: int = typer.Option(64, "--principal-rank", help="Rank of the W0 reconstruction (principal mask)."),
    alpha: float = typer.Option(0.5, "--alpha", help="Fraction of entries in principal / low-magnitude masks."),
    module_type: list[str] = typer.Option(
        None, "--module-type", help="Type override REGEX=ffn|attention|other for other architectures; repeatable."
    ),
    no_spectral: bool = flag("--no-spectral", help="Skip SVD-based metrics (fast sparsity pass)."),
    no_plots: bool = flag("--no-plots", help="Write report.json and report.md only."),
    overwrite: bool = flag("--overwrite", help="Replace existing report files in --out."),
    quiet: bool = quiet_flag("No progress bar."),
) -> None:
    """Compare SOURCE and TUNED weights: bf16 / absolute sparsity, relative norm, principal angles, NSS, overlap with principal and low-magnitude masks, update spectrum and FFN / attention energy shares (per matrix, layer and module type)."""  # noqa: E501
    from ..diagnostics import diagnose as run_diagnose
    from ..diagnostics import table1_line, write_report
    from ..diagnostics.report import PAIR_FILES, check_outputs

    with cli_errors():
        check_outputs(out, PAIR_FILES if not no_plots else PAIR_FILES[:2], overwrite)
        result = run_diagnose(
            source, tuned, modules=modules_regex(modules), device=device.value, progress=not quiet, top_k=top_k,
            principal_rank=principal_rank, alpha=alpha, spectral=not no_spectral,
            type_overrides=type_overrides(module_type),
        )  # fmt: skip
        written = write_report(result, out, overwrite=overwrite, plots=not no_plots)
    s = result.summary
    typer.echo(table1_line(result.to_dict()))
    typer.echo(
        f"{s['n_matrices']} matrices, bf16 sparsity {100 * s['bf16_sparsity']:.1f}%; wrote "
        f"{', '.join(str(p) for p in written.values())}"
    )


def trajectory(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    checkpoints: list[str] = typer.Argument(..., help="Checkpoints W_t in training order; the last one is 'end'."),
    out: Path = typer.Option(Path("trajectory"), "--out", "-o", help="Output directory."),
    labels: list[str] = typer.Option(None, "--label", help="Label per checkpoint (repeat, in order)."),
    modules: list[str] = typer.Option(None, "--modules", "-m", help=MODULES_HELP),
    k: int = typer.Option(16, "--k", help="K of Sim_K (top-K right singular subspaces)."),
    device: Device = typer.Option(Device.auto, "--device", help="auto: CUDA if present."),
    overwrite: bool = flag("--overwrite", help="Replace existing files in --out."),
    quiet: bool = quiet_flag("No progress bar."),
) -> None:
    """Trajectory of cumulative updates ΔW_t = W_t − W0: stable rank, ‖ΔW_t‖_F, Hill estimate and Sim_K to the last checkpoint (writes trajectory.json, trajectory.md, trajectory.png)."""  # noqa: E501
    from ..diagnostics import trajectory as run_trajectory
    from ..diagnostics import write_trajectory_report
    from ..diagnostics.report import TRAJECTORY_FILES, check_outputs

    with cli_errors():
        check_outputs(out, TRAJECTORY_FILES, overwrite)
        result = run_trajectory(
            source, checkpoints, labels=labels or None, modules=modules_regex(modules), k=k, device=device.value,
            progress=not quiet,
        )  # fmt: skip
        written = write_trajectory_report(result, out, overwrite=overwrite)
    for step in result.steps:
        typer.echo(f"{step['label']}: stable rank {step['stable_rank']:.3g}, Sim_{k} {step['sim_k']:.3f}")
    typer.echo(f"wrote {', '.join(str(p) for p in written.values())}")


def mask(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    tuned: str = typer.Argument(..., help="Tuned checkpoint whose update defines the mask."),
    out: Path = typer.Option(..., "--out", "-o", help="Output mask file (.safetensors)."),
    rule: Rule = typer.Option(Rule.bf16_visible, "--rule", help=RULE_HELP),
    density: float = typer.Option(None, "--density", help="topk: fraction of coordinates to keep (0, 1]."),
    ffn_share: float = typer.Option(None, "--ffn-share", help="topk: fraction of the budget given to FFN modules."),
    per_module: bool = flag("--per-module", help="topk: the same density in every module."),
    modules: list[str] = typer.Option(None, "--modules", "-m", help=MODULES_HELP),
    overwrite: bool = flag("--overwrite", help="Replace an existing --out file."),
    quiet: bool = quiet_flag("No progress bar."),
) -> None:
    """Extract the coordinates TUNED moved relative to SOURCE as a SparseMask file for SparseOPDConfig(mask=...)."""
    from ..masks.checkpoints import mask_from_checkpoints

    with cli_errors():
        check_file_target(out, overwrite)
        result = mask_from_checkpoints(
            source, tuned, rule.value, density=density, ffn_share=ffn_share, per_module=per_module,
            modules=modules_regex(modules), progress=not quiet,
        )  # fmt: skip
        result.save(out, overwrite=overwrite)
    types = result.type_stats()
    typer.echo(
        f"wrote {out}: {len(result)} modules, {result.nnz():,} coordinates, density {result.density():.4f}, "
        f"FFN share of coordinates {100 * types['ffn']['share_of_nnz']:.1f}%"
    )


def subspace(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    early: str = typer.Argument(..., help="Early checkpoint W_t (paper: about 20% into training)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output basis file (.safetensors)."),
    rank: int = typer.Option(16, "--rank", "-r", help="Basis size r per module."),
    modules: list[str] = typer.Option(None, "--modules", "-m", help=MODULES_HELP),
    device: Device = typer.Option(Device.auto, "--device", help="auto: CUDA if present."),
    overwrite: bool = flag("--overwrite", help="Replace an existing --out file."),
    quiet: bool = quiet_flag("No progress bar."),
) -> None:
    """Top-r right singular vectors of ΔW_t = EARLY − SOURCE per module, for SparseOPDConfig(subspace=...)."""
    from ..masks.subspace import save_subspace, subspace_from_checkpoints

    with cli_errors():
        check_file_target(out, overwrite)
        basis = subspace_from_checkpoints(
            source, early, rank, modules=modules_regex(modules), device=device.value, progress=not quiet
        )
        save_subspace(basis, out, {"source": str(source), "early": str(early), "rank": rank}, overwrite=overwrite)
    typer.echo(f"wrote {out}: rank-{rank} bases for {len(basis)} modules")


def register(app: typer.Typer) -> None:
    """Add diagnose, trajectory, mask, subspace to ``app``."""
    app.command(cls=Command, epilog=DIAGNOSE_EPILOG)(diagnose)
    app.command(cls=Command, epilog=TRAJECTORY_EPILOG)(trajectory)
    app.command(cls=Command, epilog=MASK_EPILOG)(mask)
    app.command(cls=Command, epilog=SUBSPACE_EPILOG)(subspace)
