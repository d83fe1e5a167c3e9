"""The SPARSE_OPD peft method: config, layer, tuner model, coordinate storage.

Importing it registers the method with peft (``register``); nothing of peft is patched.
"""

from __future__ import annotations

from .config import SparseOPDConfig
from .layer import Linear, SparseOPDLayer
from .model import SparseOPDModel, bf16_visibility
from .registration import PEFT_TYPE, register

register()


__all__ = [
    "PEFT_TYPE",
    "Linear",
    "SparseOPDConfig",
    "SparseOPDLayer",
    "SparseOPDModel",
    "bf16_visibility",
]
