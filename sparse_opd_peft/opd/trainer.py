"""``OPDTrainer``: on-policy distillation (and SFT / RLVR / mix controls) on ``accelerate``.

One optimizer step: take ``batch_size`` prompts (a seeded shuffle of the dataset; each process its slice), sample
``num_generations`` completions each (student, or teacher with ``off_policy``; seeded per sample), score them with
the teacher under ``no_grad`` (on the teacher's own device and dtype), then run the loss over completion tokens in
``grad_accum`` micro-batches, normalised by the global number of completion tokens, so that any process count and
micro-batching give the same update up to float rounding.

This module holds the set-up and the loop (train, evaluate, save / resume); one step's logic is
:mod:`.step` (rollouts, the loss spec's teacher signal, the loss, the update, the metrics) and the models are run
by :mod:`.scoring` (hidden states and lm_head, so that no ``(N, C, V)`` logits are built).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .checkpoint import read_training_state, save_trainable_state, save_training_state
from .config import OPDConfig
from .rollout import decode_completions, generate_rollouts, model_device, sample_seed, unwrap_for_generation
from .scoring import CompletionScorer
from .step import StepMixin
from .tokenizers import check_tokenizer_compat

__all__ = ["OPDTrainer", "RewardFn"]

RewardFn = Callable[[list[str], list[str], list[Any]], Sequence[float]]


class OPDTrainer(StepMixin):
    """Train a (plain or PEFT-wrapped) causal-LM student by on-policy distillation from a teacher.

    Args:
        student: causal LM; only parameters with ``requires_grad`` are trained (a PEFT model trains its adapter).
        teacher: causal LM sharing the tokenizer (any device / dtype, may be 8/4-bit); None for ``sft`` / ``rlvr``.
        tokenizer: the student's tokenizer (needs an EOS; prompts are left-padded).
        train_dataset: ``datasets.Dataset`` with a ``prompt`` column, ``answer`` for rewards, and ``completion`` (or
            ``answer``) for ``sft``.
        config: :class:`OPDConfig`.
        eval_dataset: held-out prompts for greedy evaluation (with ``reward_fn``).
        reward_fn: ``reward_fn(prompts, completions, answers) -> list[float]`` (one per completion; completions are
            decoded up to and including EOS). Required for ``rlvr`` / ``mix``; used for metrics otherwise.
        teacher_tokenizer: checked against ``tokenizer`` with :func:`check_tokenizer_compat` when given.
        accelerator: an ``Accelerator`` (default: a new one with ``config.report_to`` trackers). Its
            ``gradient_accumulation_steps`` must be 1 (the trainer accumulates ``config.grad_accum`` itself).
    """

    def __init__(
        self,
        student: torch.nn.Module,
        teacher: Optional[torch.nn.Module],
        tokenizer: PreTrainedTokenizerBase,
        train_dataset: Dataset,
        config: Optional[OPDConfig] = None,
        eval_dataset: Optional[Dataset] = None,
        reward_fn: Optional[RewardFn] = None,
        teacher_tokenizer: Optional[PreTrainedTokenizerBase] = None,
        accelerator: Optional[Accelerator] = None,
    ):
        cfg = self.config = config if config is not None else OPDConfig()
        if not isinstance(cfg, OPDConfig):
            raise ValueError(f"config must be an OPDConfig, got {type(cfg).__name__}")
        if cfg.needs_teacher and teacher is None:
            raise ValueError(f"loss={cfg.loss!r} (off_policy={cfg.off_policy}) needs a teacher model; pass teacher=...")
        if cfg.needs_reward and reward_fn is None:
            raise ValueError(f"loss={cfg.loss!r} needs reward_fn(prompts, completions, answers) -> list[float]")
        cols = set(train_dataset.column_names)
        if "prompt" not in cols:
            raise ValueError(f"train_dataset needs a 'prompt' column, has {sorted(cols)}")
        if not cfg.spec.rollouts and not cols & {"completion", "answer"}:
            raise ValueError(
                f"loss={cfg.loss!r} needs a 'completion' (or 'answer') column, train_dataset has {sorted(cols)}"
            )
        if len(train_dataset) == 0:
            raise ValueError("train_dataset is empty")
        if cfg.eval_every and (eval_dataset is None or reward_fn is None):
            raise ValueError(
                f"eval_every={cfg.eval_every} needs eval_dataset=... and reward_fn=...; or set eval_every=0"
            )
        if eval_dataset is not None and "prompt" not in eval_dataset.column_names:
            raise ValueError(f"eval_dataset needs a 'prompt' column, has {eval_dataset.column_names}")
        check_tokenizer_compat(tokenizer, teacher_tokenizer, student, teacher)
        acc = self.accelerator = accelerator or Accelerator(log_with=cfg.report_to, project_dir=cfg.logging_dir)
        if acc.gradient_accumulation_steps != 1:
            raise ValueError(
                f"the accelerator has gradient_accumulation_steps={acc.gradient_accumulation_steps}; keep it 1 and "
                "set OPDConfig.grad_accum instead (the trainer normalises by the global token count itself)"
            )
        if cfg.batch_size % acc.num_processes or cfg.batch_size // acc.num_processes < cfg.grad_accum:
            raise ValueError(
                f"batch_size={cfg.batch_size} prompts must split evenly over {acc.num_processes} processes and leave at "
                f"least grad_accum={cfg.grad_accum} prompts per process; use a multiple of {acc.num_processes}"
            )
        self.tokenizer, self.teacher, self.reward_fn = tokenizer, teacher, reward_fn
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.vocab_size = len(tokenizer)
        if cfg.spec.teacher == "topk" and cfg.topk > self.vocab_size:
            raise ValueError(
                f"OPDConfig.topk={cfg.topk} exceeds the vocabulary ({self.vocab_size} tokens); use topk <= "
                f"{self.vocab_size} (topk = vocabulary size is the exact full_kl)"
            )
        self._prompts = list(train_dataset["prompt"])
        self._answers = list(train_dataset["answer"]) if "answer" in cols else [None] * len(self._prompts)
        self._completions = list(train_dataset["completion"]) if "completion" in cols else None
        self._perms: dict[int, torch.Tensor] = {}
        if not any(p.requires_grad for p in student.parameters()):
            raise ValueError("the student has no trainable parameters (requires_grad=False everywhere)")
        self.model, self.optimizer = acc.prepare(student, self._build_optimizer(student))
        self._student_scorer = CompletionScorer(self.model, student, acc.device)
        self._teacher_scorer = None
        if teacher is not None:
            teacher.eval()
            self._teacher_scorer = CompletionScorer(teacher, teacher, model_device(teacher))
        self.step = 0
        self.history: list[dict[str, float]] = []
        if cfg.report_to:
            acc.init_trackers(cfg.project_name, config=cfg.to_dict())

    # ------------------------------------------------------------------ setup helpers
    def _build_optimizer(self, student: torch.nn.Module) -> torch.optim.Optimizer:
        cfg = self.config
        decay, no_decay = [], []
        for _, mod in student.named_modules():
            for pname, p in mod.named_parameters(recurse=False):
                if p.requires_grad:
                    plain = pname.endswith("bias") or "norm" in type(mod).__name__.lower()
                    (no_decay if plain else decay).append(p)
        groups = [
            g
            for g in ({"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]
        ]
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas)

    def _items(self, step: int) -> list[tuple[int, int]]:
        """This process's ``(stream position, dataset row)`` pairs for ``step`` (seeded shuffle per epoch)."""
        cfg, acc, n = self.config, self.accelerator, len(self._prompts)
        per = cfg.batch_size // acc.num_processes
        start = step * cfg.batch_size + acc.process_index * per
        out = []
        for pos in range(start, start + per):
            epoch, j = divmod(pos, n)
            if epoch not in self._perms:
                gen = torch.Generator().manual_seed(sample_seed(cfg.seed, "epoch", epoch))
                self._perms = {epoch: torch.randperm(n, generator=gen)}
            out.append((pos, int(self._perms[epoch][j])))
        return out

    def _generation_model(self):
        return unwrap_for_generation(self.accelerator, self.model)

    # ------------------------------------------------------------------ public API
    def train(self, resume_from: Optional[str] = None, max_steps: Optional[int] = None) -> list[dict[str, float]]:
        """Run until ``config.steps`` (or until global step ``max_steps``, e.g. to simulate an interrupted run).

        Args:
            resume_from: a directory written by :meth:`save_state`, or ``"latest"`` for ``checkpoint_dir/state``.
            max_steps: stop once this many steps are done in total (the lr schedule still follows ``config.steps``).

        Returns:
            ``self.history``: one dict per step (``step``, ``loss``, ``lr``, ``grad_norm``, ``kl`` (teacher reverse-KL
            estimate per token: the mean of ``log p_s(y) - log p_T(y)``; with topk_kl the mean log-ratio of the sampled
            token's bucket), ``kl_exact`` (full_kl), ``kl_topk`` (topk_kl), ``reward`` / ``accuracy`` (with ``reward_fn``),
            ``completion_length``, ``eos_rate``, ``tokens_per_s``, and ``eval_*`` on evaluation steps).
        """
        cfg, acc = self.config, self.accelerator
        if resume_from is not None:
            if resume_from == "latest":
                if not cfg.checkpoint_dir:
                    raise ValueError("resume_from='latest' needs OPDConfig.checkpoint_dir")
                resume_from = str(Path(cfg.checkpoint_dir) / "state")
            self.load_state(resume_from)
        end = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
        if cfg.save_every and self.step == 0:
            self.save_trainable_state(Path(cfg.checkpoint_dir) / "step_0.safetensors")
        bar = tqdm(total=cfg.steps, initial=self.step, desc=cfg.run_name or f"opd[{cfg.loss}]",
                   disable=not (cfg.progress_bar and acc.is_local_main_process))  # fmt: skip
        while self.step < end:
            metrics = self._train_step()
            self.step += 1
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                metrics.update(self.evaluate())
            self.history.append(metrics)
            acc.log(metrics, step=self.step)
            bar.update(1)
            bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "kl", "reward", "eval_accuracy") if k in metrics})
            if cfg.save_every and (self.step % cfg.save_every == 0 or self.step == cfg.steps):
                self.save_trainable_state(Path(cfg.checkpoint_dir) / f"step_{self.step}.safetensors")
                self.save_state(Path(cfg.checkpoint_dir) / "state")
        bar.close()
        if self.step >= cfg.steps and cfg.report_to:
            acc.end_training()
        return self.history

    @torch.no_grad()
    def evaluate(self, dataset: Optional[Dataset] = None, num_samples: Optional[int] = None) -> dict[str, float]:
        """Greedy held-out evaluation: ``eval_reward`` (mean reward), ``eval_accuracy`` (share of rewards >= 1),
        ``eval_completion_length`` and ``eval_eos_rate`` over the first ``num_samples`` (default
        ``config.eval_samples``) prompts, sharded over processes."""
        cfg, acc = self.config, self.accelerator
        ds = dataset if dataset is not None else self.eval_dataset
        if ds is None or self.reward_fn is None:
            raise ValueError("evaluate needs an eval dataset (eval_dataset=... or dataset=...) and a reward_fn")
        n = min(len(ds), num_samples or cfg.eval_samples)
        mine = list(range(acc.process_index, n, acc.num_processes))
        prompts = [ds[i]["prompt"] for i in mine]
        answers = [ds[i].get("answer") for i in mine]
        totals = torch.zeros(5, dtype=torch.float64)
        with self._generation_model() as model:
            totals += self._eval_sums(model, prompts, answers)
        tot = acc.reduce(totals.to(acc.device), "sum").tolist()
        cnt = max(tot[4], 1.0)
        return {"eval_reward": tot[0] / cnt, "eval_accuracy": tot[1] / cnt,
                "eval_completion_length": tot[2] / cnt, "eval_eos_rate": tot[3] / cnt}  # fmt: skip

    def _eval_sums(self, model: torch.nn.Module, prompts: list[str], answers: list[Any]) -> torch.Tensor:
        cfg = self.config
        totals = torch.zeros(5, dtype=torch.float64)
        for s in range(0, len(prompts), cfg.eval_batch_size):
            p, a = prompts[s : s + cfg.eval_batch_size], answers[s : s + cfg.eval_batch_size]
            ro = generate_rollouts(model, self.tokenizer, p, max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
                                   greedy=True, vocab_size=self.vocab_size)  # fmt: skip
            r = self._rewards(p, decode_completions(self.tokenizer, ro, cfg.decode_skip_special_tokens), a)
            totals += torch.tensor([float(r.sum()), float((r >= 1.0).sum()), float(ro.lengths.sum()),
                                    float(ro.ended_with_eos(self.tokenizer.eos_token_id).sum()), float(len(p))],
                                   dtype=torch.float64)  # fmt: skip
        return totals

    def save_trainable_state(self, path: str | Path) -> None:
        """Write the student's :func:`trainable_state_dict` to ``path`` (safetensors; call on every process)."""
        save_trainable_state(self.accelerator, self.model, path, self.step)

    def save_state(self, output_dir: str | Path) -> None:
        """Resumable, pickle-free state (layout in :mod:`.checkpoint`): the trainable parameters, the optimizer and
        RNG states (safetensors + JSON) with step, history and config. Call on every process; the main process
        writes (every process its own RNG files)."""
        payload = {"step": self.step, "history": self.history, "config": self.config.to_dict()}
        save_training_state(self.accelerator, self.model, self.optimizer, output_dir, payload)

    def load_state(self, input_dir: str | Path) -> None:
        """Restore a :meth:`save_state` directory on every process (``ValueError`` when it is not one, is incomplete
        or damaged, does not fit the student / optimizer, or was written with a config that changes the trajectory:
        only bookkeeping fields such as ``steps`` or ``eval_every`` may differ). Nothing changes on error."""
        from .checkpoint import load_training_state

        state = read_training_state(input_dir)
        diff = OPDConfig.from_dict(state["config"]).trajectory_diff(self.config)
        if diff:
            detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"cannot resume from {input_dir}: the config differs in {detail}; resume with the saved values"
            )
        load_training_state(self.accelerator, self.model, self.optimizer, input_dir)
        self.step = int(state["step"])
        self.history = [dict(h) for h in state["history"]]
