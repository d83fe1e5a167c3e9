"""Masks: which coordinates an adapter trains, and everything that builds or compares them.

One home per concept:

* :mod:`.mask` - :class:`SparseMask` (module -> sorted flat indices; set operations; save / load);
* :mod:`.rules` - the rule registry (``bf16_visible``, ``abs_threshold``, ``topk``; a new rule is one function there);
* :mod:`.budget` - the one budget allocator (:class:`Budget`: density, FFN share, per module), top-k selection and
  :func:`exclude_coordinates`;
* :mod:`.overlap` - the one overlap / agreement measure, :func:`mask_overlap`, with its random expectation;
* :mod:`.checkpoints` - :func:`mask_from_checkpoints` (a rule applied to a checkpoint pair, streamed);
* :mod:`.priors` - :func:`random_like`, :func:`low_magnitude`;
* :mod:`.predictors`, :mod:`.gradient` - predicting the final mask from cheap probes;
* :mod:`.churn` - churn between models and the churn-budgeted :func:`budgeted_topk_mask`;
* :mod:`.subspace` - rank-r update subspaces (``SparseOPDConfig(subspace=...)``).

Names are imported on first use, so ``sparse_opd_peft.masks.rules`` can be read without importing torch.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_API = {
    "SparseMask": "mask",
    "MASK_FORMAT": "mask",
    "MASK_FORMAT_VERSION": "mask",
    "RULES": "rules",
    "MaskRule": "rules",
    "register_rule": "rules",
    "Budget": "budget",
    "select_top": "budget",
    "exclude_coordinates": "budget",
    "mask_overlap": "overlap",
    "MaskLike": "overlap",
    "mask_from_checkpoints": "checkpoints",
    "random_like": "priors",
    "low_magnitude": "priors",
    "mask_from_scores": "predictors",
    "rank_normalise": "predictors",
    "combine_scores": "predictors",
    "low_magnitude_scores": "predictors",
    "early_delta_mask": "predictors",
    "STATISTICS": "gradient",
    "GradientStatistics": "gradient",
    "gradient_statistics": "gradient",
    "gradient_mask": "gradient",
    "bf16_churn": "churn",
    "changed_coordinates": "churn",
    "budgeted_topk_mask": "churn",
    "merged_copy": "churn",
    "weight_tensors": "churn",
    "block_linear_names": "churn",
    "subspace_from_checkpoints": "subspace",
    "save_subspace": "subspace",
    "load_subspace": "subspace",
}
__all__ = sorted(_API)


__getattr__, __dir__ = lazy_exports(__name__, _API)
