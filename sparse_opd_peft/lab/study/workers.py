"""Parallel training of the study's sections: groups of similar measured cost, one spawned process per group."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

# Rough relative cost of each section's own runs (measured on the toy world), to balance the worker groups.
_SECTION_COST = {"recovery": 47, "subspace": 6, "geometry": 14, "controls": 12, "predictors": 15, "savings": 4}


def worker_groups(sections: Sequence[str], workers: int) -> list[list[str]]:
    """Split ``sections`` into at most ``workers`` non-empty groups of similar measured cost (greedy, costliest
    first), e.g. ``(recovery, subspace, geometry, controls, predictors, savings)`` over 2 workers gives
    ``[[recovery, savings], [predictors, geometry, controls, subspace]]``."""
    groups: list[list[str]] = [[] for _ in range(max(1, min(workers, len(sections))))]
    load = [0] * len(groups)
    for name in sorted(sections, key=lambda n: -_SECTION_COST.get(n, 10)):
        i = load.index(min(load))
        groups[i].append(name)
        load[i] += _SECTION_COST.get(name, 10)
    return [g for g in groups if g]


def run_groups(fn: Callable[[dict[str, Any], list[str]], None], config_dict: dict[str, Any],
               groups: list[list[str]]) -> None:  # fmt: skip
    """Run ``fn(config_dict, group)`` for every group, each in its own process (spawned, so no torch / OpenMP state
    is shared); re-raises the first failure. ``fn`` must be a module-level function (it is pickled)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(len(groups), mp_context=get_context("spawn")) as pool:
        for future in [pool.submit(fn, config_dict, g) for g in groups if g]:
            future.result()
