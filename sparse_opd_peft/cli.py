"""``sparse-opd`` command line.

One function per command; every command runs inside :func:`cli_errors`, which turns the package's expected errors
(missing files, mismatched checkpoints, non-finite weights, existing outputs, bad arguments) into one line
``error: ...`` on stderr and exit code 2, with nothing written.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import NoReturn

import typer

app = typer.Typer(
    name="sparse-opd",
    help=(
        "Sparse on-policy-distillation adapters: diagnose how a fine-tune moved a model's weights, and extract the "
        "masks / subspaces that the SparseOPD adapter trains. Checkpoints are model directories (safetensors, "
        "sharded or not), .safetensors files, or Hub ids (org/name[@revision]; HF_HUB_OFFLINE=1 uses the cache)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``error: <message>`` as one line on stderr and exit with ``code``."""
    typer.echo("error: " + " ".join(str(message).split()), err=True)
    raise typer.Exit(code)


@contextmanager
def cli_errors():
    """Map expected exceptions to :func:`fail`."""
    try:
        yield
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, TypeError) as err:
        fail(str(err))
    except KeyError as err:
        fail(str(err.args[0]) if err.args else repr(err))
    except OSError as err:
        fail(f"{getattr(err, 'filename', '') or ''} {err.strerror or err}".strip())


def _modules_regex(modules: list[str] | None) -> str | None:
    """Repeated ``--modules`` patterns -> one regex (a module matches when any pattern is found in its name)."""
    if not modules:
        return None
    for m in modules:
        try:
            re.compile(m)
        except re.error as err:
            raise ValueError(f"--modules {m!r} is not a valid regular expression ({err})") from None
    return "|".join(f"(?:{m})" for m in modules)


def _type_overrides(rules: list[str] | None) -> dict[str, str] | None:
    """``["regex=ffn", ...]`` -> ordered ``{regex: type}`` (see ``sparse_opd_peft.module_type``)."""
    from .module_types import MODULE_TYPES

    out = {}
    for rule in rules or []:
        pattern, sep, kind = rule.rpartition("=")
        if not sep or not pattern or kind not in MODULE_TYPES:
            raise ValueError(f"--module-type {rule!r}: use REGEX=TYPE with TYPE one of {', '.join(MODULE_TYPES)}")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"--module-type {rule!r}: invalid regular expression ({err})") from None
        out[pattern] = kind
    return out or None


