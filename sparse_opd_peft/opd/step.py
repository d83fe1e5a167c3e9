"""One optimizer step of :class:`~sparse_opd_peft.opd.OPDTrainer`: rollouts, teacher signal, loss, update, metrics.

The objective's :class:`~.losses.LossSpec` says which teacher signal a micro-batch is scored with (the teacher's
whole distribution, its top-k log-probs through :meth:`StepMixin.teacher_topk`, its log-prob of each sampled token,
or none); the student's side always goes through :func:`~.losses.head_objectives` over the completion tokens only,
so with a plain ``lm_head`` no ``(N, C, V)`` tensor exists in the forward or the backward pass.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import losses as L
from .rollout import Rollout, build_completion_batch, decode_completions, generate_rollouts, sample_seed

__all__ = ["StepMixin"]


@dataclass
class _Batch:
    rollout: Rollout
    rewards: Optional[torch.Tensor]  # (N,)
    rlvr_adv: Optional[torch.Tensor]  # (N,)
    keep_scores: Optional[torch.Tensor]  # (N, C)
    teacher_lp: Optional[torch.Tensor] = None  # (N, C) cached by the baseline pre-pass
    opd_adv: Optional[torch.Tensor] = None  # (N, C) OPD advantages with the baseline subtracted (pre-pass)


def _f64(value: Any, device: torch.device) -> torch.Tensor:
    """``value`` (a number or a 0-d tensor) as a detached float64 0-d tensor on ``device`` (exact from float32 / bf16 /
    int, so sums of these equal the Python float sums of ``float(value)``)."""
    return torch.as_tensor(value, dtype=torch.float64).detach().to(device)


def _grid(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(M,)`` values at the True entries of the ``(N, C)`` ``mask`` -> ``(N, C)`` tensor, 0 elsewhere
    (differentiable)."""
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)


