"""The study's framework: settings, the cached run store, the shared context handed to every section, and the
driver that writes ``study.json`` / ``study.md`` / PNGs.

Every section is a module in this package with ``run(ctx: StudyContext) -> Section``. A section asks the context
for runs (``ctx.opd(...)``, ``ctx.cached(...)``); a finished run is a JSON file in ``<out>/runs/`` (plus its
artefacts in ``<out>/artifacts/<name>/``) and is skipped on a re-run, so the study is resumable: kill it, start it
again with the same ``--out``, and only unfinished runs execute.

A section's markdown is ``render(info, data, plots)`` of the data it stores (:class:`RenderInfo` carries the settings,
the world's facts and the run store), so ``study.md`` is a function of ``study.json`` alone: :func:`render_study`
regenerates it, and the verdicts in it can be checked against the numbers they come from.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ...atomic import write_text_atomic

SECTIONS = ("geometry", "recovery", "subspace", "controls", "predictors", "savings")


@dataclass
class StudyConfig:
    """Settings of :func:`run_study` (defaults: the full study, about an hour on 2 CPU cores).

    Attributes:
        out: output directory (``study.json``, ``study.md``, ``plots/``, ``runs/``, ``artifacts/``).
        cache_dir: toy-world cache (default ``$SPARSE_OPD_CACHE`` or ``~/.cache/sparse_opd_peft/toy``).
        seeds: seeds per configuration (runs differ in rollout sampling / data order, not in the anchor).
        task: toy task every run trains on.
        steps, batch_size, lr: the matched OPD budget of the sections (linear decay, 10 warm-up steps).
        eval_samples: held-out prompts for every final accuracy.
        threads: torch intra-op threads (1: fastest for the tiny toy models, steady on shared cores).
        sections: which sections to run, in order (names from :data:`SECTIONS`).
        tiny: the tiny toy world and a few steps (smoke tests; numbers mean nothing).
        workers: processes that train the sections' runs in parallel (one core each; 1 = all in this process).
        progress: progress bars.
    """

    out: str = "runs/study"
    cache_dir: Optional[str] = None
    seeds: int = 3
    task: str = "add"
    steps: int = 250
    batch_size: int = 64
    lr: float = 1e-3
    eval_samples: int = 2000
    threads: int = 1
    sections: tuple[str, ...] = SECTIONS
    tiny: bool = False
    workers: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown:
            raise ValueError(f"unknown study section(s) {unknown}; choose from {list(SECTIONS)}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.seeds < 1 or self.steps < 1 or self.batch_size < 1 or self.eval_samples < 1:
            raise ValueError("seeds, steps, batch_size and eval_samples must all be >= 1")


@dataclass
class Section:
    """What a section returns.

    Attributes:
        name: section module name. title: heading in ``study.md``.
        markdown: the section's body (tables with mean ± std over seeds, the papers' figures in a column beside
            ours, and one line per paper claim saying whether the toy world reproduces it).
        data: JSON-serialisable numbers behind the tables (goes to ``study.json``).
        plots: PNG paths written (relative to ``out``).
    """

    name: str
    title: str
    markdown: str
    data: dict[str, Any] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)


def mean_std(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    """``"m ± s"`` of ``values * scale`` (just ``"m"`` for one value; ``"–"`` for none)."""
    v = [scale * float(x) for x in values if x is not None]
    if not v:
        return "–"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, creating the parent folder first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


def json_roundtrip(obj: Any) -> Any:
    """``obj`` as ``study.json`` stores it (tuples become lists, keys strings, tensors / numpy scalars floats): a
    section renders its markdown from this, so that ``study.md`` is a function of ``study.json``."""
    return json.loads(json.dumps(obj, default=float))


def base_run_config(config: StudyConfig) -> Any:
    """The :class:`~sparse_opd_peft.lab.toy.ToyRunConfig` every run of the study starts from (the matched budget)."""
    from ..toy.runs import ToyRunConfig, toy_opd_config

    opd = toy_opd_config(lr=config.lr, steps=config.steps, batch_size=config.batch_size,
                         progress_bar=config.progress, eval_samples=min(500, config.eval_samples))  # fmt: skip
    return ToyRunConfig(task=config.task, opd=opd)


def block_linears(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """``{module name: (out, in)}`` of the block Linear layers (the modules every mask / LoRA here targets)."""
    from ...diagnostics.sources import is_block_linear

    return {n[: -len(".weight")]: (int(p.shape[0]), int(p.shape[1])) for n, p in model.named_parameters()
            if is_block_linear(n, p.shape)}  # fmt: skip


@dataclass
class RenderInfo:
    """What a section's markdown needs besides its own data; built from a live study (:meth:`from_context`) or from
    a written ``study.json`` (:meth:`from_summary`), so that ``study.md`` can be regenerated from ``study.json``.

    Attributes:
        config: the study's settings.
        accuracies: the world's held-out accuracies at build, ``{"teacher" | "student": {task: share}}``.
        block_linears: ``{module: (out, in)}`` of the student's block Linear layers.
        answer_widths: ``{task: characters of every answer}`` (a completion is the answer plus EOS).
        runs: the run store, ``{run name: its JSON}`` (per-step histories may have been dropped).
        world_key: the toy world's key (:func:`~sparse_opd_peft.lab.toy.world_key`).
    """

    config: StudyConfig
    accuracies: dict[str, dict[str, float]]
    block_linears: dict[str, tuple[int, int]]
    answer_widths: dict[str, int]
    runs: dict[str, Any] = field(default_factory=dict)
    world_key: str = ""

    @property
    def base(self) -> Any:
        """:func:`base_run_config` of :attr:`config`."""
        return base_run_config(self.config)

    @property
    def anchor(self) -> float:
        """The student anchor's accuracy on the study's task at build."""
        return self.accuracies["student"][self.config.task]

    def compute_seconds(self, prefix: str) -> tuple[int, float]:
        """(number of cached runs named ``prefix*``, their summed wall-clock seconds as first measured)."""
        walls = [r.get("wall_seconds", 0.0) for name, r in self.runs.items() if name.startswith(prefix)]
        return len(walls), float(sum(walls))

    def world_facts(self) -> dict[str, Any]:
        """The world's facts that ``study.json`` records for :meth:`from_summary`."""
        return {"block_linears": {n: list(s) for n, s in self.block_linears.items()},
                "answer_widths": dict(self.answer_widths)}  # fmt: skip

    @classmethod
    def from_context(cls, ctx: StudyContext) -> RenderInfo:
        """The live study's settings, world and run store (as they are now)."""
        shapes = block_linears(ctx.world.student)
        runs = {p.stem: json.loads(p.read_text()) for p in sorted(ctx.runs_dir.glob("*.json"))}
        widths = {name: task.answer_width for name, task in ctx.world.tasks.items()}
        return cls(ctx.config, ctx.world.accuracies, shapes, widths, runs, ctx.world.key)

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> RenderInfo:
        """From a ``study.json`` dict (as :func:`run_study` writes it)."""
        world = summary["world"]
        if "block_linears" not in world:
            raise ValueError("this study.json predates the world facts (block_linears, answer_widths) that its "
                             "markdown needs; run `sparse-opd study` again")  # fmt: skip
        config = StudyConfig(**{**summary["config"], "sections": tuple(summary["config"]["sections"])})
        shapes = {n: (int(o), int(i)) for n, (o, i) in world["block_linears"].items()}
        return cls(config, world["accuracies_at_build"], shapes, dict(world["answer_widths"]), summary["runs"],
                   world.get("key", ""))  # fmt: skip