def _check_file_target(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a directory; --out takes a file path such as {out / 'mask.safetensors'}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it or choose another --out")


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"


class Rule(str, Enum):
    bf16_visible = "bf16_visible"
    abs_threshold = "abs_threshold"
    topk = "topk"


SOURCE_HELP = "Source checkpoint W0: model directory, .safetensors file or Hub id."
MODULES_HELP = (
    "Regex on module names (e.g. 'mlp' or 'layers\\.(0|1)\\.'); repeat to combine. Default: all block Linears."
)


@app.command(
    epilog="Example: sparse-opd diagnose Qwen/Qwen3-1.7B ./opd-run/final --out diag/ (writes report.json, report.md, "
    "sparsity_by_layer.png, principal_angles.png, mask_overlap.png, energy_by_type.png)."
)
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
    no_spectral: bool = typer.Option(False, "--no-spectral", help="Skip SVD-based metrics (fast sparsity pass)."),
    no_plots: bool = typer.Option(False, "--no-plots", help="Write report.json and report.md only."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing report files in --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Compare SOURCE and TUNED weights: bf16 / absolute sparsity, relative norm, principal angles, NSS, overlap with principal and low-magnitude masks, update spectrum and FFN / attention energy shares (per matrix, layer and module type)."""  # noqa: E501
    from .diagnostics import diagnose as run_diagnose
    from .diagnostics import table1_line, write_report
    from .diagnostics.report import PAIR_FILES, check_outputs

    with cli_errors():
        check_outputs(out, PAIR_FILES if not no_plots else PAIR_FILES[:2], overwrite)
        result = run_diagnose(
            source, tuned, modules=_modules_regex(modules), device=device.value, progress=not quiet, top_k=top_k,
            principal_rank=principal_rank, alpha=alpha, spectral=not no_spectral,
            type_overrides=_type_overrides(module_type),
        )  # fmt: skip
        written = write_report(result, out, overwrite=overwrite, plots=not no_plots)
    s = result.summary
    typer.echo(table1_line(result.to_dict()))
    typer.echo(
        f"{s['n_matrices']} matrices, bf16 sparsity {100 * s['bf16_sparsity']:.1f}%; wrote "
        f"{', '.join(str(p) for p in written.values())}"
    )


@app.command(epilog="Example: sparse-opd trajectory ./sft ./run/step64 ./run/step128 ./run/final --out traj/")
def trajectory(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    checkpoints: list[str] = typer.Argument(..., help="Checkpoints W_t in training order; the last one is 'end'."),
    out: Path = typer.Option(Path("trajectory"), "--out", "-o", help="Output directory."),
    labels: list[str] = typer.Option(None, "--label", help="Label per checkpoint (repeat, in order)."),
    modules: list[str] = typer.Option(None, "--modules", "-m", help=MODULES_HELP),
    k: int = typer.Option(16, "--k", help="K of Sim_K (top-K right singular subspaces)."),
    device: Device = typer.Option(Device.auto, "--device", help="auto: CUDA if present."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing files in --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Trajectory of cumulative updates ΔW_t = W_t − W0: stable rank, ‖ΔW_t‖_F, Hill estimate and Sim_K to the last checkpoint (writes trajectory.json, trajectory.md, trajectory.png)."""  # noqa: E501
    from .diagnostics import trajectory as run_trajectory
    from .diagnostics import write_trajectory_report
    from .diagnostics.report import TRAJECTORY_FILES, check_outputs

    with cli_errors():
        check_outputs(out, TRAJECTORY_FILES, overwrite)
        result = run_trajectory(
            source, checkpoints, labels=labels or None, modules=_modules_regex(modules), k=k, device=device.value,
            progress=not quiet,
        )  # fmt: skip
        written = write_trajectory_report(result, out, overwrite=overwrite)
    for step in result.steps:
        typer.echo(f"{step['label']}: stable rank {step['stable_rank']:.3g}, Sim_{k} {step['sim_k']:.3f}")
    typer.echo(f"wrote {', '.join(str(p) for p in written.values())}")


@app.command(
    epilog="Examples: sparse-opd mask ./sft ./opd-final --out opd.mask.safetensors; "
    "sparse-opd mask ./sft ./opd-final --rule topk --density 0.05 --ffn-share 0.8 --out top5.mask.safetensors"
)
def mask(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    tuned: str = typer.Argument(..., help="Tuned checkpoint whose update defines the mask."),
    out: Path = typer.Option(..., "--out", "-o", help="Output mask file (.safetensors)."),
    rule: Rule = typer.Option(Rule.bf16_visible, "--rule", help="bf16_visible | abs_threshold (|ΔW| >= 1e-5) | topk."),
    density: float = typer.Option(None, "--density", help="topk: fraction of coordinates to keep (0, 1]."),
    ffn_share: float = typer.Option(None, "--ffn-share", help="topk: fraction of the budget given to FFN modules."),
    per_module: bool = typer.Option(False, "--per-module", help="topk: the same density in every module."),
    modules: list[str] = typer.Option(None, "--modules", "-m", help=MODULES_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Extract the coordinates TUNED moved relative to SOURCE as a SparseMask file for SparseOPDConfig(mask=...)."""
    from .mask_builders import mask_from_checkpoints

    with cli_errors():
        _check_file_target(out, overwrite)
        result = mask_from_checkpoints(
            source, tuned, rule.value, density=density, ffn_share=ffn_share, per_module=per_module,
            modules=_modules_regex(modules), progress=not quiet,
        )  # fmt: skip
        result.save(out, overwrite=overwrite)
    types = result.type_stats()
    typer.echo(
        f"wrote {out}: {len(result)} modules, {result.nnz():,} coordinates, density {result.density():.4f}, "
        f"FFN share of coordinates {100 * types['ffn']['share_of_nnz']:.1f}%"
    )


@app.command(epilog="Example: sparse-opd subspace ./sft ./opd-run/step64 --rank 16 --out basis.safetensors")
def subspace(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    early: str = typer.Argument(..., help="Early checkpoint W_t (paper: about 20% into training)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output basis file (.safetensors)."),
    rank: int = typer.Option(16, "--rank", "-r", help="Basis size r per module."),
    modules: list[str] = typer.Option(None, "--modules", "-m", help=MODULES_HELP),
    device: Device = typer.Option(Device.auto, "--device", help="auto: CUDA if present."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Top-r right singular vectors of ΔW_t = EARLY − SOURCE per module, for SparseOPDConfig(subspace=...)."""
    from .subspace import save_subspace, subspace_from_checkpoints

    with cli_errors():
        _check_file_target(out, overwrite)
        basis = subspace_from_checkpoints(
            source, early, rank, modules=_modules_regex(modules), device=device.value, progress=not quiet
        )
        save_subspace(basis, out, {"source": str(source), "early": str(early), "rank": rank}, overwrite=overwrite)
    typer.echo(f"wrote {out}: rank-{rank} bases for {len(basis)} modules")


@app.command(epilog="Example: sparse-opd demo --out runs/demo --steps 200 --density 0.2")
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Output directory (reports, adapter, plots)."),
    cache_dir: Path = typer.Option(
        None, "--cache-dir", help="Cache of built worlds, for --tiny (the default world ships with the package)."
    ),
    task: str = typer.Option("add", "--task", help="Toy task to distil (add | sub)."),
    loss: str = typer.Option(
        "full_kl", "--loss", help="OPD loss: full_kl (exact reverse KL; default, stable here) | sampled_token."
    ),
    steps: int = typer.Option(250, "--steps", help="OPD steps of every run (full, masked, random)."),
    warmup_steps: int = typer.Option(10, "--warmup-steps", help="Linear lr warm-up steps before the decay."),
    batch_size: int = typer.Option(64, "--batch-size", help="Prompts per step."),
    lr: float = typer.Option(2e-3, "--lr", help="Learning rate of full OPD (linear decay)."),
    adapter_lr: float = typer.Option(2e-3, "--adapter-lr", help="Learning rate of the masked runs."),
    density: float = typer.Option(0.2, "--density", help="Top-k |ΔW| mask density."),
    eval_samples: int = typer.Option(2000, "--eval-samples", help="Held-out prompts for accuracy."),
    seed: int = typer.Option(0, "--seed", help="Seed of every run."),
    tiny: bool = typer.Option(False, "--tiny", help="Tiny world (seconds; for smoke tests, not for results)."),
    threads: int = typer.Option(1, "--threads", help="torch threads (1 is fastest for the tiny toy models)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Whole story on the shipped toy world: full OPD, diagnostics, mask, masked retrain vs random, merge, verdicts."""
    from .lab.demo import DemoConfig, run_demo

    with cli_errors():
        if not 0 < density < 1:
            raise ValueError(f"--density must be in (0, 1), got {density}")
        cfg = DemoConfig(
            out=str(out), cache_dir=str(cache_dir) if cache_dir else None, task=task, loss=loss, steps=steps, warmup_steps=warmup_steps,
            batch_size=batch_size, lr=lr, adapter_lr=adapter_lr, density=density, eval_samples=eval_samples,
            seed=seed, tiny=tiny, threads=threads, progress=not quiet,
        )  # fmt: skip
        run_demo(cfg)
    typer.echo((out / "demo.md").read_text())


@app.command(
    epilog="Examples: sparse-opd study --out runs/study; sparse-opd study --out runs/study --sections recovery"
)
def study(
    out: Path = typer.Option(Path("runs/study"), "--out", "-o", help="Output directory (re-run to resume)."),
    seeds: int = typer.Option(3, "--seeds", help="Seeds per configuration."),
    sections: list[str] = typer.Option(
        None,
        "--sections",
        help="Run only these sections (repeat): geometry recovery subspace controls predictors savings.",
    ),
    cache_dir: Path = typer.Option(
        None, "--cache-dir", help="Toy-world cache (default $SPARSE_OPD_CACHE or ~/.cache)."
    ),
    steps: int = typer.Option(250, "--steps", help="OPD steps of every matched-budget run."),
    eval_samples: int = typer.Option(2000, "--eval-samples", help="Held-out prompts per accuracy."),
    threads: int = typer.Option(1, "--threads", help="torch threads (1 is fastest for the tiny toy models)."),
    workers: int = typer.Option(2, "--workers", help="Processes training the sections' runs in parallel."),
    tiny: bool = typer.Option(False, "--tiny", help="Tiny world and budget (smoke test; numbers mean nothing)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """The papers' findings reproduced side by side on the toy world: writes study.json, study.md and plots."""
    from .lab.study import SECTIONS, StudyConfig, run_study

    with cli_errors():
        cfg = StudyConfig(
            out=str(out), cache_dir=str(cache_dir) if cache_dir else None, seeds=seeds, steps=steps,
            eval_samples=eval_samples, threads=threads, workers=workers, sections=tuple(sections) if sections else SECTIONS,
            tiny=tiny, progress=not quiet,
        )  # fmt: skip
        run_study(cfg)
    typer.echo(f"wrote {out / 'study.md'} and {out / 'study.json'}")


def _register_workflow_commands() -> None:
    """Commands defined in sibling modules register themselves on :data:`app` when imported."""
    from . import cli_hub, cli_workflow  # noqa: F401


_register_workflow_commands()

if __name__ == "__main__":  # pragma: no cover
    app()
