"""Register the SPARSE_OPD method with peft as soon as peft is imported.

``import sparse_opd_peft`` stays cheap (peft, transformers and torch take seconds to import) yet keeps its promise:
if peft is already imported the method is registered at once, otherwise right after ``import peft`` finishes, before
any peft API can be used. Implemented as a one-shot meta-path finder that wraps peft's loader.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys


def _register() -> None:
    importlib.import_module("sparse_opd_peft.tuner")  # importing the tuner registers the method


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader) -> None:
        self._loader = loader

    def __getattr__(self, name):  # is_package, get_resource_reader, ...: peft's own loader
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self._loader
        _register()


class _PeftFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        sys.meta_path.remove(self)  # one shot
        spec = importlib.util.find_spec("peft")
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def register_when_peft_loads() -> None:
    """Register now if peft is imported, else as soon as it is."""
    if "peft" in sys.modules:
        _register()
    elif not any(isinstance(f, _PeftFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PeftFinder())