def render_header(info: RenderInfo) -> list[str]:
    """The lines of ``study.md`` before the first section: how it was generated, the world, the cost."""
    config = info.config
    header = [
        "# Study: the papers' findings on the toy world",
        "",
        f"Generated by `sparse-opd study --out {config.out} --seeds {config.seeds}` on toy world "
        f"`{info.world_key}` (task `{config.task}`, {config.steps} steps × {config.batch_size} prompts, lr {config.lr:g}, "
        f"{config.eval_samples} held-out prompts; anchor {100 * info.accuracies['student'][config.task]:.1f} %, "
        f"teacher {100 * info.accuracies['teacher'][config.task]:.1f} % at build). Mean ± std over seeds.",
        "",
    ]
    runs = [info.runs[k] for k in sorted(info.runs)]
    trained = [r for r in runs if isinstance(r, dict) and "train_seconds" in r]
    steps = sum(_run_steps(r.get("config") or {}, config.steps) for r in trained)
    recorded = sum(float(r.get("wall_seconds", 0.0)) for r in runs if isinstance(r, dict))
    header += [
        f"Cost: {len(trained)} training runs, {steps:,} optimizer steps; recorded wall-clock of all cached entries "
        f"{recorded / 60:.0f} min (as first measured, whatever else ran on the machine then).",
        "",
    ]
    return header


