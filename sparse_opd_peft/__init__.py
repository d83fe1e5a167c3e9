"""sparse_opd_peft: sparse on-policy-distillation adapters as a PEFT method.

Importing the package registers the ``SPARSE_OPD`` method with peft (at once if peft is imported, else as soon as it
is), so that ``peft.get_peft_model(model, SparseOPDConfig(mask=...))`` and ``PeftModel.from_pretrained(base, path)``
work. The names below are imported on first use, so ``import sparse_opd_peft`` itself imports no torch.
"""

from __future__ import annotations

from ._lazy import lazy_exports
from ._peft_hook import register_when_peft_loads
from ._version import __version__

_API = {
    "PEFT_TYPE": "tuner",
    "SparseOPDConfig": "tuner",
    "SparseOPDModel": "tuner",
    "bf16_visibility": "tuner",
    "save_adapter": "model_card",
    "SparseMask": "masks",
    "mask_from_checkpoints": "masks",
    "layer_index": "module_types",
    "module_type": "module_types",
    "visible_update": "visibility",
    "record_training": "model_card",
    "load_adapter": "hub",
    "push_adapter": "hub",
    "save_sharded_adapter": "distributed",
}
__all__ = ["__version__", *_API]


__getattr__, __dir__ = lazy_exports(__name__, _API)


register_when_peft_loads()
