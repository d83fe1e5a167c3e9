"""``OPDTrainer``: on-policy distillation (and SFT / RLVR / mix controls) on ``accelerate``.

One optimizer step: take ``batch_size`` prompts (a seeded shuffle of the dataset; each process its slice), sample
``num_generations`` completions each (student, or teacher with ``off_policy``; seeded per sample), score them with
the teacher under ``no_grad`` (on the teacher's own device and dtype), then run the loss over completion tokens in
``grad_accum`` micro-batches, normalised by the global number of completion tokens, so that any process count and
micro-batching give the same update up to float rounding.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from . import losses as L
from .checkpoint import read_training_state, save_trainable_state, save_training_state
from .config import OPDConfig
from .rollout import (
    Rollout,
    build_completion_batch,
    decode_completions,
    generate_rollouts,
    model_device,
    sample_seed,
    unwrap_for_generation,
)
from .tokenizers import check_tokenizer_compat

__all__ = ["OPDTrainer", "RewardFn"]

RewardFn = Callable[[list[str], list[str], list[Any]], Sequence[float]]


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@dataclass
class _Batch:
    rollout: Rollout
    rewards: Optional[torch.Tensor]  # (N,)
    rlvr_adv: Optional[torch.Tensor]  # (N,)
    keep_scores: Optional[torch.Tensor]  # (N, C)
    teacher_lp: Optional[torch.Tensor] = None  # (N, C) cached by the baseline pre-pass
    opd_adv: Optional[torch.Tensor] = None  # (N, C) OPD advantages with the baseline subtracted (pre-pass)


class OPDTrainer:
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
        if cfg.loss == "sft" and not cols & {"completion", "answer"}:
            raise ValueError(f"loss='sft' needs a 'completion' (or 'answer') column, train_dataset has {sorted(cols)}")
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
        if cfg.loss == "topk_kl" and cfg.topk > self.vocab_size:
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
        self._keep_logits = {id(m): self._accepts_logits_to_keep(m) for m in (student, teacher) if m is not None}
        self._student_id = id(student)
        if teacher is not None:
            teacher.eval()
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

    @staticmethod
    def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
        try:
            return "logits_to_keep" in inspect.signature(_base_model(model).forward).parameters
        except (TypeError, ValueError):
            return False

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

    # ------------------------------------------------------------------ rollouts and scoring
    def _rewards(self, prompts: list[str], completions: list[str], answers: list[Any]) -> torch.Tensor:
        values = list(self.reward_fn(prompts, completions, answers))
        if len(values) != len(completions):
            raise ValueError(f"reward_fn returned {len(values)} rewards for {len(completions)} completions")
        out = torch.tensor([float(v) for v in values], dtype=torch.float32)
        if not torch.isfinite(out).all():
            raise ValueError(f"reward_fn returned non-finite rewards: {values}")
        return out

    def _make_batch(self, items: list[tuple[int, int]]) -> _Batch:
        cfg, dev, n = self.config, self.accelerator.device, self.config.num_generations
        prompts = [self._prompts[i] for _, i in items]
        if cfg.loss == "sft":
            comps = [self._completions[i] if self._completions else self._answers[i] for _, i in items]
            ro = build_completion_batch(self.tokenizer, prompts, [str(c) for c in comps], device=dev)
            return _Batch(ro, None, None, None)
        seeds = [sample_seed(cfg.seed, "rollout", pos, k) for pos, _ in items for k in range(n)]
        with nullcontext(self.teacher) if cfg.off_policy else self._generation_model() as sampler:
            ro = generate_rollouts(
                sampler, self.tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, num_generations=n,
                temperature=cfg.temperature, seeds=seeds, vocab_size=self.vocab_size,
            ).to(dev)  # fmt: skip
        rewards = adv = keep = None
        if self.reward_fn is not None:
            texts = decode_completions(self.tokenizer, ro, cfg.decode_skip_special_tokens)
            rep = lambda xs: [x for x in xs for _ in range(n)]  # noqa: E731
            rewards = self._rewards(rep(prompts), texts, rep([self._answers[i] for _, i in items])).to(dev)
            if cfg.needs_reward:
                adv = L.grpo_advantages(rewards, n, cfg.std_normalize)
        if cfg.token_keep == "random":
            width = ro.completion_ids.shape[1]
            gens = [
                torch.Generator().manual_seed(sample_seed(cfg.seed, "keep", pos, k))
                for pos, _ in items
                for k in range(n)
            ]
            keep = torch.stack([torch.rand(cfg.max_new_tokens, generator=g)[:width] for g in gens]).to(dev)
        return _Batch(ro, rewards, adv, keep)

    def _completion_logits(self, model: torch.nn.Module, ro: Rollout, key: int) -> torch.Tensor:
        """``(N, C, V')`` logits predicting the completion tokens (computed on ``model``'s device)."""
        dev = self.accelerator.device if key == self._student_id else model_device(model)
        width = ro.completion_ids.shape[1]
        kwargs = dict(
            input_ids=ro.input_ids.to(dev), attention_mask=ro.attention_mask.to(dev),
            position_ids=ro.position_ids.to(dev), use_cache=False,
        )  # fmt: skip
        if self._keep_logits.get(key):
            kwargs["logits_to_keep"] = width + 1
        out = model(**kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, -(width + 1) : -1]

    def _teacher_token_logprobs(self, ro: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """``(teacher logits (N, C, V') on the teacher's device, teacher log-probs (N, C) of the sampled tokens on the
        trainer's device)``, under ``no_grad``."""
        with torch.no_grad():
            t_logits = self._completion_logits(self.teacher, ro, id(self.teacher))
            ids = ro.completion_ids.to(t_logits.device)
            lp_t = L.token_logprobs(t_logits, ids, self.vocab_size, self.config.full_kl_chunk)
        return t_logits, lp_t.to(self.accelerator.device)

    def teacher_topk(self, ro: Rollout, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's ``config.topk`` largest log-probabilities ``(N, C, k)`` float32 and their token ids
        ``(N, C, k)`` int64 at every completion position of ``ro``: the only teacher signal ``loss="topk_kl"`` uses.
        Here from the local teacher's logits ``(N, C, V')``; a subclass may instead ask a teacher served by another
        process for the same two tensors."""
        return L.teacher_topk_logprobs(teacher_logits, self.config.topk, self.vocab_size, self.config.full_kl_chunk)

    def _opd_advantages(
        self, lp_s: torch.Tensor, lp_t: torch.Tensor, mask: torch.Tensor, keep_w: Optional[torch.Tensor]
    ) -> torch.Tensor:
        cfg = self.config
        return L.sampled_token_advantages(
            lp_s, lp_t, mask, cfg.discount, keep_w, cfg.sampled_token_clip, cfg.sampled_token_prefix_gamma
        )

    def _keep_weights(self, b: _Batch, gap: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        cfg = self.config
        if cfg.token_keep == "all":
            return None
        return L.token_keep_weights(gap, b.rollout.completion_mask, cfg.token_keep, cfg.token_keep_ratio, b.keep_scores)

    def _baseline_prepass(self, batches: list[_Batch]) -> None:
        """``OPDConfig.baseline == "position"``: the OPD advantages of every micro-batch (one extra no-grad student
        forward), minus the per-position leave-one-out mean over the *global* batch (all micro-batches and
        processes), cached in each batch with its teacher log-probs."""
        cfg, acc = self.config, self.accelerator
        width = cfg.max_new_tokens
        total = torch.zeros(width, dtype=torch.float64, device=acc.device)
        count = torch.zeros(width, dtype=torch.float64, device=acc.device)
        with torch.no_grad():
            for b in batches:
                ro, mask = b.rollout, b.rollout.completion_mask
                logits = self._completion_logits(self.model, ro, self._student_id)
                lp_s = L.token_logprobs(logits, ro.completion_ids, self.vocab_size, cfg.full_kl_chunk)
                del logits
                b.teacher_lp = self._teacher_token_logprobs(ro)[1]
                b.opd_adv = self._opd_advantages(lp_s, b.teacher_lp, mask, self._keep_weights(b, lp_s - b.teacher_lp))
                c = mask.shape[1]
                total[:c] += b.opd_adv.double().sum(0)
                count[:c] += mask.sum(0).double()
        both = acc.reduce(torch.cat([total, count]), "sum")
        total, count = both[:width], both[width:]
        for b in batches:
            mask = b.rollout.completion_mask
            b.opd_adv = (b.opd_adv - L.leave_one_out_baseline(b.opd_adv, mask, total, count)) * mask

    def _loss(self, b: _Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Summed (not yet normalised) loss of one micro-batch and its metric sums."""
        cfg, ro, v, dev = self.config, b.rollout, self.vocab_size, self.accelerator.device
        mask, ids = ro.completion_mask, ro.completion_ids
        logits = self._completion_logits(self.model, ro, self._student_id)
        lp_s = L.token_logprobs(logits, ids, v, cfg.full_kl_chunk)
        stats: dict[str, float] = {}
        lp_t = t_logits = None
        if self.teacher is not None and cfg.loss != "sft":
            if b.teacher_lp is not None and cfg.loss not in ("full_kl", "topk_kl"):
                lp_t = b.teacher_lp
            else:
                t_logits, lp_t = self._teacher_token_logprobs(ro)
            stats["kl"] = float(((lp_s.detach() - lp_t) * mask).sum())
        keep_w = self._keep_weights(b, None if lp_t is None else lp_s.detach() - lp_t)
        if cfg.loss == "full_kl":
            kl = L.full_reverse_kl(logits, t_logits.to(dev), mask, v, cfg.full_kl_chunk)
            stats["kl_exact"] = float(kl.detach().sum())
            loss = (kl * (keep_w if keep_w is not None else mask)).sum()
        elif cfg.loss == "topk_kl":
            top_lp, top_ids = self.teacher_topk(ro, t_logits)
            del t_logits
            kl = L.topk_reverse_kl(logits, top_lp.to(dev), top_ids.to(dev), mask, v, cfg.full_kl_chunk)
            stats["kl_topk"] = float(kl.detach().sum())
            loss = (kl * (keep_w if keep_w is not None else mask)).sum()
        elif cfg.loss == "sft":
            loss = L.policy_gradient_loss(lp_s, torch.ones_like(lp_s), mask, 1.0)
        elif cfg.loss == "rlvr":
            loss = L.policy_gradient_loss(lp_s, b.rlvr_adv, mask, 1.0)
        else:
            adv = b.opd_adv if b.opd_adv is not None else self._opd_advantages(lp_s, lp_t, mask, keep_w)
            if cfg.loss == "mix":
                adv = L.mix_advantages(adv, b.rlvr_adv, cfg.alpha, mask)
            loss = L.policy_gradient_loss(lp_s, adv, mask, 1.0)
        stats["loss"] = float(loss.detach())
        return loss, stats

    # ------------------------------------------------------------------ one optimizer step
    def _train_step(self) -> dict[str, float]:
        cfg, acc = self.config, self.accelerator
        t0 = time.perf_counter()
        items = self._items(self.step)
        chunks = [[items[i] for i in c.tolist()] for c in torch.arange(len(items)).tensor_split(cfg.grad_accum)]
        batches = [self._make_batch(c) for c in chunks]
        n_tok = sum(int(b.rollout.completion_mask.sum()) for b in batches)
        global_tok = float(acc.reduce(torch.tensor([float(n_tok)], device=acc.device), "sum").item())
        scale = acc.num_processes / global_tok
        lr = cfg.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        if cfg.baseline != "none" and cfg.loss in ("sampled_token", "mix"):
            self._baseline_prepass(batches)
        sums: dict[str, float] = {}
        for i, b in enumerate(batches):
            with acc.no_sync(self.model) if i < len(batches) - 1 else nullcontext():
                loss, stats = self._loss(b)
                acc.backward(loss * scale)
            for k, val in stats.items():
                sums[k] = sums.get(k, 0.0) + val
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self._step_metrics(batches, sums, global_tok, lr, grad_norm, time.perf_counter() - t0)

    def _step_metrics(
        self, batches: list[_Batch], sums: dict, global_tok: float, lr: float, grad_norm, dt: float
    ) -> dict:
        acc = self.accelerator
        eos_id = self.tokenizer.eos_token_id
        rows = sum(b.rollout.completion_ids.shape[0] for b in batches)
        eos = sum(int(b.rollout.ended_with_eos(eos_id).sum()) for b in batches)
        rew = [b.rewards for b in batches if b.rewards is not None]
        keys = sorted(sums)
        vec = [sums[k] for k in keys] + [float(rows), float(eos)]
        if rew:
            r = torch.cat(rew)
            vec += [float(r.sum()), float((r >= 1.0).sum())]
        tot = acc.reduce(torch.tensor(vec, dtype=torch.float64, device=acc.device), "sum").tolist()
        out: dict[str, float] = {"step": self.step + 1, "lr": lr}
        for k, val in zip(keys, tot, strict=False):
            out[k] = val / global_tok
        rows_g, eos_g = tot[len(keys)], tot[len(keys) + 1]
        if rew:
            out["reward"], out["accuracy"] = tot[len(keys) + 2] / rows_g, tot[len(keys) + 3] / rows_g
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        out.update(
            completion_length=global_tok / rows_g, eos_rate=eos_g / rows_g, tokens_per_s=global_tok / max(dt, 1e-9)
        )
        return out

    # ------------------------------------------------------------------ public API
    def train(self, resume_from: Optional[str] = None, max_steps: Optional[int] = None) -> list[dict[str, float]]:
        """Run until ``config.steps`` (or until global step ``max_steps``, e.g. to simulate an interrupted run).

        Args:
            resume_from: a directory written by :meth:`save_state`, or ``"latest"`` for ``checkpoint_dir/state``.
            max_steps: stop once this many steps are done in total (the lr schedule still follows ``config.steps``).

        Returns:
            ``self.history``: one dict per step (``step``, ``loss``, ``lr``, ``grad_norm``, ``kl`` (teacher reverse-KL
            estimate per token), ``kl_exact`` (full_kl), ``kl_topk`` (topk_kl), ``reward`` / ``accuracy`` (with ``reward_fn``),
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
