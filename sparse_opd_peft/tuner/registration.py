"""Register the ``SPARSE_OPD`` method with peft: a ``PeftType`` member plus peft's own ``register_peft_method``.

peft's ``register_peft_method`` only accepts names that already exist in the ``PeftType`` enum, so the member is
added to the enum at import time. Both steps are idempotent: importing twice, reloading the module, or importing in
several processes is fine, and a future peft that ships a ``SPARSE_OPD`` member of its own is used as is.
"""

from __future__ import annotations

from peft.utils import PeftType

PEFT_NAME = "sparse_opd"
PREFIX = "sparse_opd_"


def _ensure_peft_type_member() -> PeftType:
    """Return ``PeftType.SPARSE_OPD``, adding the member to the enum if this peft does not have it."""
    key = PEFT_NAME.upper()
    if key in PeftType.__members__:
        return PeftType[key]
    member = str.__new__(PeftType, key)
    member._name_ = key
    member._value_ = key
    member._sort_order_ = len(PeftType._member_names_)
    member.__init__(key)
    PeftType._member_map_[key] = member
    PeftType._value2member_map_[key] = member
    PeftType._member_names_.append(key)
    type.__setattr__(PeftType, key, member)
    return member


PEFT_TYPE = _ensure_peft_type_member()


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
