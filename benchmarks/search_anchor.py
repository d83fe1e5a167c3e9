"""Search for a toy student anchor (and OPD learning rate) where the demo's story holds with margin (issue 11).

For each SFT stop of the student's schedule (``--stops``; the recipe's student spec, stopped early on a schedule
planned for ``decay_steps``) and each OPD learning rate (``--lrs``), run full OPD with the demo's recipe (``full_kl``,
250 steps × 64 prompts, 10 warm-up steps, linear decay) for ``--seeds`` seeds and record: the anchor's held-out
accuracy, the final accuracy, the gain, and the bf16-visible density of the update over the block Linears
(``bf16(W+) != bf16(W0)``: the papers' mask rule). The teacher is the shipped world's teacher; the anchors are
snapshots of the shipped recipe's student SFT run (on this machine its step-650 snapshot is the shipped student).

    python benchmarks/search_anchor.py --stops 550 600 650 700 --lrs adamw:1e-3 adamw:2e-3 --seeds 2
    python benchmarks/search_anchor.py --stops 650 800 900 --lrs adamw:1e-4 adamw:1e-5 adamw:1e-6 sgd:0.1 sgd:0.03 \
        --seeds 1 --name bf16_search

Writes ``runs/<name>.json`` (one record per run) and ``benchmarks/results/<name>.md`` (the table). Each worker runs
with one torch thread.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _student_snapshots(world, stops: list[int], spec) -> dict[int, dict[str, torch.Tensor]]:
    from sparse_opd_peft.lab.toy.models import build_model, train_sft
    from sparse_opd_peft.lab.toy.world import _mixture

    recipe = world.recipe
    model = build_model(spec, world.tokenizer, seed=recipe.seed + 1)
    prompts, answers = _mixture(recipe, world.datasets)
    snaps: dict[int, dict[str, torch.Tensor]] = {}

    def grab(step: int, loss: float) -> None:
        if step + 1 in stops:
            snaps[step + 1] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    train_sft(
        model, world.tokenizer, prompts, answers, replace(spec, steps=max(stops)), batch_size=recipe.batch_size,
        seed=recipe.seed + 1, weight_decay=recipe.weight_decay, progress=False, callback=grab,
    )  # fmt: skip
    return snaps


def _bf16_density(w0: dict[str, torch.Tensor], w1: dict[str, torch.Tensor]) -> float:
    changed = total = 0
    for name, a in w0.items():
        if a.ndim != 2 or "layers." not in name:
            continue
        b = w1[name]
        changed += int((a.to(torch.bfloat16) != b.to(torch.bfloat16)).sum())
        total += a.numel()
    return changed / total


def _job(args: tuple) -> dict:
    _, stop, state, lr, seed, task, steps, n_eval = args
    optimizer, lr = lr.split(":") if isinstance(lr, str) else ("adamw", lr)
    torch.set_num_threads(1)
    from sparse_opd_peft.lab.toy import ToyRunConfig, heldout_accuracy, load_world, opd_run

    world = load_world()
    student = world.load_student()
    student.load_state_dict(state)
    w0 = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = ToyRunConfig(task=task).with_(lr=float(lr), optimizer=optimizer, seed=seed, steps=steps, progress_bar=False)
    model, hist, secs = opd_run(student, world, cfg)
    return {
        "stop": stop, "lr": args[3], "seed": seed, "final": heldout_accuracy(model, world, task, n_eval),
        "bf16_density": _bf16_density(w0, model.state_dict()), "seconds": round(secs, 1),
        "final_kl": hist[-1].get("kl"),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stops", type=int, nargs="+", default=[450, 550, 650, 750, 850])
    ap.add_argument("--decay-steps", type=int, default=2000)
    ap.add_argument("--lrs", nargs="+", default=["adamw:1e-3"], help="optimizer:lr pairs (adamw / sgd)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--task", default="add")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--eval-samples", type=int, default=1000)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--name", default="anchor_search", help="names runs/<name>.json and benchmarks/results/<name>.md")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from sparse_opd_peft.lab.toy import heldout_accuracy, load_world

    world = load_world()
    spec = replace(world.recipe.student, decay_steps=args.decay_steps)
    snaps = _student_snapshots(world, args.stops, spec)
    anchors = {}
    for stop, state in snaps.items():
        m = world.load_student()
        m.load_state_dict(state)
        anchors[stop] = {t: heldout_accuracy(m, world, t, args.eval_samples) for t in world.tasks}
        print(f"anchor SFT step {stop}: " + ", ".join(f"{t} {100 * a:.1f} %" for t, a in anchors[stop].items()))
    jobs = [
        (None, stop, snaps[stop], lr, seed, args.task, args.steps, args.eval_samples)
        for stop in args.stops
        for lr in args.lrs
        for seed in range(args.seeds)
    ]
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        results = []
        for r in pool.imap_unordered(_job, jobs):
            r["anchor"] = anchors[r["stop"]][args.task]
            r["gain"] = r["final"] - r["anchor"]
            print(json.dumps(r), flush=True)
            results.append(r)
    out = Path("runs") / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "world": world.key, "anchors": anchors, "runs": results}, indent=1))
    cmd = "python benchmarks/search_anchor.py " + " ".join(sys.argv[1:])
    lines = [
        f"Toy world `{world.key}` (shipped): its teacher; anchors = snapshots of its student's SFT run at the given step "
        f"(schedule planned for {args.decay_steps} steps). Full OPD of every parameter from each anchor: `full_kl`, "
        f"{args.steps} steps × 64 prompts, 10 warm-up steps, linear decay, task `{args.task}`. Accuracy (%) on "
        f"{args.eval_samples} held-out prompts; bf16-visible density = share of block-Linear entries with "
        f"bf16(W+) != bf16(W0). Generated by `{cmd}`.",
        "",
        "| SFT stop | anchor add / sub % | optimizer:lr | final % per seed | min gain (points) | bf16-visible density % |",
        "|---:|---|---|---|---:|---:|",
    ]
    for stop in args.stops:
        for lr in args.lrs:
            rs = sorted((r for r in results if r["stop"] == stop and r["lr"] == lr), key=lambda r: r["seed"])
            a = anchors[stop]
            finals = ", ".join(f"{100 * r['final']:.1f}" for r in rs)
            lines.append(
                f"| {stop} | {' / '.join(f'{100 * v:.1f}' for v in a.values())} | {lr} | {finals} | "
                f"{100 * min(r['gain'] for r in rs):+.1f} | "
                f"{100 * statistics.mean(r['bf16_density'] for r in rs):.1f} |"
            )
    md = ROOT / "benchmarks" / "results" / f"{args.name}.md"
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
