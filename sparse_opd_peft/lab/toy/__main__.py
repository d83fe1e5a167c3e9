"""``python -m sparse_opd_peft.lab.toy``: show the shipped toy world, or rebuild a world from a recipe.

python -m sparse_opd_peft.lab.toy                      # the shipped world: key, record, accuracies (trains nothing)
python -m sparse_opd_peft.lab.toy --reevaluate         # ... and re-measure its held-out accuracies here
python -m sparse_opd_peft.lab.toy --rebuild            # train the shipped recipe again; both worlds side by side
python -m sparse_opd_peft.lab.toy --rebuild --export DIR   # ... and copy the rebuilt world to DIR (shipped layout)
python -m sparse_opd_peft.lab.toy --tiny               # build the seconds-long test recipe
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from pathlib import Path

from .evaluate import evaluate_accuracy
from .world import SHIPPED_WORLD_DIR, ToyRecipe, ToyWorld, build_world, default_cache_dir, load_world, shipped_recipe


def _accuracies(world: ToyWorld, reevaluate: bool) -> dict[str, dict[str, float]]:
    if not reevaluate:
        return world.accuracies
    return {
        role: {
            name: evaluate_accuracy(model, world.tokenizer, world.datasets[name]["heldout"], name)
            for name in world.tasks
        }
        for role, model in (("teacher", world.teacher), ("student", world.student))
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m sparse_opd_peft.lab.toy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rebuild", action="store_true", help="train the shipped world's recipe again (minutes)")
    parser.add_argument("--tiny", action="store_true", help="build ToyRecipe.tiny() (seconds, low accuracy)")
    parser.add_argument("--seed", type=int, default=None, help="with --rebuild / --tiny: another recipe seed")
    parser.add_argument(
        "--cache-dir", default=None, help=f"cache root of built worlds (default: {default_cache_dir()})"
    )
    parser.add_argument("--export", default=None, help="copy the built world to this directory (must not exist)")
    parser.add_argument("--reevaluate", action="store_true", help="re-measure held-out accuracy here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.export and not (args.rebuild or args.tiny):
        parser.error("--export needs --rebuild or --tiny (the shipped world is already in the package)")
    if args.export and Path(args.export).exists():
        parser.error(f"--export {args.export}: the directory exists; remove it first")

    shipped = load_world() if (SHIPPED_WORLD_DIR / "world.json").is_file() else None
    if shipped is None and not (args.rebuild or args.tiny):
        parser.error(f"no shipped world at {SHIPPED_WORLD_DIR}: reinstall the package, or --rebuild it")
    if not (args.rebuild or args.tiny):
        worlds = [("shipped", shipped)]
    else:
        recipe = ToyRecipe.tiny() if args.tiny else (shipped_recipe() if shipped else ToyRecipe())
        if args.seed is not None:
            recipe = ToyRecipe.from_dict({**recipe.to_dict(), "seed": args.seed})
        command = "python -m sparse_opd_peft.lab.toy " + shlex.join(sys.argv[1:] if argv is None else argv)
        t0 = time.perf_counter()
        built = build_world(args.cache_dir, recipe, progress=not args.no_progress, command=command)
        action = "loaded from the cache" if built.from_cache else f"built in {time.perf_counter() - t0:.0f} s"
        print(f"rebuilt world {built.key} {action} at {built.path}")
        worlds = [("shipped", shipped), ("rebuilt", built)] if shipped else [("rebuilt", built)]
        if args.export:
            shutil.copytree(built.path, args.export)
            print(f"exported to {args.export}")
    for label, world in worlds:
        rec = world.record
        print(
            f"{label} world {world.key} at {world.path}\n  built by: {rec.get('command', '?')}\n"
            f"  with torch {rec.get('torch', '?')}, transformers {rec.get('transformers', '?')}, "
            f"python {rec.get('python', '?')} on {rec.get('platform', '?')}; build {world.build_seconds:.0f} s"
        )
    names = list(worlds[0][1].recipe.tasks)
    header = f"{'model':<8} {'task':<5} " + " ".join(f"{label + ' ' + w.key[:8]:>17}" for label, w in worlds)
    print(header)
    accs = [_accuracies(w, args.reevaluate) for _, w in worlds]
    for role in ("teacher", "student"):
        for name in names:
            cells = " ".join(f"{100 * a[role].get(name, float('nan')):>16.1f}%" for a in accs)
            print(f"{role:<8} {name:<5} {cells}")
    print(f"(greedy exact-match accuracy on {worlds[0][1].recipe.n_heldout} held-out prompts per task)")
    if len(worlds) == 2 and worlds[1][1].key != worlds[0][1].key:
        print("the rebuilt world is another world (its own key): the shipped world stays the default")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
