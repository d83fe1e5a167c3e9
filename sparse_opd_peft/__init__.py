"""sparse_opd_peft: sparse on-policy-distillation adapters as a PEFT method.

Importing the package registers the ``SPARSE_OPD`` method with peft (and does nothing else to peft), so that
``peft.get_peft_model(model, SparseOPDConfig(mask=...))`` and ``PeftModel.from_pretrained(base, path)`` work.
``save_adapter(model, dir)`` saves with our model card, ``push_adapter(model_or_dir, repo_id)`` uploads to the Hub.
"""

from ._version import __version__
from .hub import load_adapter, push_adapter
from .masks import SparseMask
from .model_card import record_training
from .module_types import layer_index, module_type
from .tuner import PEFT_TYPE, SparseOPDConfig, SparseOPDModel, bf16_visibility, save_adapter
from .visibility import visible_update

__all__ = [
    "PEFT_TYPE",
    "SparseMask",
    "SparseOPDConfig",
    "SparseOPDModel",
    "__version__",
    "bf16_visibility",
    "layer_index",
    "module_type",
    "save_adapter",
    "visible_update",
    "record_training",
    "load_adapter",
    "push_adapter",
]
