"""Parameter-space diagnostics of weight updates (paper: *On the Geometry of On-Policy Distillation*).

* :mod:`.metrics` - pure metric functions on tensors (sparsity, norms, principal angles, NSS, update spectrum,
  Sim_K, energy shares; mask overlaps are :func:`sparse_opd_peft.masks.mask_overlap`);
* :mod:`.catalog` - the one declaration of the metrics (key, label, format, aggregation, where shown, compute);
* :mod:`.spectral` - fast float64 singular values / top-k vectors (Gram + partial eigendecomposition);
* :mod:`.sources` - stream tensors from model directories, sharded safetensors, Hub ids or in-memory models;
* :mod:`.engine` - :func:`diagnose` (a checkpoint pair) and :func:`trajectory` (a list of checkpoints);
* :mod:`.report` - ``report.json``, markdown and PNG plots.
"""

from .engine import (
    DiagnoseConfig,
    DiagnosticsResult,
    TrajectoryResult,
    aggregate,
    analyze_matrix,
    diagnose,
    trajectory,
)
from .report import markdown_summary, table1_line, write_report, write_trajectory_report
from .sources import TensorSource, open_source
from .spectral import SVDResult, svd_topk

__all__ = [
    "DiagnoseConfig",
    "DiagnosticsResult",
    "SVDResult",
    "TensorSource",
    "TrajectoryResult",
    "aggregate",
    "analyze_matrix",
    "diagnose",
    "markdown_summary",
    "open_source",
    "svd_topk",
    "table1_line",
    "trajectory",
    "write_report",
    "write_trajectory_report",
]