class StepMixin:
    """The step logic of :class:`~sparse_opd_peft.opd.OPDTrainer` (which sets the attributes used here)."""

    # ------------------------------------------------------------------ rollouts
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
        if not cfg.spec.rollouts:
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

    # ------------------------------------------------------------------ teacher signals
    def _teacher_hidden(self, ro: Rollout) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The teacher's :class:`~.scoring.CompletionScorer` output at the completion tokens of ``ro`` (``(M, H)``
        hidden states, or ``(M, V')`` logits, on the teacher's device) with its head, under ``no_grad``."""
        with torch.no_grad():
            x, w, b = self._teacher_scorer(ro)
            return x[ro.completion_mask.to(x.device)], w, b

    def _teacher_signal(
        self, ro: Rollout, k: Optional[int] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """:func:`~.losses.head_teacher_signal` of the local teacher at the completion tokens of ``ro`` (``(M,)``
        log-probs of the sampled tokens, and with ``k`` the ``(M, k)`` top-k log-probs and ids; on the teacher's
        device)."""
        x, w, b = self._teacher_hidden(ro)
        ids = ro.completion_ids[ro.completion_mask].to(x.device)
        return L.head_teacher_signal(x, w, b, ids, self.vocab_size, self.config.full_kl_chunk, k)

    def _teacher_token_logprobs(self, ro: Rollout) -> torch.Tensor:
        """``(N, C)`` float32 teacher log-probs of the sampled tokens on the trainer's device (0 outside the mask)."""
        lp = self._teacher_signal(ro)[0]
        return _grid(lp.float().to(self.accelerator.device), ro.completion_mask)

    def teacher_topk(self, ro: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's ``config.topk`` largest log-probabilities ``(N, C, k)`` float32 and their token ids ``(N, C, k)``
        int64 at the completion positions of ``ro``: the only teacher signal ``loss="topk_kl"`` reads. Here from the
        local teacher (block by block, no ``(N, C, V)`` tensor; entries outside ``completion_mask`` are unused and
        left 0); a subclass may instead ask a teacher served by another process for the same two tensors."""
        _, top_lp, top_id = self._teacher_signal(ro, self.config.topk)
        mask = ro.completion_mask.to(top_lp.device)
        n, c, k = *mask.shape, self.config.topk
        out_lp = top_lp.new_zeros((n, c, k))
        out_id = top_id.new_zeros((n, c, k))
        out_lp[mask], out_id[mask] = top_lp, top_id
        return out_lp, out_id

    def _keep_weights(self, b: _Batch, gap: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        cfg = self.config
        if cfg.token_keep == "all":
            return None
        return L.token_keep_weights(gap, b.rollout.completion_mask, cfg.token_keep, cfg.token_keep_ratio, b.keep_scores)

    # ------------------------------------------------------------------ the student's side
    def _student(self, ro: Rollout, teacher: dict, grad: tuple[str, ...]) -> L.HeadOutputs:
        """:func:`~.losses.head_objectives` of the student at the completion tokens, against ``teacher``
        (``teacher_logits=`` / ``teacher_topk=`` keyword arguments over the same ``M`` tokens, or empty)."""
        x, w, b = self._student_scorer(ro)
        mask = ro.completion_mask
        return L.head_objectives(
            x[mask], w, b, ro.completion_ids[mask], vocab_size=self.vocab_size, chunk_size=self.config.full_kl_chunk,
            grad=grad, **teacher,
        )  # fmt: skip

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
                lp_s = _grid(self._student(ro, {}, ()).logprobs, mask)
                b.teacher_lp = self._teacher_token_logprobs(ro)
                keep = self._keep_weights(b, lp_s - b.teacher_lp)
                b.opd_adv = L.LossInputs(
                    lp_s, None, b.teacher_lp, mask, keep, None, None, cfg
                ).sampled_token_advantages()
                c = mask.shape[1]
                total[:c] += b.opd_adv.double().sum(0)
                count[:c] += mask.sum(0).double()
        both = acc.reduce(torch.cat([total, count]), "sum")
        total, count = both[:width], both[width:]
        for b in batches:
            mask = b.rollout.completion_mask
            b.opd_adv = (b.opd_adv - L.leave_one_out_baseline(b.opd_adv, mask, total, count)) * mask

    def _loss(self, b: _Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Summed (not yet normalised) loss of one micro-batch and its metric sums (detached 0-d tensors, left on the
        device: :meth:`_train_step` reads them back once per step; an override may return Python floats)."""
        cfg, spec, ro = self.config, self.config.spec, b.rollout
        mask, dev = ro.completion_mask, self.accelerator.device
        signal = spec.teacher
        if signal == "none" and self.teacher is not None and spec.rollouts:
            signal = "token"  # a teacher at hand: report the KL estimate of an RLVR run too
        teacher: dict = {}
        lp_t = None
        if signal == "logits":
            x, w, bias = self._teacher_hidden(ro)
            teacher["teacher_logits"] = L.head_logits_fn(x, w, bias, dev, self.vocab_size)
        elif signal == "topk":
            top_lp, top_ids = self.teacher_topk(ro)
            teacher["teacher_topk"] = (top_lp.to(dev)[mask], top_ids.to(dev)[mask])
        elif signal == "token":
            lp_t = b.teacher_lp if b.teacher_lp is not None else self._teacher_token_logprobs(ro)
        out = self._student(ro, teacher, (spec.grad,))
        lp_s = _grid(out.logprobs, mask)
        div = None if out.divergence is None else _grid(out.divergence, mask)
        gap = _grid(out.gap, mask) if out.gap is not None else None if lp_t is None else (lp_s.detach() - lp_t) * mask
        keep = None if b.opd_adv is not None else self._keep_weights(b, gap)  # the pre-pass applied it already
        x = L.LossInputs(lp_s, div, lp_t, mask, keep, b.rlvr_adv, b.opd_adv, cfg)
        loss = spec.objective(x)
        stats = {"loss": loss.detach()}
        if gap is not None:
            stats["kl"] = gap.detach().sum()
        if div is not None:
            stats["kl_exact" if signal == "logits" else "kl_topk"] = div.detach().sum()
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
        if cfg.baseline != "none" and cfg.spec.advantages:
            self._baseline_prepass(batches)
        sums: dict[str, torch.Tensor] = {}  # float64 running sums on the device: no host sync per micro-batch
        for i, b in enumerate(batches):
            with acc.no_sync(self.model) if i < len(batches) - 1 else nullcontext():
                loss, stats = self._loss(b)
                acc.backward(loss * scale)
            for k, val in stats.items():
                sums[k] = sums.get(k, 0) + _f64(val, acc.device)
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self._step_metrics(batches, sums, global_tok, lr, grad_norm, time.perf_counter() - t0)

    def _step_metrics(
        self, batches: list[_Batch], sums: dict, global_tok: float, lr: float, grad_norm, dt: float
    ) -> dict:
        acc, dev = self.accelerator, self.accelerator.device
        eos_id = self.tokenizer.eos_token_id
        rows = sum(b.rollout.completion_ids.shape[0] for b in batches)
        eos = sum(b.rollout.ended_with_eos(eos_id).sum() for b in batches)
        rew = [b.rewards for b in batches if b.rewards is not None]
        keys = sorted(sums)
        vec = [sums[k] for k in keys] + [float(rows), eos]
        if rew:
            r = torch.cat(rew)
            vec += [r.sum(), (r >= 1.0).sum()]
        gn = [_f64(grad_norm, dev).reshape(1)] if isinstance(grad_norm, torch.Tensor) else []  # not reduced
        tot = torch.cat([acc.reduce(torch.stack([_f64(v, dev) for v in vec]), "sum"), *gn]).tolist()  # the one sync
        if gn:
            grad_norm = tot.pop()
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
