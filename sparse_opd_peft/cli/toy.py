"""``sparse-opd demo | study``: the whole story and the papers' findings on the toy world that ships with the package."""

from __future__ import annotations

from pathlib import Path

import typer

from .errors import cli_errors
from .options import Command, flag, quiet_flag

DEMO_EPILOG = "Example: sparse-opd demo --out runs/demo --steps 200 --density 0.2"


STUDY_EPILOG = "Examples: sparse-opd study --out runs/study; sparse-opd study --out runs/study --sections recovery"


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Output directory (reports, adapter, plots)."),
    world: Path = typer.Option(
        None,
        "--world",
        help="A toy world directory (e.g. one `python -m sparse_opd_peft.lab.toy --rebuild --export` "
        "wrote); default: the world that ships with the package.",
    ),
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
    lr: float = typer.Option(1e-3, "--lr", help="Learning rate of full OPD (linear decay)."),
    adapter_lr: float = typer.Option(1e-3, "--adapter-lr", help="Learning rate of the masked runs."),
    density: float = typer.Option(0.2, "--density", help="Top-k |ΔW| mask density."),
    eval_samples: int = typer.Option(2000, "--eval-samples", help="Held-out prompts for accuracy."),
    seed: int = typer.Option(0, "--seed", help="Seed of every run."),
    tiny: bool = flag("--tiny", help="Tiny world (seconds; for smoke tests, not for results)."),
    threads: int = typer.Option(1, "--threads", help="torch threads (1 is fastest for the tiny toy models)."),
    quiet: bool = quiet_flag("No progress bars."),
) -> None:
    """Whole story on the shipped toy world: full OPD, diagnostics, mask, masked retrain vs random, merge, verdicts."""
    from ..lab.demo import DemoConfig, run_demo
    from ..workflow.sources import quiet_library_warnings

    quiet_library_warnings()  # no per-save "Writing model shards" bars or transformers deprecation notices
    with cli_errors():
        if not 0 < density < 1:
            raise ValueError(f"--density must be in (0, 1), got {density}")
        cfg = DemoConfig(
            out=str(out), world=str(world) if world else None, cache_dir=str(cache_dir) if cache_dir else None, task=task, loss=loss, steps=steps, warmup_steps=warmup_steps,
            batch_size=batch_size, lr=lr, adapter_lr=adapter_lr, density=density, eval_samples=eval_samples,
            seed=seed, tiny=tiny, threads=threads, progress=not quiet,
        )  # fmt: skip
        run_demo(cfg)
    typer.echo((out / "demo.md").read_text())


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
    tiny: bool = flag("--tiny", help="Tiny world and budget (smoke test; numbers mean nothing)."),
    quiet: bool = quiet_flag("No progress bars."),
) -> None:
    """The papers' findings reproduced side by side on the toy world: writes study.json, study.md and plots."""
    from ..lab.study import SECTIONS, StudyConfig, run_study
    from ..workflow.sources import quiet_library_warnings

    if quiet:
        quiet_library_warnings()  # no per-save / per-load bars; the workers do the same
    with cli_errors():
        cfg = StudyConfig(
            out=str(out), cache_dir=str(cache_dir) if cache_dir else None, seeds=seeds, steps=steps,
            eval_samples=eval_samples, threads=threads, workers=workers, sections=tuple(sections) if sections else SECTIONS,
            tiny=tiny, progress=not quiet,
        )  # fmt: skip
        run_study(cfg)
    typer.echo(f"wrote {out / 'study.md'} and {out / 'study.json'}")


def register(app: typer.Typer) -> None:
    """Add demo, study to ``app``."""
    app.command(cls=Command, epilog=DEMO_EPILOG)(demo)
    app.command(cls=Command, epilog=STUDY_EPILOG)(study)
