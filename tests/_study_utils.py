"""Shared by the study tests: the tiny-world StudyConfig and a walk over every number of a section's data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from sparse_opd_peft.study import StudyConfig


def tiny_config(root: Path, sections: tuple[str, ...]) -> StudyConfig:
    """A study on the tiny toy world under ``root`` (4 steps, 1 seed, 16 held-out prompts): seconds, not results."""
    return StudyConfig(
        out=str(root / "study"), cache_dir=str(root / "toy"), tiny=True, steps=4, seeds=1, eval_samples=16,
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
