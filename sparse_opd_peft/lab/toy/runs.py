"""One OPD run on the toy world, and held-out accuracy: the building block of the demo and the benchmarks.

The defaults are the recipe measured to learn on the default toy world (see README "OPD on the toy world"):
``full_kl`` (exact reverse KL over the 20-token vocabulary at every visited prefix), AdamW lr 1e-3 with 10 warm-up
steps and linear decay, 64 prompts per step. The per-token ``sampled_token`` estimator of the same gradient is
unbiased but, with a teacher that puts 10-18 nats between its answer and a wrong digit, its variance at 64
samples per step destabilises the first steps; it is measured side by side in ``benchmarks/bench_opd_masks.py``.

A run's training knobs are an :class:`~sparse_opd_peft.opd.OPDConfig` held by :class:`ToyRunConfig` (the recipe:
:func:`toy_opd_config`), so a new trainer knob reaches the toy runs without a change here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional

import torch

from ...opd.config import OPDConfig
from .evaluate import evaluate_accuracy
from .world import ToyWorld

__all__ = ["TOY_OPD_RECIPE", "ToyRunConfig", "heldout_accuracy", "opd_run", "toy_opd_config"]

# Where the toy recipe departs from OPDConfig's defaults (lr 1e-3, full_kl, AdamW, linear decay are the defaults).
TOY_OPD_RECIPE: dict[str, Any] = {"steps": 250, "batch_size": 64, "warmup_steps": 10, "eval_samples": 500}
_OPD_FIELDS = frozenset(f.name for f in fields(OPDConfig))


def toy_opd_config(**changes: Any) -> OPDConfig:
    """The toy world's measured recipe as an :class:`~sparse_opd_peft.opd.OPDConfig` (its defaults plus
    :data:`TOY_OPD_RECIPE`), with ``changes`` (any ``OPDConfig`` fields) applied."""
    return OPDConfig(**{**TOY_OPD_RECIPE, **changes})


@dataclass(frozen=True)
class ToyRunConfig:
    """Settings of one toy OPD run: the toy task, the snapshot cadence, and the run's own
    :class:`~sparse_opd_peft.opd.OPDConfig` (every training knob lives there, none is repeated here).

    Attributes:
        task: toy task name (``"add"`` / ``"sub"``).
        opd: the trainer's settings (default :func:`toy_opd_config`). :func:`opd_config` sets two fields from the
            world and the call: ``max_new_tokens`` (the task's answer width + 2) and ``checkpoint_dir``.
        save_every: trainable-state snapshots every this many steps into :func:`opd_run`'s ``checkpoint_dir``
            (0 = none; ignored without one). Kept here rather than in ``opd`` because ``OPDConfig`` requires a
            directory with it and the directory is the run's argument.

    Read training knobs as ``cfg.opd.lr``, ``cfg.opd.steps``, ...; :meth:`with_` changes fields of either.
    """

    task: str = "add"
    opd: OPDConfig = field(default_factory=toy_opd_config)
    save_every: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.opd, OPDConfig):
            raise TypeError(f"ToyRunConfig.opd must be an OPDConfig, got {type(self.opd).__name__}")
        if isinstance(self.save_every, bool) or not isinstance(self.save_every, int) or self.save_every < 0:
            raise ValueError(f"ToyRunConfig.save_every={self.save_every!r} is invalid: must be an integer >= 0")

    def with_(self, **changes: Any) -> ToyRunConfig:
        """A copy with ``changes`` applied: ``task`` / ``save_every`` / ``opd`` here, any other name to ``opd``
        (an ``OPDConfig`` field, validated by it); an unknown name raises a ``ValueError`` naming it."""
        own = {k: changes.pop(k) for k in ("task", "save_every", "opd") if k in changes}
        unknown = sorted(set(changes) - _OPD_FIELDS)
        if unknown:
            raise ValueError(
                f"ToyRunConfig.with_: unknown field(s) {unknown}; use task, save_every or OPDConfig fields"
            )
        opd = own.pop("opd", self.opd)
        return replace(self, opd=replace(opd, **changes) if changes else opd, **own)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able ``{"task", "save_every", "opd": OPDConfig.to_dict()}``."""
        return {"task": self.task, "save_every": self.save_every, "opd": self.opd.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ToyRunConfig:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        return cls(**{**data, "opd": OPDConfig.from_dict(dict(data.pop("opd", {})))})


def heldout_accuracy(model: torch.nn.Module, world: ToyWorld, task: str, n: int = 2000) -> float:
    """Greedy exact-match accuracy of ``model`` on the first ``n`` held-out prompts of ``task`` (a share in [0, 1])."""
    if task not in world.datasets:
        raise ValueError(f"task {task!r} is not in the toy world (has {sorted(world.datasets)})")
    heldout = world.datasets[task]["heldout"]
    return float(evaluate_accuracy(model, world.tokenizer, heldout.select(range(min(n, len(heldout)))), task))


def opd_run(
    student: torch.nn.Module,
    world: ToyWorld,
    cfg: ToyRunConfig,
    checkpoint_dir: Optional[str | Path] = None,
    trainer_cls: Optional[type] = None,
) -> tuple[torch.nn.Module, list[dict[str, float]], float]:
    """Train ``student`` (plain, LoRA- or SparseOPD-wrapped) on ``cfg.task`` with the world's teacher.

    ``trainer_cls``: an :class:`~sparse_opd_peft.opd.OPDTrainer` subclass to train with (default ``OPDTrainer``;
    e.g. a benchmark's probe objective).

    Returns:
        ``(trained model (unwrapped from accelerate), per-step history, wall-clock seconds)``.
    """
    from ...opd import OPDTrainer

    config = opd_config(world, cfg, checkpoint_dir)
    data = world.datasets[cfg.task]
    trainer = (trainer_cls or OPDTrainer)(
        student,
        world.teacher,
        world.tokenizer,
        data["train"],
        config,
        eval_dataset=data["heldout"] if cfg.opd.eval_every else None,
        reward_fn=toy_reward_fn(world, cfg.task),
    )
    t0 = time.perf_counter()
    history = trainer.train()
    return trainer.accelerator.unwrap_model(trainer.model), history, time.perf_counter() - t0


def opd_config(world: ToyWorld, cfg: ToyRunConfig, checkpoint_dir: Optional[str | Path] = None) -> OPDConfig:
    """The :class:`~sparse_opd_peft.opd.OPDConfig` that :func:`opd_run` trains with: ``cfg.opd`` with
    ``max_new_tokens`` = the task's answer width + 2 and, with ``checkpoint_dir``, ``cfg.save_every`` snapshots
    there (a test checks that :func:`opd_run` uses exactly this)."""
    if cfg.task not in world.tasks:
        raise ValueError(f"task {cfg.task!r} is not in the toy world (has {sorted(world.tasks)})")
    return replace(
        cfg.opd,
        max_new_tokens=world.tasks[cfg.task].answer_width + 2,
        save_every=cfg.save_every if checkpoint_dir else 0,
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
    )


def toy_reward_fn(world: ToyWorld, task: str):
    """The verifier reward :func:`opd_run` passes to the trainer for ``task``."""
    t = world.tasks[task]
    return lambda prompts, completions, answers: t.rewards(prompts, completions)


def opd_probe_run(
    student: torch.nn.Module, world: ToyWorld, cfg: ToyRunConfig, stops: list[int]
) -> tuple[torch.nn.Module, dict[int, dict[str, torch.Tensor]], dict[int, float], list[dict[str, float]]]:
    """The first ``max(stops)`` steps of the run ``cfg`` describes (same lr schedule over ``cfg.steps``, same
    rollouts), with the trainable state taken at every step in ``stops``: what a probe run before the full run
    costs and yields.

    Returns:
        ``(model, {stop: trainable_state_dict}, {stop: cumulative training seconds}, per-step history)``.
    """
    from ...opd import OPDTrainer, trainable_state_dict

    stops = sorted({int(s) for s in stops})
    if not stops or stops[0] < 1 or stops[-1] > cfg.opd.steps:
        raise ValueError(f"stops must be steps in [1, {cfg.opd.steps}], got {stops}")
    data = world.datasets[cfg.task]
    trainer = OPDTrainer(
        student, world.teacher, world.tokenizer, data["train"], opd_config(world, cfg.with_(eval_every=0)),
        reward_fn=toy_reward_fn(world, cfg.task),
    )  # fmt: skip
    states, seconds, spent = {}, {}, 0.0
    for stop in stops:
        t0 = time.perf_counter()
        trainer.train(max_steps=stop)
        spent += time.perf_counter() - t0
        model = trainer.accelerator.unwrap_model(trainer.model)
        states[stop], seconds[stop] = trainable_state_dict(model), spent
    return trainer.accelerator.unwrap_model(trainer.model), states, seconds, trainer.history


__all__ += ["opd_config", "opd_probe_run", "toy_reward_fn"]
