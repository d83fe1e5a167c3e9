"""The one declaration of the diagnostics metrics: what each is called, how it is shown and aggregated, and where.

:func:`~sparse_opd_peft.diagnostics.engine.aggregate` averages the ``"mean"`` metrics of :data:`METRICS`;
:mod:`~sparse_opd_peft.diagnostics.report` builds the columns of ``report.md``'s tables from the metrics ``shown``
there; :mod:`sparse_opd_peft.model_card` records the ``"card"`` ones (:func:`card_keys`);
:func:`~sparse_opd_peft.diagnostics.trajectory` and its report use :data:`TRAJECTORY_METRICS`. Every consumer
reads these tuples when it runs, so a metric declared here reaches all of them.

Adding a per-matrix metric is one :class:`Metric` entry here: give it ``compute`` (a function of the
:class:`MatrixView` of a weight pair, returning a float) and :func:`~sparse_opd_peft.diagnostics.analyze_matrix`
stores it in every row, ``aggregate`` averages it, and the report tables and the model card show it where
``shown`` says. A trajectory metric is one :class:`TrajectoryMetric` entry, with ``compute`` a function of the
singular values of ``ΔW_t``. The metrics declared without ``compute`` share passes over the matrix (bf16 masks,
SVDs) that :func:`~sparse_opd_peft.diagnostics.analyze_matrix` / :func:`trajectory` run once for all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import metrics as M

AGGREGATES = ("mean", "weighted", "energy")
PLACES = ("table1", "by_type", "by_layer", "card")


@dataclass(frozen=True)
class MatrixView:
    """What a metric's ``compute`` sees of one weight pair (all on the diagnostics device).

    Attributes:
        name: parameter name. w0, w1: (out, in) weights in their stored dtype. delta: (out, in) float64 ``w1 - w0``.
        visible: (out, in) bool mask of bf16-visible updates. sigma: descending float64 singular values of
            ``delta`` (None when the spectral metrics are off). config: the ``DiagnoseConfig``.
    """

    name: str
    w0: torch.Tensor
    w1: torch.Tensor
    delta: torch.Tensor
    visible: torch.Tensor
    sigma: Optional[torch.Tensor]
    config: Any


@dataclass(frozen=True)
class Metric:
    """One per-matrix diagnostics metric.

    Attributes:
        key: its key in the per-matrix rows and the summaries of ``report.json``.
        label: its column heading in ``report.md``.
        pct: shown as a percentage.
        aggregate: ``"mean"`` (per-matrix values averaged over matrices), ``"weighted"`` (parameter-count weighted,
            from the rows' counts) or ``"energy"`` (a share of ``Σ ‖ΔW‖_F²`` by module type).
        shown: where it appears: ``"table1"`` (the Table-1 line), ``"by_type"`` / ``"by_layer"`` (report.md's
            tables), ``"card"`` (the adapter model card's diagnostics).
        help: one line saying what it measures.
        compute: ``MatrixView -> float`` for a metric computed on its own, averaged over matrices (None: computed
            by ``analyze_matrix``'s shared passes).
        spectral: ``compute`` needs the singular values (skipped when ``DiagnoseConfig.spectral`` is False).
    """

    key: str
    label: str
    pct: bool = False
    aggregate: str = "mean"
    shown: tuple[str, ...] = ()
    help: str = ""
    compute: Optional[Callable[[MatrixView], float]] = None
    spectral: bool = False

    def __post_init__(self) -> None:
        if self.compute is not None and self.aggregate != "mean":
            raise ValueError(f"Metric {self.key!r}: a metric with compute= is averaged over matrices: aggregate='mean'")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"Metric {self.key!r}: aggregate={self.aggregate!r}; choose one of {list(AGGREGATES)}")
        unknown = [p for p in self.shown if p not in PLACES]
        if unknown:
            raise ValueError(f"Metric {self.key!r}: unknown places {unknown}; choose from {list(PLACES)}")


T1, TYPE, LAYER, CARD = PLACES
# In the order of report.md's columns and report.json's summaries.
METRICS: tuple[Metric, ...] = (
    Metric("bf16_sparsity", "sparsity_bf16", True, "weighted", (T1, TYPE, LAYER, CARD),
           "share of entries whose bf16 value does not change (η-relative test)"),
    Metric("abs_sparsity", "sparsity abs", True, "weighted", (T1, TYPE, CARD),
           "share of entries with |ΔW| below the absolute threshold"),
    Metric("update_density", "update density", True, "weighted", (), "1 - sparsity_bf16"),
    Metric("relative_norm", "rel. norm", False, "mean", (T1, TYPE, CARD), "‖ΔW‖_F / ‖W0‖_F"),
    Metric("nss", "NSS", False, "mean", (T1, TYPE, LAYER, CARD), "‖σ(W₊) − σ(W0)‖₂ / ‖σ(W0)‖₂"),
    Metric("principal_angle_deg", "angle (°)", False, "mean", (T1, TYPE, LAYER, CARD),
           "mean principal angle between the top-k singular subspaces of W0 and W₊ (left and right)"),
    Metric("principal_angle_u_deg", "angle U (°)", False, "mean", (), "the left-subspace angle"),
    Metric("principal_angle_v_deg", "angle V (°)", False, "mean", (), "the right-subspace angle"),
    Metric("principal_overlap", "principal overlap", True, "mean", (T1, TYPE, CARD),
           "share of visible updates inside the principal mask of W0"),
    Metric("low_magnitude_overlap", "low-mag overlap", True, "mean", (T1, TYPE, CARD),
           "share of visible updates inside the low-magnitude mask of W0"),
    Metric("stable_rank", "stable rank", False, "mean", (T1, TYPE, LAYER, CARD), "‖ΔW‖_F² / ‖ΔW‖₂²"),
    Metric("top16_energy_share", "top-16 energy", True, "mean", (T1, CARD),
           "share of ‖ΔW‖_F² in the top 16 singular values"),
    Metric("numerical_rank_ratio", "numerical rank ratio", True, "mean", (), "numerical rank of ΔW / min(out, in)"),
    Metric("hill_alpha", "Hill α̂", False, "mean", (), "Hill tail estimate of ΔW's singular values"),
    Metric("ffn_energy_share", "FFN energy", True, "energy", (T1, CARD), "FFN share of Σ‖ΔW‖_F²"),
    Metric("attention_energy_share", "attention energy", True, "energy", (CARD,), "attention share of Σ‖ΔW‖_F²"),
    Metric("other_energy_share", "other energy", True, "energy", (), "share of Σ‖ΔW‖_F² outside FFN / attention"),
    Metric("energy_share", "energy share", True, "energy", (TYPE,), "a module type's share of Σ‖ΔW‖_F²"),
)  # fmt: skip


def metrics(place: Optional[str] = None, aggregate: Optional[str] = None) -> tuple[Metric, ...]:
    """The metrics shown at ``place`` and / or aggregated by ``aggregate`` (None: any), in declaration order."""
    return tuple(m for m in METRICS if (place is None or place in m.shown) and aggregate in (None, m.aggregate))


def mean_keys() -> tuple[str, ...]:
    """Keys of the metrics averaged over matrices, in declaration order."""
    return tuple(m.key for m in metrics(aggregate="mean"))


def card_keys() -> tuple[str, ...]:
    """The summary entries an adapter's model card records: the pair, its size, then the ``"card"`` metrics."""
    return ("source", "tuned", "n_matrices", *(m.key for m in metrics(CARD)))


def computed(view: MatrixView) -> dict[str, float]:
    """``{key: compute(view)}`` of the metrics declared with ``compute`` (spectral ones only when ``view.sigma``
    is given)."""
    return {m.key: m.compute(view) for m in METRICS if m.compute and (view.sigma is not None or not m.spectral)}


@dataclass(frozen=True)
class TrajectoryMetric:
    """One metric of ``ΔW_t = W_t − W0`` along a trajectory (per matrix and checkpoint, then the mean over matrices).

    Attributes:
        key: its key in ``trajectory.json``. label: its column heading in ``trajectory.md``. pct: a percentage.
        help: one line. compute: ``(sigma, shape, hill_k) -> float`` from the descending float64 top singular
            values of ``ΔW_t`` (None: computed by :func:`trajectory` itself: the norm, and ``sim_k`` across
            checkpoints).
    """

    key: str
    label: str
    pct: bool = False
    help: str = ""
    compute: Optional[Callable[[torch.Tensor, tuple[int, int], int], float]] = None


# In the order of trajectory.md's columns.
TRAJECTORY_METRICS: tuple[TrajectoryMetric, ...] = (
    TrajectoryMetric("fro_norm", "‖ΔW_t‖_F (mean)", False, "‖ΔW_t‖_F"),
    TrajectoryMetric("stable_rank", "stable rank", False, "‖ΔW_t‖_F² / ‖ΔW_t‖₂² (top-K singular values)",
                     lambda s, shape, hill_k: M.stable_rank(s)),
    TrajectoryMetric("hill_alpha", "Hill α̂", False, "Hill tail estimate on the top hill_k singular values",
                     lambda s, shape, hill_k: M.hill_alpha(s[: M.numerical_rank(s, shape)], hill_k)),
    TrajectoryMetric("sim_k", "Sim_K(t, end)", False, "top-K right singular subspace similarity with the last step"),
    TrajectoryMetric("top16_energy_share", "top-16 energy", True, "share of ‖ΔW_t‖_F² in the top 16 singular values",
                     lambda s, shape, hill_k: M.top_energy_share(s, 16)),
)  # fmt: skip
