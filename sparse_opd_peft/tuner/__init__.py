"""The SPARSE_OPD peft method: config, layer, tuner model, coordinate storage."""

from .config import SparseOPDConfig
from .files import save_adapter
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
    "save_adapter",
]
