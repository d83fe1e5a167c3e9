"""sparse_opd_peft: sparse on-policy-distillation adapters as a PEFT method."""

from .masks import SparseMask
from .module_types import layer_index, module_type

__version__ = "0.1.0"
__all__ = ["SparseMask", "layer_index", "module_type", "__version__"]
