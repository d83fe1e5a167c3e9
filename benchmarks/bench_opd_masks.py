"""Does OPD learn on the toy world, and does masked retraining recover it? (issue 5, item 5)

One run of this script, side by side, on the shipped toy world (2000 held-out prompts per number, every run from the
same student anchor, equal steps and lr schedule):

* the anchor and the teacher;
* full-parameter OPD (``--loss``, default ``full_kl``), one run per seed, and the ``sampled_token`` estimator of
  the same gradient (one run per seed) for comparison;
* ``get_peft_model(anchor, SparseOPDConfig(mask=...))`` retrained with OPD for masks extracted from the seed-0 full
  run's checkpoint delta: the bf16-visible rule and top-k |ΔW| at ``--densities``, each against a random mask of
  the same per-module density, one run per seed.

Finished runs are cached in ``--work-dir`` (a JSON per run) and skipped on a re-run. Writes
``benchmarks/results/opd_masks.md`` (the README table) and ``opd_masks.json``.

    python benchmarks/bench_opd_masks.py                 # ~12 min on 2 cores (two runs at a time)
    python benchmarks/bench_opd_masks.py --seeds 1 --densities 0.2 --steps 100   # quick look
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
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


_WORLD = None


def _world():
    global _WORLD
    if _WORLD is None:
        from sparse_opd_peft.lab.toy import load_world

        _WORLD = load_world()
    return _WORLD


def _job(job: dict) -> dict:
    """One cached run in a worker process (one torch thread each): ``full`` or ``masked``."""
    import torch

    torch.set_num_threads(job["threads"])
    from peft import get_peft_model

    from sparse_opd_peft import SparseOPDConfig
    from sparse_opd_peft.lab.toy import ToyRunConfig, heldout_accuracy, opd_run
    from sparse_opd_peft.masks import SparseMask, random_like

    path = Path(job["work"]) / f"{job['name']}.json"
    if path.exists():
        return json.loads(path.read_text())
    world, t0 = _world(), time.perf_counter()
    cfg = ToyRunConfig(task=job["task"]).with_(loss=job["loss"], lr=job["lr"], steps=job["steps"], seed=job["seed"],
                                               progress_bar=False)  # fmt: skip
    if job["kind"] == "full":
        model, hist, secs = opd_run(world.load_student(), world, cfg)
        if job.get("save"):
            model.save_pretrained(Path(job["work"]) / "full_opd")
        result = {"final_kl": hist[-1].get("kl")}
    else:
        mask = SparseMask.load(job["mask"])
        if job["random"]:
            mask = random_like(mask, seed=job["seed"])
        model, hist, secs = opd_run(get_peft_model(world.load_student(), SparseOPDConfig(mask=mask)), world, cfg)
        result = {"nnz": mask.nnz(), "density": mask.density()}
    result |= {"acc": heldout_accuracy(model, world, job["task"], job["eval_samples"]), "train_seconds": secs,
               "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    path.write_text(json.dumps(result, indent=1))
    print(job["name"], result, flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", default="runs/bench_opd_masks", help="per-run results and the full-OPD model")
    ap.add_argument("--task", default="add")
    ap.add_argument("--loss", default="full_kl")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--lr", type=float, default=1e-3, help="the demo's learning rate")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.2, 0.45])
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (one process each)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "opd_masks.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from sparse_opd_peft.lab.toy import heldout_accuracy
    from sparse_opd_peft.masks import mask_from_checkpoints

    world = _world()
    work = Path(args.work_dir) / world.key
    work.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    common = {"work": str(work), "task": args.task, "steps": args.steps, "lr": args.lr, "threads": args.threads,
              "eval_samples": args.eval_samples}  # fmt: skip
    other = "sampled_token" if args.loss != "sampled_token" else "full_kl"
    pool = mp.get_context("spawn").Pool(args.jobs)

    def run_all(jobs: list[dict]) -> list[dict]:
        return pool.map(_job, jobs, chunksize=1)

    anchor = {"acc": heldout_accuracy(world.load_student(), world, args.task, args.eval_samples)}
    teacher = {"acc": heldout_accuracy(world.teacher, world, args.task, args.eval_samples)}
    full_jobs = [common | {"kind": "full", "name": f"full_{loss}_s{s}", "loss": loss, "seed": s,
                           "save": s == 0 and loss == args.loss} for loss in (args.loss, other) for s in seeds]  # fmt: skip
    if not (work / "full_opd").exists():  # the masks come from the seed-0 run's model: (re)train it
        (work / f"full_{args.loss}_s0.json").unlink(missing_ok=True)
    done = run_all(full_jobs)
    full_runs, other_runs = done[: len(seeds)], done[len(seeds) :]

    masks = {"bf16-visible": mask_from_checkpoints(world.student_path, work / "full_opd", rule="bf16_visible")}
    for d in args.densities:
        masks[f"top-{d:.0%} |ΔW|"] = mask_from_checkpoints(
            world.student_path, work / "full_opd", rule="topk", density=d
        )
    jobs = []
    for name, mask in masks.items():
        key = name.replace("%", "").replace(" ", "_").replace("|ΔW|", "absdelta")
        mask.save(work / f"mask_{key}.safetensors", overwrite=True)
        for random in (False, True):
            jobs += [common | {"kind": "masked", "name": f"{'random' if random else 'mask'}_{key}_s{s}", "seed": s,
                               "loss": args.loss, "mask": str(work / f"mask_{key}.safetensors"), "random": random}
                     for s in seeds]  # fmt: skip
    done = iter(run_all(jobs))
    pool.close()
    rows = []
    for name, mask in masks.items():
        ours = [next(done) for _ in seeds]
        rand = [next(done) for _ in seeds]
        rows.append((name, mask.density(), mask.type_stats()["ffn"]["share_of_nnz"], ours, rand))

    n = len(seeds)
    lines = [
        f"Toy world `{world.key}` (shipped), task `{args.task}`, {args.steps} OPD steps × 64 prompts, AdamW lr "
        f"{args.lr:g} (10 warm-up steps, linear decay), held-out greedy accuracy (%) on {args.eval_samples} prompts, "
        f"mean ± std over {n} seed(s); every mask from the seed-0 full run "
        f"(`python benchmarks/bench_opd_masks.py`).",
        "",
        "| run | density (FFN share) | accuracy % | random mask, same per-module counts % |",
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
        f"Full OPD wall-clock per run: {statistics.mean(secs):.0f} s ({args.threads} thread(s), {args.jobs} runs "
        "in parallel).",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    summary = {
        "args": vars(args),
        "world": world.key,
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
