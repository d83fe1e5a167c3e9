"""The named choices of the package's options, in one torch-free module.

Library code validates against these tuples and the ``sparse-opd`` command line builds its choice types from them,
so ``sparse-opd --help`` lists exactly what the library accepts without importing torch.
"""

from __future__ import annotations

LOSSES = ("sampled_token", "full_kl", "topk_kl", "sft", "rlvr", "mix")  # OPDConfig.loss
BASELINES = ("none", "position")  # OPDConfig.sampled_token_baseline
TOKEN_KEEP = ("all", "top_gap", "random")  # OPDConfig.token_keep
LR_SCHEDULES = ("linear", "constant")  # OPDConfig.lr_schedule
OPTIMIZERS = ("adamw", "sgd")  # OPDConfig.optimizer
SAVE_DTYPES = ("float32", "bfloat16", "float16")  # SparseOPDConfig.save_dtype (same tuple as tuner.config)
MODEL_DTYPES = ("fp32", "bf16", "fp16")  # dtypes models are loaded / merged in (workflow.sources.torch_dtype)
DEVICES = ("auto", "cpu", "cuda")  # diagnostics.engine.resolve_device (auto: CUDA when present)

__all__ = [
    "BASELINES",
    "DEVICES",
    "LOSSES",
    "LR_SCHEDULES",
    "MODEL_DTYPES",
    "OPTIMIZERS",
    "SAVE_DTYPES",
    "TOKEN_KEEP",
]
