"""Register the ``SPARSE_OPD`` method with peft: a ``PeftType`` member plus peft's own ``register_peft_method``.

peft's ``register_peft_method`` only accepts names that already exist in the ``PeftType`` enum, so the member is
added to the enum at import time (:mod:`sparse_opd_peft.tuner.peft_type`). Both steps are idempotent: importing twice,
reloading the module, or importing in several processes is fine, and a future peft that ships a ``SPARSE_OPD`` member
of its own is used as is.
"""

from __future__ import annotations

from .peft_type import PEFT_NAME, PEFT_TYPE, PREFIX

__all__ = ["PEFT_NAME", "PEFT_TYPE", "PREFIX", "register"]


def register() -> None:
    """Register config, tuner model and prefix with peft (no-op when already registered)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .config import SparseOPDConfig
    from .model import SparseOPDModel

    if PEFT_TYPE_TO_CONFIG_MAPPING.get(PEFT_TYPE) is SparseOPDConfig:
        return
    if PEFT_TYPE in PEFT_TYPE_TO_CONFIG_MAPPING or PEFT_TYPE in PEFT_TYPE_TO_TUNER_MAPPING:
        # Registered by an earlier copy of this module (e.g. importlib.reload): replace with the current classes.
        from peft.mapping import PEFT_TYPE_TO_MIXED_MODEL_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING

        for mapping in (
            PEFT_TYPE_TO_CONFIG_MAPPING,
            PEFT_TYPE_TO_TUNER_MAPPING,
            PEFT_TYPE_TO_PREFIX_MAPPING,
            PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
        ):
            mapping.pop(PEFT_TYPE, None)
    register_peft_method(name=PEFT_NAME, config_cls=SparseOPDConfig, model_cls=SparseOPDModel, prefix=PREFIX)
