"""``OPDConfig``: every knob of an on-policy-distillation (and SFT / RLVR / mix) run, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Optional, Union

from ..choices import BASELINES, LOSSES, LR_SCHEDULES, OPTIMIZERS, TOKEN_KEEP  # noqa: F401 - re-exported
from .losses.registry import LOSS_SPECS, LossSpec

# Fields that change neither the trajectory nor the final weights: they may differ between a run and its resume.
RESUME_FREE_FIELDS = (
    "steps",
    "eval_every",
    "eval_samples",
    "eval_batch_size",
    "eval_max_new_tokens",
    "save_every",
    "checkpoint_dir",
    "report_to",
    "project_name",
    "logging_dir",
    "progress_bar",
    "run_name",
)


@dataclass
class OPDConfig:
    """Configuration of :class:`~sparse_opd_peft.opd.OPDTrainer`.

    Objective (``loss``), which to use when (measured on the toy world: ``benchmarks/results/estimators.md``):
        ``"full_kl"`` (default): exact reverse KL ``Σ_v p_s(v)(log p_s(v) - log p_T(v))`` at every visited prefix,
        computed ``full_kl_chunk`` completion tokens at a time from the student's and the teacher's hidden states and
        lm_heads (:func:`~sparse_opd_peft.opd.losses.head_objectives`: memory ``O(full_kl_chunk · V)``, no
        ``(N, T, V)`` tensor in the forward or the backward pass; a model whose logits are not exactly its
        ``nn.Linear`` head's output is scored from its logits instead). Needs the teacher model in the training
        process. The lowest-variance choice: use it whenever it fits.
        ``"topk_kl"``: reverse KL against the teacher's ``topk`` largest log-probs with the rest of the vocabulary
        as one tail bucket, ``Σ_{v∈K} p_s(v)(log p_s(v) - log p_T(v)) + q_s (log q_s - log q_T)`` (``q = 1 - Σ_{v∈K}
        p(v)``); the teacher side is only ``(N, T, k)`` log-probs and ids (:meth:`OPDTrainer.teacher_topk`), what a
        teacher served by another process returns. ``topk`` = vocabulary size is ``full_kl``.
        ``"sampled_token"``: per completion token ``A_t = -(log p_s(y_t) - log p_T(y_t))`` (detached; with
        ``discount > 0`` the discounted future sum ``Σ_{t'≥t} γ^{t'-t} A_t'``), loss ``-Σ A_t log p_s(y_t) / N``:
        needs only the teacher's log-prob of each sampled token, but is the noisiest. Variance reductions:
        ``sampled_token_baseline="position"`` (the default for ``sampled_token``; ``None`` picks it, and ``"none"``
        for ``mix``) subtracts from ``A_t`` the mean advantage at the same completion position over the global
        batch's other rows (unbiased; one extra no-grad student forward per step); ``sampled_token_clip=c`` bounds the log-ratio to ``[-c, c]`` (verl's clamp; biased);
        ``sampled_token_prefix_gamma=γ`` weights token ``t`` by IW-OPD's ``1 + γ(1 - Σ_{j<t}|A_j| / Σ_j |A_j|)``.
        ``sampled_token_baseline="none"``, ``sampled_token_clip=None``, ``sampled_token_prefix_gamma=0`` is the plain
        estimator (tinker's, verl's k1). These three apply to ``sampled_token`` and ``mix`` only.
        ``"sft"``: cross-entropy on the dataset's completions (``completion`` column, else ``answer`` + EOS).
        ``"rlvr"``: GRPO with the verifier reward, group-normalised over the ``num_generations`` samples of a prompt.
        ``"mix"``: ``A = alpha·A_OPD + (1 - alpha)·A_RLVR`` (``A_OPD`` the sampled-token advantage).
        Every loss is normalised by the number of completion tokens of the whole (global) batch.

    Controls from the papers: ``token_keep`` (``"top_gap"`` keeps the ``token_keep_ratio`` share of a sample's
    completion tokens with the largest gap ``log p_s - log p_T``, ``"random"`` a uniform share; kept gaps are
    rescaled by ``T / Σ m``), ``off_policy`` (rollouts sampled from the teacher instead of the student).

    Batching: ``batch_size`` prompts per optimizer step (global, over all processes), each sampled
    ``num_generations`` times; ``grad_accum`` splits every process's share into that many micro-batches (memory only:
    the result does not depend on it up to float rounding). Rollouts are seeded per (seed, step, prompt, sample), so
    they do not depend on the number of processes, the micro-batching or a resume.

    Learning rate: ``lr`` (default 1e-3, the toy world's measured recipe with a small model or an adapter; full
    fine-tuning of a pretrained LLM wants ~1e-6 to 1e-5) with ``lr_schedule`` ``"linear"`` (decay to 0 at ``steps``, after ``warmup_steps`` of linear
    warm-up) or ``"constant"``. ``optimizer``: ``"adamw"`` (betas ``adam_betas``) or ``"sgd"`` (``momentum``).
    ``weight_decay`` applies to every trainable tensor except biases and normalisation weights.

    Bookkeeping: ``run_name`` names the progress bar (default ``opd[<loss>]``); ``eval_every`` steps (0 = never) greedy held-out reward / accuracy on ``eval_samples`` prompts;
    ``save_every`` steps (0 = never) a ``step_{k}.safetensors`` of the trainable state and a resumable
    ``checkpoint_dir/state`` (``accelerate`` state + step counter + history).
    """

    loss: str = "full_kl"
    sampled_token_clip: Optional[float] = None
    sampled_token_baseline: Optional[str] = None
    sampled_token_prefix_gamma: float = 0.0
    topk: int = 20
    alpha: float = 0.5
    discount: float = 0.0
    token_keep: str = "all"
    token_keep_ratio: float = 1.0
    off_policy: bool = False
    num_generations: int = 1
    temperature: float = 1.0
    max_new_tokens: int = 64
    grpo_std_normalize: Optional[bool] = None
    lr: float = 1e-3
    lr_schedule: str = "linear"
    warmup_steps: int = 0
    optimizer: str = "adamw"
    adam_betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 100
    seed: int = 0
    eval_every: int = 0
    eval_samples: int = 256
    eval_batch_size: int = 256
    eval_max_new_tokens: Optional[int] = None
    save_every: int = 0
    checkpoint_dir: Optional[str] = None
    full_kl_chunk: int = 128
    decode_skip_special_tokens: bool = False
    report_to: Optional[Union[str, list[str]]] = None
    project_name: str = "sparse_opd"
    logging_dir: Optional[str] = None
    progress_bar: bool = True
    run_name: Optional[str] = None

    def __post_init__(self) -> None:
        self._check_choices()
        self._check_counts()
        self._check_objective_numbers()
        self._check_sampled_token_options()
        self._check_optimizer()
        self._check_combinations()

    # -------------------------------------------------------------- validators, one topic each
    @staticmethod
    def _bad(name: str, value: Any, need: str) -> ValueError:
        return ValueError(f"OPDConfig.{name}={value!r} is invalid: {need}")

    def _check_choices(self) -> None:
        for name, allowed in (
            ("loss", LOSS_SPECS),
            ("token_keep", TOKEN_KEEP),
            ("lr_schedule", LR_SCHEDULES),
            ("optimizer", OPTIMIZERS),
        ):
            if getattr(self, name) not in allowed:
                raise self._bad(name, getattr(self, name), f"choose one of {list(allowed)}")

    def _check_counts(self) -> None:
        for name in ("num_generations", "max_new_tokens", "batch_size", "grad_accum", "steps", "full_kl_chunk", "topk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise self._bad(name, value, "must be an integer >= 1")
        for name in ("warmup_steps", "eval_every", "save_every", "eval_samples", "eval_batch_size", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise self._bad(name, value, "must be an integer >= 0")
        if self.eval_batch_size < 1:
            raise self._bad("eval_batch_size", self.eval_batch_size, "must be >= 1")
        if self.eval_max_new_tokens is not None and self.eval_max_new_tokens < 1:
            raise self._bad("eval_max_new_tokens", self.eval_max_new_tokens, "must be >= 1 or None (= max_new_tokens)")
        if self.batch_size < self.grad_accum:
            raise ValueError(
                f"OPDConfig: batch_size={self.batch_size} prompts cannot be split into grad_accum={self.grad_accum} "
                "micro-batches; use grad_accum <= batch_size"
            )
        if self.save_every > 0 and not self.checkpoint_dir:
            raise self._bad(
                "checkpoint_dir", self.checkpoint_dir, f"save_every={self.save_every} needs a checkpoint_dir"
            )

    def _check_objective_numbers(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise self._bad("alpha", self.alpha, "the mix weight must lie in [0, 1] (1 = pure OPD, 0 = pure RLVR)")
        if not 0.0 <= self.discount <= 1.0:
            raise self._bad("discount", self.discount, "the discount γ must lie in [0, 1] (0 = per-token advantage)")
        if not 0.0 < self.token_keep_ratio <= 1.0:
            raise self._bad("token_keep_ratio", self.token_keep_ratio, "the kept share ρ must lie in (0, 1]")
        if not self.temperature > 0.0:
            raise self._bad("temperature", self.temperature, "must be > 0 (rollouts are sampled)")

    def _check_sampled_token_options(self) -> None:
        clip = self.sampled_token_clip
        if clip is not None and (
            isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0.0 < clip < float("inf")
        ):
            raise self._bad(
                "sampled_token_clip",
                clip,
                "the bound on |log p_s - log p_T| per token must be a finite number > 0, or None (no clipping)",
            )
        if self.sampled_token_baseline is not None and self.sampled_token_baseline not in BASELINES:
            raise self._bad(
                "sampled_token_baseline",
                self.sampled_token_baseline,
                f"choose one of {list(BASELINES)}, or None (the loss's default)",
            )
        gamma = self.sampled_token_prefix_gamma
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma < float("inf"):
            raise self._bad(
                "sampled_token_prefix_gamma", gamma, "the IW-OPD prefix weight γ must be a finite number >= 0"
            )

    def _check_optimizer(self) -> None:
        if not self.lr > 0.0:
            raise self._bad("lr", self.lr, "must be > 0")
        if self.weight_decay < 0.0 or self.momentum < 0.0:
            raise ValueError(
                f"OPDConfig: weight_decay and momentum must be >= 0, got {self.weight_decay}, {self.momentum}"
            )
        if self.max_grad_norm is not None and not self.max_grad_norm > 0.0:
            raise self._bad("max_grad_norm", self.max_grad_norm, "must be > 0, or None to disable clipping")
        if len(tuple(self.adam_betas)) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise self._bad("adam_betas", self.adam_betas, "need two betas in [0, 1)")
        self.adam_betas = tuple(float(b) for b in self.adam_betas)

    def _check_combinations(self) -> None:
        """Options that have no meaning with the loss (read from its :class:`~.losses.LossSpec`)."""
        spec = self.spec
        with_teacher = [name for name, s in LOSS_SPECS.items() if s.teacher != "none"]
        if spec.reward and self.num_generations < 2:
            raise self._bad(
                "num_generations", self.num_generations, f"loss={self.loss!r} normalises rewards over a group: use >= 2"
            )
        if not spec.rollouts and (self.off_policy or self.num_generations != 1):
            raise ValueError(
                f"OPDConfig: loss={self.loss!r} trains on the dataset's completions (no rollouts): keep "
                "off_policy=False and num_generations=1"
            )
        if self.off_policy and spec.teacher == "none":
            raise ValueError(
                f"OPDConfig: off_policy=True (teacher rollouts) is an OPD control; use it with loss "
                f"{' / '.join(repr(n) for n in with_teacher)}, not {self.loss!r}"
            )
        if self.token_keep != "all" and spec.teacher == "none":
            raise self._bad(
                "token_keep", self.token_keep, f"token sparsification needs a teacher signal, not loss={self.loss!r}"
            )
        if self.discount > 0.0 and not spec.advantages:
            with_adv = " / ".join(repr(n) for n, s in LOSS_SPECS.items() if s.advantages)
            raise self._bad(
                "discount", self.discount, f"the discounted future sum applies to {with_adv}, not {self.loss!r}"
            )

    @property
    def spec(self) -> LossSpec:
        """The :class:`~sparse_opd_peft.opd.losses.LossSpec` of ``loss``: its teacher signal, reward, gradient."""
        return LOSS_SPECS[self.loss]

    @property
    def needs_teacher(self) -> bool:
        """Whether the loss (or an off-policy rollout) uses the teacher."""
        return self.spec.teacher != "none" or self.off_policy

    @property
    def needs_reward(self) -> bool:
        """Whether the loss uses the verifier reward."""
        return self.spec.reward

    @property
    def baseline(self) -> str:
        """The sampled-token baseline in force: ``sampled_token_baseline``, or by default ``"position"`` for
        ``sampled_token`` (the variance reduction that learns on the toy world) and ``"none"`` for ``mix`` (the
        paper's α-mix recipe, raw OPD advantages)."""
        if self.sampled_token_baseline is not None:
            return self.sampled_token_baseline
        return self.spec.default_baseline

    @property
    def std_normalize(self) -> bool:
        """GRPO reward normalisation: divide by the group std (default for ``rlvr``; raw centred rewards for ``mix``,
        as in the paper's α-mixing runs)."""
        if self.grpo_std_normalize is not None:
            return bool(self.grpo_std_normalize)
        return self.spec.std_normalize

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then constant or linear decay to 0."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return self.lr
        return self.lr * max(0.0, (self.steps - step) / max(1, self.steps - self.warmup_steps))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of all fields."""
        out = asdict(self)
        out["adam_betas"] = list(self.adam_betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OPDConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise a ``ValueError`` naming them. A dict without
        ``sampled_token_baseline`` (saved before that field existed) gets ``"none"``, the estimator it ran with."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown OPDConfig fields {unknown}; known fields: {sorted(known)}")
        if "sampled_token_baseline" not in data and "loss" in data:
            # written before the baseline existed: that run used the plain estimator, so resume it unchanged
            data = {**data, "sampled_token_baseline": "none"}
        return cls(**data)

    def trajectory_diff(self, other: OPDConfig) -> dict[str, tuple[Any, Any]]:
        """Fields (other than bookkeeping ones) whose values differ: ``{name: (self_value, other_value)}``."""
        a, b = self.to_dict(), other.to_dict()
        for d, c in ((a, self), (b, other)):  # the baseline in force (None and its loss's default are the same run)
            d["sampled_token_baseline"] = c.baseline if c.spec.advantages else None
        return {k: (a[k], b[k]) for k in a if k not in RESUME_FREE_FIELDS and a[k] != b[k]}
