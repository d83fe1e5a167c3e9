"""The SPARSE_OPD peft method: config, layer, tuner model, coordinate storage.

Importing it registers the method with peft (``register``); nothing of peft is patched.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import SparseOPDConfig
from .layer import Linear, SparseOPDLayer
from .model import SparseOPDModel, bf16_visibility
from .registration import PEFT_TYPE, register

register()


def save_adapter(model, directory: str | os.PathLike, **kwargs) -> Path:
    """Save a ``PeftModel``'s SparseOPD adapter(s) with their model card, atomically (see
    :func:`sparse_opd_peft.model_card.save_adapter`)."""
    from ..model_card import save_adapter as save_with_card

    return save_with_card(model, directory, **kwargs)


__all__ = [
    "PEFT_TYPE",
    "Linear",
    "SparseOPDConfig",
    "SparseOPDLayer",
    "SparseOPDModel",
    "bf16_visibility",
    "save_adapter",
]
