"""Lazy package exports: a package lists ``{name: submodule}`` and its names are imported on first use, so that
importing the package (e.g. for the CLI's ``--help``) imports no torch."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, api: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose public ``name`` lives in submodule ``api[name]`` (relative,
    without the leading dot). A resolved name is cached in the package's globals."""

    def getattr_(name: str) -> Any:
        if name not in api:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{api[name]}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    def dir_() -> list[str]:
        return sorted({*vars(sys.modules[package]), *api})

    return getattr_, dir_
