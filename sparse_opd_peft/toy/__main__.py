"""``python -m sparse_opd_peft.toy [--cache-dir DIR] [--tiny] [--seed N] [--reevaluate]``: build or load the toy
world and print a summary (key, path, timings, per-task held-out accuracy of teacher and student)."""

from __future__ import annotations

import argparse
import time

from .evaluate import evaluate_accuracy
from .world import ToyRecipe, build_world, default_cache_dir


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m sparse_opd_peft.toy", description=__doc__)
    parser.add_argument("--cache-dir", default=None, help=f"cache root (default: {default_cache_dir()})")
    parser.add_argument("--tiny", action="store_true", help="use ToyRecipe.tiny() (seconds, low accuracy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reevaluate", action="store_true", help="re-measure held-out accuracy after loading")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    recipe = ToyRecipe.tiny(seed=args.seed) if args.tiny else ToyRecipe(seed=args.seed)
    t0 = time.perf_counter()
    world = build_world(args.cache_dir, recipe, progress=not args.no_progress)
    elapsed = time.perf_counter() - t0
    action = "loaded" if world.from_cache else "built"
    print(f"toy world {world.key} {action} in {elapsed:.1f} s at {world.path}")
    print(f"original build time: {world.build_seconds:.1f} s")
    for role, model in (("teacher", world.teacher), ("student", world.student)):
        n = sum(p.numel() for p in model.parameters())
        print(f"{role}: {n:,} parameters")
    header = f"{'task':<6} {'heldout':>7} {'teacher':>8} {'student':>8}"
    print(header)
    for name in world.recipe.tasks:
        ds = world.datasets[name]["heldout"]
        if args.reevaluate:
            t_acc = evaluate_accuracy(world.teacher, world.tokenizer, ds, name)
            s_acc = evaluate_accuracy(world.student, world.tokenizer, ds, name)
        else:
            t_acc, s_acc = world.accuracies["teacher"][name], world.accuracies["student"][name]
        print(f"{name:<6} {len(ds):>7} {t_acc:>8.1%} {s_acc:>8.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
