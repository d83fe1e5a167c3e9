"""Shared by the study tests: the tiny-world StudyConfig, a walk over every number of a section's data, a check of a
section's PNGs, and a guard that a cached run recomputes nothing."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sparse_opd_peft.lab.study import StudyConfig

# a verdict in the study's markdown: **reproduced**, **not reproduced**, **holds**, **fails**
VERDICT = re.compile(r"\*\*(not reproduced|reproduced|holds|fails)\*\*")


def tiny_config(root: Path, sections: tuple[str, ...], cache_dir: Path) -> StudyConfig:
    """A study under ``root`` on the tiny toy world cached in ``cache_dir`` (the session's ``tiny_toy_cache``) with 4
    steps, 1 seed and 16 held-out prompts: seconds, not results."""
    return StudyConfig(
        out=str(root / "study"), cache_dir=str(cache_dir), tiny=True, steps=4, seeds=1, eval_samples=16,
        progress=False, threads=1, workers=1, sections=sections,
    )  # fmt: skip


def numbers(obj, path: str = "data") -> Iterator[tuple[str, float]]:
    """Every int / float (not bool) in a JSON-like tree as ``(path, value)``."""
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from numbers(v, f"{path}[{i}]")


def check_plots(root: Path, plots: list[str]) -> None:
    """``plots`` is not empty and each is a PNG of more than 5000 bytes under ``root / "study"``."""
    assert plots
    for p in plots:
        f = root / "study" / p
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000, p


def forbid(monkeypatch, targets: list[tuple[Any, str]], why: str) -> None:
    """Make every ``(module, name)`` in ``targets`` raise ``AssertionError(why)`` when called (for the test's length)."""

    def boom(*args, **kwargs):
        raise AssertionError(why)

    for module, name in targets:
        monkeypatch.setattr(module, name, boom)
