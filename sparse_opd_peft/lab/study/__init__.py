"""The reproducible study of issue 6 (``sparse-opd study``): the papers' findings side by side on the toy world.

Sections (each a module with ``run(ctx) -> Section``): ``geometry`` (where OPD sits: SFT vs OPD vs RLVR),
``recovery`` (masked retraining vs full OPD, random, low-magnitude and LoRA), ``subspace`` (the early rank-16
channel), ``controls`` (token sparsification, off-policy, α-mix), ``predictors`` (the mask before the full run) and
``savings`` (time, memory, optimizer and file bytes).
"""

from .core import (
    SECTIONS,
    RenderInfo,
    Section,
    StudyConfig,
    StudyContext,
    mean_std,
    render_study,
    run_study,
    write_atomic,
)

__all__ = [
    "SECTIONS",
    "RenderInfo",
    "Section",
    "StudyConfig",
    "StudyContext",
    "mean_std",
    "render_study",
    "run_study",
    "write_atomic",
]