def _run_steps(run_config: dict[str, Any], default: int) -> int:
    """Optimizer steps of a cached run's ``config``: ``ToyRunConfig.to_dict()`` (``{"opd": {"steps"}}``) or the
    flat dict that runs cached before ``ToyRunConfig`` held an ``OPDConfig`` recorded."""
    return int(run_config.get("opd", run_config).get("steps", default))


def render_study(summary: dict[str, Any]) -> str:
    """``study.md`` from a ``study.json`` dict: the header, then each section's ``render(info, data, plots)``."""
    import importlib

    info = RenderInfo.from_summary(summary)
    body = []
    for name, sec in summary["sections"].items():
        markdown = importlib.import_module(f"{__package__}.{name}").render(info, sec["data"], sec["plots"])
        body.append(f"## {sec['title']}\n\n{markdown.strip()}\n")
    return "\n".join(render_header(info) + body)


class StudyContext:
    """Shared state of one study: config, toy world, run store, and helpers to train / evaluate on it."""

    def __init__(self, config: StudyConfig):
        from ..toy import ToyRecipe, build_world

        self.config = config
        self.out = Path(config.out)
        self.runs_dir = self.out / "runs"
        self.artifacts = self.out / "artifacts"
        self.plots = self.out / "plots"
        for d in (self.runs_dir, self.artifacts, self.plots):
            d.mkdir(parents=True, exist_ok=True)
        self.world = build_world(config.cache_dir, ToyRecipe.tiny() if config.tiny else None, progress=config.progress)
        if config.task not in self.world.tasks:
            raise ValueError(f"task {config.task!r} is not in the toy world (has {sorted(self.world.tasks)})")
        self.seeds = list(range(config.seeds))
        self.base = base_run_config(config)

    # ------------------------------------------------------------------ run store
    def artifact_dir(self, name: str) -> Path:
        """Directory for a run's files (checkpoints, saved models, masks)."""
        return self.artifacts / name

    def cached(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Result of run ``name``: loaded from ``runs/<name>.json`` when finished before, else ``fn()`` (its dict
        gets ``wall_seconds``) written atomically. ``name`` must be a file-name-safe string."""
        if not name or any(c in name for c in "/\\ "):
            raise ValueError(f"run name {name!r} must be non-empty, without slashes or spaces")
        path = self.runs_dir / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
        t0 = time.perf_counter()
        result = fn()
        result["wall_seconds"] = round(time.perf_counter() - t0, 2)
        write_atomic(path, json.dumps(result, indent=1, default=float))
        return result

    # ------------------------------------------------------------------ training helpers
    def accuracy(self, model: torch.nn.Module, task: Optional[str] = None) -> float:
        """Held-out greedy accuracy (share) on ``config.eval_samples`` prompts of ``task`` (default the study's)."""
        from ..toy import heldout_accuracy

        return heldout_accuracy(model, self.world, task or self.config.task, self.config.eval_samples)

    def opd(
        self,
        name: str,
        make_student: Callable[[], torch.nn.Module],
        *,
        save_model: bool = False,
        save_every: int = 0,
        **changes: Any,
    ) -> dict[str, Any]:
        """Cached training run: ``opd_run(make_student(), world, base.with_(**changes))`` then held-out accuracy.

        Args:
            name: run name (cache key; include the seed).
            make_student: builds a fresh student (plain, LoRA or SparseOPD-wrapped) from the anchor.
            save_model: save the final model (``save_pretrained``) to ``artifact_dir(name)/final`` — for a PEFT
                model the merged weights (``merge_and_unload``), so diagnostics can read a plain checkpoint.
            save_every: trainable-state snapshots every this many steps into ``artifact_dir(name)/checkpoints``.
            changes: :class:`~sparse_opd_peft.lab.toy.ToyRunConfig` fields (``seed``, ``loss``, ``lr``, ...).

        Returns:
            ``{"acc", "train_seconds", "history": [per-step metrics], "trainable", "config"}`` (``config``: the
            ``ToyRunConfig.to_dict()`` with the ``OPDConfig`` the trainer ran with).
        """
        from ..toy import opd_run
        from ..toy.runs import opd_config

        def run() -> dict[str, Any]:
            cfg = self.base.with_(save_every=save_every, **changes)
            ckpt = self.artifact_dir(name) / "checkpoints" if save_every else None
            student = make_student()
            trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
            model, history, secs = opd_run(student, self.world, cfg, checkpoint_dir=ckpt)
            acc = self.accuracy(model)
            if save_model:
                plain = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
                plain.save_pretrained(self.artifact_dir(name) / "final")
            keep = ("step", "loss", "kl", "kl_exact", "reward", "accuracy", "eval_accuracy", "lr", "tokens_per_s")
            hist = [{k: h[k] for k in keep if k in h} for h in history]
            used = {**cfg.to_dict(), "opd": opd_config(self.world, cfg, ckpt).to_dict()}
            return {"acc": acc, "train_seconds": secs, "history": hist, "trainable": trainable, "config": used}

        return self.cached(name, run)

    def full_opd(self, seed: int) -> tuple[dict[str, Any], Path]:
        """The shared full-parameter OPD run of ``seed`` (default loss, matched budget), with the final model saved
        and 10 trainable-state snapshots; every section that needs "the full OPD run" uses this one.

        Returns:
            ``(result dict of :meth:`opd`, directory of the final model (W+))``; snapshots are
            ``artifact_dir(name)/checkpoints/step_<k>.safetensors``.
        """
        name = f"opd_full_s{seed}"
        result = self.opd(
            name, self.world.load_student, save_model=True, save_every=max(self.config.steps // 10, 1), seed=seed
        )
        final = self.artifact_dir(name) / "final"
        if not final.exists():  # result cached but artefacts removed: run again
            (self.runs_dir / f"{name}.json").unlink()
            result = self.opd(
                name, self.world.load_student, save_model=True, save_every=max(self.config.steps // 10, 1), seed=seed
            )
        return result, final

    def student_path(self) -> Path:
        """Directory of the anchor W0 (a plain checkpoint, for diagnostics and mask builders)."""
        return Path(self.world.student_path)


def run_study(config: StudyConfig) -> dict[str, Any]:
    """Run the configured sections in order; write ``study.json`` and ``study.md`` to ``config.out``.

    Returns:
        the ``study.json`` dict (config, per-section data, plots, wall-clock).
    """
    import importlib

    torch.set_num_threads(config.threads)
    t0 = time.perf_counter()
    ctx = StudyContext(config)
    if config.workers > 1 and len(config.sections) > 1:
        for seed in ctx.seeds:  # the runs every section shares, before the sections split
            ctx.full_opd(seed)
        _train_in_workers(config)
    sections: list[Section] = []
    for name in config.sections:
        module = importlib.import_module(f"{__package__}.{name}")
        sections.append(module.run(ctx))
    world, info = ctx.world, RenderInfo.from_context(ctx)
    summary = {
        "config": asdict(config),
        "world": {"key": world.key, "accuracies_at_build": world.accuracies, **info.world_facts()},
        "runs": info.runs,
        "sections": {s.name: {"title": s.title, "data": s.data, "plots": s.plots} for s in sections},
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    summary = json_roundtrip(summary)
    write_atomic(ctx.out / "study.md", render_study(summary))  # a function of study.json alone
    write_atomic(ctx.out / "study.json", json.dumps(summary, indent=1, default=float))
    return summary


def _sections_in_worker(config_dict: dict[str, Any], names: list[str]) -> None:
    """Worker process: run ``names`` so that their runs land in the shared run store (results are re-read later)."""
    import importlib

    config = StudyConfig(**{**config_dict, "sections": tuple(names), "workers": 1})
    torch.set_num_threads(config.threads)
    if not config.progress:  # a spawned process does not inherit the parent's logging settings
        from ...workflow.sources import quiet_library_warnings

        quiet_library_warnings()
    ctx = StudyContext(config)
    for name in names:
        importlib.import_module(f"{__package__}.{name}").run(ctx)


def _train_in_workers(config: StudyConfig) -> None:
    """Train the sections' runs in ``config.workers`` processes (:func:`~.workers.run_groups` of
    :func:`~.workers.worker_groups`); finished runs are cached, so the caller's pass that follows only reads them."""
    from .workers import run_groups, worker_groups

    run_groups(_sections_in_worker, asdict(config), worker_groups(config.sections, config.workers))
