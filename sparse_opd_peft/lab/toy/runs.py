"""One OPD run on the toy world, and held-out accuracy: the building block of the demo and the benchmarks.

The defaults are the recipe measured to learn on the default toy world (see README "OPD on the toy world"):
``full_kl`` (exact reverse KL over the 20-token vocabulary at every visited prefix), AdamW lr 1e-3 with 10 warm-up
steps and linear decay, 64 prompts per step. The per-token ``sampled_token`` estimator of the same gradient is
unbiased but, with a teacher that puts 10-18 nats between its answer and a wrong digit, its variance at 64
samples per step destabilises the first steps; it is measured side by side in ``benchmarks/bench_opd_masks.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch

from .evaluate import evaluate_accuracy
from .world import ToyWorld

__all__ = ["ToyRunConfig", "heldout_accuracy", "opd_run"]


@dataclass(frozen=True)
class ToyRunConfig:
    """Settings of one toy OPD run (mapped onto :class:`~sparse_opd_peft.opd.OPDConfig`).

    Attributes:
        task: toy task name (``"add"`` / ``"sub"``).
        loss: any ``OPDConfig.loss`` (``"full_kl"``, ``"sampled_token"``, ``"sft"``, ``"rlvr"``, ``"mix"``).
        lr, steps, batch_size, warmup_steps, optimizer, seed: as in ``OPDConfig`` (linear decay to 0).
        num_generations: samples per prompt (``rlvr`` / ``mix`` need >= 2).
        token_keep, token_keep_ratio, off_policy, alpha: the papers' controls, as in ``OPDConfig`` (token
            sparsification, teacher rollouts, the OPD / RLVR mix weight of ``loss="mix"``).
        save_every: trainable-state snapshots every this many steps (0 = none) into ``checkpoint_dir``.
        eval_every: held-out accuracy every this many steps on ``eval_samples`` prompts (0 = never).
        progress: progress bar. run_name: its label (default ``opd[<loss>]``).
    """

    task: str = "add"
    loss: str = "full_kl"
    lr: float = 1e-3
    steps: int = 250
    batch_size: int = 64
    warmup_steps: int = 10
    optimizer: str = "adamw"
    seed: int = 0
    num_generations: int = 1
    token_keep: str = "all"
    token_keep_ratio: float = 1.0
    off_policy: bool = False
    alpha: float = 0.5
    save_every: int = 0
    eval_every: int = 0
    eval_samples: int = 500
    progress: bool = True
    run_name: Optional[str] = None

    def with_(self, **changes: Any) -> ToyRunConfig:
        """A copy with ``changes`` applied."""
        return replace(self, **changes)


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
) -> tuple[torch.nn.Module, list[dict[str, float]], float]:
    """Train ``student`` (plain, LoRA- or SparseOPD-wrapped) on ``cfg.task`` with the world's teacher.

    Returns:
        ``(trained model (unwrapped from accelerate), per-step history, wall-clock seconds)``.
    """
    from ...opd import OPDTrainer

    config = opd_config(world, cfg, checkpoint_dir)
    data = world.datasets[cfg.task]
    trainer = OPDTrainer(
        student,
        world.teacher,
        world.tokenizer,
        data["train"],
        config,
        eval_dataset=data["heldout"] if cfg.eval_every else None,
        reward_fn=toy_reward_fn(world, cfg.task),
    )
    t0 = time.perf_counter()
    history = trainer.train()
    return trainer.accelerator.unwrap_model(trainer.model), history, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------------
# Added for the study's predictor / savings sections: the OPDConfig of a toy run, and its first steps only.


def opd_config(world: ToyWorld, cfg: ToyRunConfig, checkpoint_dir: Optional[str | Path] = None):
    """The :class:`~sparse_opd_peft.opd.OPDConfig` that :func:`opd_run` builds for ``cfg`` (same mapping; a test
    checks the two stay equal)."""
    from ...opd import OPDConfig

    if cfg.task not in world.tasks:
        raise ValueError(f"task {cfg.task!r} is not in the toy world (has {sorted(world.tasks)})")
    return OPDConfig(
        loss=cfg.loss, lr=cfg.lr, lr_schedule="linear", warmup_steps=cfg.warmup_steps, optimizer=cfg.optimizer,
        steps=cfg.steps, batch_size=cfg.batch_size, num_generations=cfg.num_generations,
        token_keep=cfg.token_keep, token_keep_ratio=cfg.token_keep_ratio, off_policy=cfg.off_policy, alpha=cfg.alpha,
        max_new_tokens=world.tasks[cfg.task].answer_width + 2, seed=cfg.seed, progress_bar=cfg.progress, run_name=cfg.run_name,
        save_every=cfg.save_every if checkpoint_dir else 0,
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
        eval_every=cfg.eval_every, eval_samples=cfg.eval_samples,
    )  # fmt: skip


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
    if not stops or stops[0] < 1 or stops[-1] > cfg.steps:
        raise ValueError(f"stops must be steps in [1, {cfg.steps}], got {stops}")
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
