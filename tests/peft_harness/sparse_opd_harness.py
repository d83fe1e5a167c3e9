"""pytest plugin that runs peft's own test modules (from the installed peft version's sdist) on SparseOPD.

Loaded with ``-p sparse_opd_harness`` by ``run.py``. When peft's test module has been imported, and before its
classes generate their parametrized tests, the module-level case lists that its ``@pytest.mark.parametrize`` marks
hold are replaced *in place* by ours (:mod:`cases`): ``TEST_CASES``, ``ALL_PEFT_CONFIG_CLASSES`` (derived from
``TEST_CASES`` in peft) and ``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES``. Then only the tests that run our config are
kept: tests of other peft methods (LoRA-only features, other models) are deselected, nothing of ours is skipped.

Deselected on purpose (see :data:`DESELECT`): ``test_save_pretrained_pickle``.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cases  # noqa: E402

import sparse_opd_peft  # noqa: E402,F401  (registers SPARSE_OPD)
from sparse_opd_peft import SparseOPDConfig  # noqa: E402

# Tests deselected by name, with why. Each entry must be a choice of the method, never a failure being hidden.
DESELECT: dict[str, str] = {
    "test_save_pretrained_pickle": (
        "SparseOPD adapters are safetensors only by design (the project is pickle-free): "
        "model.save_pretrained(dir, safe_serialization=False) raises a ValueError naming the fix (SparseOPDConfig."
        "save_pretrained refuses to complete it) and loading a directory holding adapter_model.bin is refused too; "
        "tests/tuner/test_peft_conventions.py checks both"
    ),
}

_patched: set[int] = set()


def _stub_diffusers() -> None:
    """peft's ``testing_common`` imports ``diffusers.StableDiffusionPipeline`` only for ``isinstance`` checks in its
    Stable Diffusion tests (not run here); without diffusers installed, a stand-in class keeps the import working."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        import types

        stub = types.ModuleType("diffusers")
        stub.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})
        sys.modules["diffusers"] = stub


_stub_diffusers()


def _install_cases(module) -> None:
    """Swap our cases into ``module``'s case lists, in place (the parametrize marks hold these list objects)."""
    if id(module) in _patched:
        return
    _patched.add(id(module))
    replacements = {
        "TEST_CASES": cases.TEST_CASES,
        "ALL_PEFT_CONFIG_CLASSES": [cases.SparseOPDConfigAnyBase],
        "MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES": cases.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES,
    }
    for name, ours in replacements.items():
        target = getattr(module, name, None)
        if isinstance(target, list):
            target[:] = ours


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector, name, obj):
    """Called for each name of a collected test module, after its import and before its classes are collected."""
    module = getattr(collector, "obj", None)
    if isinstance(collector, pytest.Module) and module is not None:
        _install_cases(module)


def _uses_our_config(item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return False
    for value in callspec.params.values():
        if (isinstance(value, type) and issubclass(value, SparseOPDConfig)) or isinstance(value, SparseOPDConfig):
            return True
        if isinstance(value, str) and "SparseOPD" in value:
            return True
    return False


def pytest_collection_modifyitems(config, items):
    """Keep only the tests that run SparseOPD (minus :data:`DESELECT`)."""
    keep, drop = [], []
    for item in items:
        base_name = item.originalname if hasattr(item, "originalname") else item.name
        if _uses_our_config(item) and base_name not in DESELECT:
            keep.append(item)
        else:
            drop.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_report_header(config):
    import peft

    lines = [f"sparse_opd harness: peft {peft.__version__}, {len(cases.TEST_CASES)} SparseOPD cases"]
    lines += [f"deselected by choice: {name} ({why})" for name, why in DESELECT.items()]
    return lines
