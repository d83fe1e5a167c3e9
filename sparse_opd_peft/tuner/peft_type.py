"""The method's identity: the ``SPARSE_OPD`` member of peft's ``PeftType`` enum (added at import time when this peft
has none), its parameter prefix and its adapter file format version.

peft's ``register_peft_method`` only accepts names that already exist in the ``PeftType`` enum, so the member is
added here, before :func:`sparse_opd_peft.tuner.registration.register` registers the config and tuner classes. This
module imports nothing of the package, so that the config can name its peft type without importing the registration
(which imports the config). Adding the member is idempotent: importing twice, reloading the module, or importing in
several processes is fine, and a future peft that ships a ``SPARSE_OPD`` member of its own is used as is.
"""

from __future__ import annotations

from peft.utils import PeftType

PEFT_NAME = "sparse_opd"
PREFIX = "sparse_opd_"
# ``format_version`` of adapter_config.json, and so of adapter_model.safetensors (tuner/storage.py); 2: positions may be
# a uint8 Elias-Fano / delta-varint stream (sparse_opd_peft/positions.py)
FORMAT_VERSION = 2


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
