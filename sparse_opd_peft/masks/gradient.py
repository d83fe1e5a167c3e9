"""Gradient-statistics mask predictor: per-coordinate statistics of the OPD gradient over a few batches at the
anchor (the weights never move) - ``Σ|g|``, ``Σg²``, Adam's bias-corrected second moment, ``|Σg|``, the sign
consistency ``|Σg| / sqrt(n·Σg²)`` and the update Adam would take at frozen weights - and the mask of one of them
(:func:`gradient_mask`, through :func:`~.predictors.mask_from_scores`)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..diagnostics.sources import ModuleSource, module_name, select_weights
from .mask import SparseMask
from .predictors import ScoreMap, mask_from_scores

__all__ = ["STATISTICS", "GradientStatistics", "gradient_mask", "gradient_statistics"]

STATISTICS = ("abs", "sq", "adam_v", "net", "snr", "adam_update")
# accumulators each statistic needs: sum Σg, abs Σ|g|, sq Σg², m / v Adam's EMAs, upd Σ m̂/(√v̂ + eps)
_NEEDS = {"abs": ("abs",), "sq": ("sq",), "adam_v": ("v",), "net": ("sum",), "snr": ("sum", "sq"),
          "adam_update": ("m", "v", "upd")}  # fmt: skip


@dataclass
class GradientStatistics:
    """Accumulated per-coordinate gradient statistics of a few OPD batches at fixed weights.

    Attributes:
        accumulators: ``{kind: {module: float32 (out, in)}}`` with kinds ``sum`` (Σg), ``abs`` (Σ|g|), ``sq`` (Σg²),
            ``m`` / ``v`` (Adam's EMAs after ``batches`` steps, not bias-corrected) and ``upd`` (Σ_t m̂_t/(√v̂_t+eps)).
        batches: number of gradients accumulated. betas, eps: the Adam constants used for ``m``, ``v``, ``upd``.
        seconds: wall-clock of the probe (rollouts, teacher scoring, backward).
        history: the trainer's per-batch metrics (loss, kl, ...).
    """

    accumulators: dict[str, ScoreMap]
    batches: int
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)

    def score(self, statistic: str) -> ScoreMap:
        """Score map of one statistic (float32 (out, in) per module; larger = more update expected).

        ``abs`` Σ|g|, ``sq`` Σg², ``adam_v`` v / (1 - β2^n), ``net`` |Σg|, ``snr`` |Σg| / sqrt(n·Σg²) in [0, 1]
        (1 = the same sign and size every batch), ``adam_update`` |Σ_t m̂_t / (√v̂_t + eps)| (the distance Adam
        would move each coordinate per unit lr if the gradients stayed these).
        """
        if statistic not in STATISTICS:
            raise ValueError(f"unknown gradient statistic {statistic!r}; use one of {', '.join(STATISTICS)}")
        missing = [k for k in _NEEDS[statistic] if k not in self.accumulators]
        if missing:
            raise ValueError(f"statistic {statistic!r} needs accumulators {missing}; collect it in gradient_statistics")
        acc, n = self.accumulators, self.batches
        if statistic in ("abs", "sq"):
            return {k: v.clone() for k, v in acc[statistic].items()}
        if statistic == "adam_v":
            return {k: v / (1 - self.betas[1] ** n) for k, v in acc["v"].items()}
        if statistic == "net":
            return {k: v.abs() for k, v in acc["sum"].items()}
        if statistic == "adam_update":
            return {k: v.abs() for k, v in acc["upd"].items()}
        return {k: torch.where(q > 0, s.abs() / (n * q).clamp_min(1e-45).sqrt(), torch.zeros_like(s))
                for (k, s), q in zip(acc["sum"].items(), acc["sq"].values(), strict=True)}  # fmt: skip

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat ``{"<kind>::<module>": tensor}`` (for ``safetensors.torch.save_file``)."""
        return {f"{k}::{n}": t.contiguous() for k, d in self.accumulators.items() for n, t in d.items()}

    @classmethod
    def from_state_dict(cls, tensors: Mapping[str, torch.Tensor], batches: int, **kwargs: Any) -> GradientStatistics:
        """Inverse of :meth:`state_dict` (``batches`` and the other fields are passed back explicitly)."""
        acc: dict[str, ScoreMap] = {}
        for key, t in tensors.items():
            kind, sep, name = key.partition("::")
            if not sep:
                raise ValueError(f"gradient-statistics tensor {key!r} is not named '<kind>::<module>'")
            acc.setdefault(kind, {})[name] = t
        return cls(acc, int(batches), **kwargs)


class _Recorder(torch.optim.Optimizer):
    """An "optimizer" that accumulates gradient statistics of the tracked weights and never changes a weight."""

    def __init__(self, params: list[torch.nn.Parameter], tracked: dict[int, str], kinds: set[str], betas, eps):
        super().__init__(params, {"lr": 0.0})
        self.tracked, self.kinds, self.betas, self.eps, self.t = tracked, kinds, betas, eps, 0
        self.acc: dict[str, ScoreMap] = {k: {} for k in kinds}

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):  # noqa: D102
        self.t += 1
        b1, b2 = self.betas
        for group in self.param_groups:
            for p in group["params"]:
                name = self.tracked.get(id(p))
                if name is None:
                    continue
                g = p.grad.detach().float().cpu() if p.grad is not None else torch.zeros(p.shape)
                for d in self.acc.values():  # created once, at the weight's first step (not a zero tensor per call)
                    if name not in d:
                        d[name] = torch.zeros(p.shape)
                a = {k: d[name] for k, d in self.acc.items()}
                if "sum" in a:
                    a["sum"] += g
                if "abs" in a:
                    a["abs"] += g.abs()
                if "sq" in a:
                    a["sq"] += g * g
                if "m" in a:
                    a["m"].mul_(b1).add_(g, alpha=1 - b1)
                if "v" in a:
                    a["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                if "upd" in a:
                    m_hat, v_hat = a["m"] / (1 - b1**self.t), a["v"] / (1 - b2**self.t)
                    a["upd"] += m_hat / (v_hat.sqrt() + self.eps)
        return None


def gradient_statistics(
    student: torch.nn.Module,
    teacher: Optional[torch.nn.Module],
    tokenizer,
    train_dataset,
    config,
    *,
    batches: int,
    modules: str | Iterable[str] | None = None,
    statistics: Sequence[str] = STATISTICS,
    reward_fn=None,
    eps: float = 1e-8,
    progress: bool = False,
) -> GradientStatistics:
    """Collect OPD gradient statistics over the first ``batches`` batches of a planned run, at the anchor.

    Runs :class:`~sparse_opd_peft.opd.OPDTrainer` for ``batches`` steps with ``config`` (same rollouts, teacher
    scoring, loss, token normalisation and gradient clipping as that run's first steps) but with an optimizer that
    only records the (clipped) gradients: the student's weights never change, so every batch is scored at W0.

    Args:
        student: a plain causal LM (not PEFT-wrapped) whose selected weights require grad.
        teacher, tokenizer, train_dataset, reward_fn: as for ``OPDTrainer``.
        config: the :class:`~sparse_opd_peft.opd.OPDConfig` of the planned run (``steps`` / checkpoints / eval /
            trackers are overridden; ``adam_betas`` set the Adam statistics).
        batches: number of batches (>= 1); each costs about one OPD step without the optimizer update.
        modules: None (block Linear layers), a regex or a list of module names (as in the mask builders).
        statistics: which of :data:`STATISTICS` to make available (fewer = less memory; all need at most 5 float32
            accumulators per coordinate).
        eps: Adam's epsilon for ``adam_update``.

    Returns:
        :class:`GradientStatistics` with float32 (out, in) accumulators per selected module.
    """
    from ..opd import OPDConfig, OPDTrainer

    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"batches must be an integer >= 1, got {batches!r}")
    if not isinstance(config, OPDConfig):
        raise ValueError(f"config must be an OPDConfig, got {type(config).__name__}")
    unknown = [s for s in statistics if s not in STATISTICS]
    if unknown or not statistics:
        raise ValueError(f"statistics must be a non-empty subset of {list(STATISTICS)}, got {list(statistics)}")
    kinds = {k for s in statistics for k in _NEEDS[s]}
    src = ModuleSource(student)  # raises for PEFT-wrapped students
    names = select_weights(src, modules)
    params = dict(student.named_parameters())
    frozen = [n for n in names if not params[n].requires_grad]
    if frozen:
        raise ValueError(f"weights {frozen[:3]} do not require grad; set requires_grad=True to probe their gradients")
    tracked = {id(params[n]): module_name(n) for n in names}
    cfg = dataclasses.replace(config, steps=batches, save_every=0, checkpoint_dir=None, eval_every=0,
                              report_to=None, progress_bar=progress)  # fmt: skip
    betas = tuple(cfg.adam_betas)

    class _Probe(OPDTrainer):
        def _build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
            trainable = [p for p in model.parameters() if p.requires_grad]
            return _Recorder(trainable, tracked, kinds, betas, eps)

    before = {n: params[n].detach().clone() for n in names[:1]}
    trainer = _Probe(student, teacher, tokenizer, train_dataset, cfg, reward_fn=reward_fn)
    t0 = time.perf_counter()
    history = trainer.train()
    seconds = time.perf_counter() - t0
    for n, w in before.items():  # the recorder never writes; guard against a future trainer that would
        if not torch.equal(w, params[n].detach()):
            raise RuntimeError(f"gradient_statistics changed weight '{n}'; the probe must not update the student")
    acc = trainer.optimizer.optimizer.acc if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer.acc
    for kind in kinds:  # a module whose gradient never arrived (unused) scores 0
        for n in names:
            acc[kind].setdefault(module_name(n), torch.zeros(params[n].shape))
    return GradientStatistics(acc, batches, betas, eps, seconds, history)


def gradient_mask(stats: GradientStatistics, density: float, statistic: str = "sq", **kwargs: Any) -> SparseMask:
    """Top-``density`` coordinates of one gradient statistic (``kwargs``: ``ffn_share``, ``per_module``, ...)."""
    meta = {"predictor": "gradient", "statistic": statistic, "batches": stats.batches}
    return mask_from_scores(stats.score(statistic), density, metadata=meta, **kwargs)
