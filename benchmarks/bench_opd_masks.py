"""Does OPD learn on the toy world, and does masked retraining recover it? (issue 5, item 5)

One run of this script, side by side, on the default toy world (2000 held-out prompts per number, every run from the
same student anchor, equal steps and lr schedule):

* the anchor and the teacher;
* full-parameter OPD (``--loss``, default ``full_kl``), one run per seed, and the ``sampled_token`` estimator of
  the same gradient (one run per seed) for comparison;
* ``get_peft_model(anchor, SparseOPDConfig(mask=...))`` retrained with OPD for masks extracted from the seed-0 full
  run's checkpoint delta: the bf16-visible rule and top-k |ΔW| at ``--densities``, each against a random mask of
  the same per-module density, one run per seed.

Finished runs are cached in ``--work-dir`` (a JSON per run) and skipped on a re-run. Writes
``benchmarks/results/opd_masks.md`` (the README table) and ``opd_masks.json``.

    python benchmarks/bench_opd_masks.py                 # ~30 min on 2 cores with a cached toy world
    python benchmarks/bench_opd_masks.py --seeds 1 --densities 0.2 --steps 100   # quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _fmt(values: list[float]) -> str:
    pct = [100 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.1f}"
    return f"{statistics.mean(pct):.1f} ± {statistics.stdev(pct):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", default=None, help="toy-world cache (default $SPARSE_OPD_CACHE or ~/.cache)")
    ap.add_argument("--work-dir", default="runs/bench_opd_masks", help="per-run results and the full-OPD model")
    ap.add_argument("--task", default="add")
    ap.add_argument("--loss", default="full_kl")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.2, 0.45])
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "opd_masks.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from peft import get_peft_model

    from sparse_opd_peft import SparseMask, SparseOPDConfig
    from sparse_opd_peft.toy import ToyRunConfig, build_world, heldout_accuracy, opd_run

    world = build_world(args.cache_dir)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    base = ToyRunConfig(task=args.task, loss=args.loss, lr=args.lr, steps=args.steps, progress=True)
    seeds = list(range(args.seeds))

    def cached(name: str, fn) -> dict:
        path = work / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
        t0 = time.perf_counter()
        result = fn()
        result["seconds"] = round(time.perf_counter() - t0, 1)
        path.write_text(json.dumps(result, indent=1))
        print(name, result, flush=True)
        return result

    acc = lambda model: heldout_accuracy(model, world, args.task, args.eval_samples)  # noqa: E731
    anchor = cached("anchor", lambda: {"acc": acc(world.load_student())})
    teacher = cached("teacher", lambda: {"acc": acc(world.teacher)})

    def full(seed: int, loss: str) -> dict:
        model, hist, secs = opd_run(world.load_student(), world, base.with_(seed=seed, loss=loss))
        if seed == 0 and loss == args.loss:
            model.save_pretrained(work / "full_opd")
        return {"acc": acc(model), "train_seconds": secs, "final_kl": hist[-1].get("kl")}

    full_runs = [cached(f"full_{args.loss}_s{s}", lambda s=s: full(s, args.loss)) for s in seeds]
    other = "sampled_token" if args.loss != "sampled_token" else "full_kl"
    other_runs = [cached(f"full_{other}_s{s}", lambda s=s: full(s, other)) for s in seeds]
    if not (work / "full_opd").exists():  # cached results but the model dir was removed: retrain seed 0
        full(0, args.loss)

    masks = {"bf16-visible": SparseMask.from_checkpoints(world.student_path, work / "full_opd", rule="bf16_visible")}
    for d in args.densities:
        masks[f"top-{d:.0%} |ΔW|"] = SparseMask.from_checkpoints(
            world.student_path, work / "full_opd", rule="topk", density=d
        )

    def masked(mask: SparseMask, seed: int) -> dict:
        model = get_peft_model(world.load_student(), SparseOPDConfig(mask=mask))
        trained, hist, secs = opd_run(model, world, base.with_(seed=seed))
        return {"acc": acc(trained), "train_seconds": secs, "nnz": mask.nnz(), "density": mask.density()}

    rows = []
    for name, mask in masks.items():
        key = name.replace("%", "").replace(" ", "_").replace("|ΔW|", "absdelta")
        ours = [cached(f"mask_{key}_s{s}", lambda s=s, m=mask: masked(m, s)) for s in seeds]
        rand = [
            cached(f"random_{key}_s{s}", lambda s=s, m=mask: masked(SparseMask.random_like(m, seed=s), s))
            for s in seeds
        ]
        ffn = mask.type_stats()["ffn"]["share_of_nnz"]
        rows.append((name, mask.density(), ffn, ours, rand))

    n = len(seeds)
    lines = [
        f"Task `{args.task}`, {args.steps} OPD steps × 64 prompts, AdamW lr {args.lr:g} (10 warm-up steps, linear "
        f"decay), held-out greedy accuracy (%) on {args.eval_samples} prompts, mean ± std over {n} seed(s) "
        f"(`python benchmarks/bench_opd_masks.py`).",
        "",
        "| run | density (FFN share) | accuracy % | random mask, same per-module density % |",
        "|---|---:|---:|---:|",
        f"| student anchor | – | {_fmt([anchor['acc']])} | |",
        f"| teacher | – | {_fmt([teacher['acc']])} | |",
        f"| full OPD, `{args.loss}` | 100 % | {_fmt([r['acc'] for r in full_runs])} | |",
        f"| full OPD, `{other}` | 100 % | {_fmt([r['acc'] for r in other_runs])} | |",
    ]
    for name, dens, ffn, ours, rand in rows:
        cell = name.replace("|", "\\|")  # a literal | would end the table cell
        lines.append(
            f"| SparseOPD adapter, {cell} mask | {100 * dens:.1f} % ({100 * ffn:.0f} %) | "
            f"{_fmt([r['acc'] for r in ours])} | {_fmt([r['acc'] for r in rand])} |"
        )
    secs = [r["train_seconds"] for r in full_runs]
    lines += [
        "",
        f"Full OPD wall-clock per run: {statistics.mean(secs):.0f} s ({args.threads} thread(s)).",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    summary = {
        "args": vars(args),
        "anchor": anchor,
        "teacher": teacher,
        "full": full_runs,
        f"full_{other}": other_runs,
        "masks": {name: {"density": d, "ffn_share": f, "ours": o, "random": r} for name, d, f, o, r in rows},
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
