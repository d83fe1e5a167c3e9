"""Which OPD estimators learn on the toy world? (issue 14)

Every variant runs at the demo's budget on the shipped toy world (task ``add``, 250 steps x 64 prompts, AdamW lr 1e-3,
10 warm-up steps then linear decay, from the student anchor), one run per seed, scored by greedy exact-match
accuracy on 2000 held-out prompts:

* ``full_kl``: the exact reverse KL over the vocabulary at every visited prefix (the reference);
* ``sampled_token``: the per-token estimator ``A_t = -(log p_s(y_t) - log p_T(y_t))`` (tinker's and verl's k1), plain
  and with the variance reductions of ``OPDConfig``: the log-ratio clipped to ``[-c, c]``
  (``sampled_token_clip``) and a per-position leave-one-out baseline (``sampled_token_baseline="position"``);
* ``topk_kl``: the reverse KL against the teacher's top-k log-probs with the tail as one bucket, at several k.

Each run's result is cached as JSON in ``--work-dir/<world key>/`` and skipped on a re-run; the table goes to
``benchmarks/results/estimators.md``. One process, one torch thread (the runs are tiny)::

    nice -n 19 python benchmarks/bench_estimators.py                            # the default variants, 3 seeds
    nice -n 19 python benchmarks/bench_estimators.py --variants st_plain st_clip1 --seeds 0   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from sparse_opd_peft.atomic import write_json_atomic
from sparse_opd_peft.lab.toy import heldout_accuracy, load_world
from sparse_opd_peft.lab.toy.runs import ToyRunConfig, opd_config, opd_run

ROOT = Path(__file__).resolve().parents[1]


def _st(clip: float | None = None, baseline: str = "none", gamma: float = 0.0) -> dict[str, Any]:
    return {
        "loss": "sampled_token", "sampled_token_clip": clip, "sampled_token_baseline": baseline,
        "sampled_token_prefix_gamma": gamma,
    }  # fmt: skip


# name -> (OPDConfig overrides, description)
VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "full_kl": ({"loss": "full_kl"}, "exact reverse KL over the vocabulary (reference)"),
    "st_plain": (_st(), "sampled_token, plain: A = -(log p_s - log p_T)"),
    "st_base": (_st(baseline="position"), "sampled_token, per-position leave-one-out baseline"),
    "st_base_g2": (
        {**_st(baseline="position"), "num_generations": 2},
        "sampled_token, per-position leave-one-out baseline, 2 samples per prompt (64 prompts: 2x the rollouts)",
    ),
    "st_clip3": (_st(clip=3.0), "sampled_token, log-ratio clipped to ±3"),
    "st_base_clip10": (_st(clip=10.0, baseline="position"), "sampled_token, baseline + log-ratio clipped to ±10"),
    "st_iw": (_st(gamma=0.5), "sampled_token, IW-OPD prefix weights (γ = 0.5)"),
    "st_base_iw": (_st(baseline="position", gamma=0.5), "sampled_token, baseline + IW-OPD prefix weights (γ = 0.5)"),
    # optimiser and sampling settings around st_base (config only)
    **{
        f"st_base_{tag}": ({**_st(baseline="position"), **over}, f"st_base with {what}")
        for tag, over, what in (
            ("gn03", {"max_grad_norm": 0.3}, "gradient-norm clip 0.3 (default 1.0)"),
            ("gn01", {"max_grad_norm": 0.1}, "gradient-norm clip 0.1"),
            ("b99", {"adam_betas": (0.9, 0.99)}, "AdamW betas (0.9, 0.99)"),
            ("b95", {"adam_betas": (0.95, 0.999)}, "AdamW betas (0.95, 0.999)"),
            ("warm50", {"warmup_steps": 50}, "50 warm-up steps (default 10)"),
            ("warm100", {"warmup_steps": 100}, "100 warm-up steps"),
            ("t08", {"temperature": 0.8}, "rollouts at temperature 0.8 (no importance weights: biased to the mode)"),
            ("t06", {"temperature": 0.6}, "rollouts at temperature 0.6 (no importance weights)"),
        )
    },
    **{
        f"topk{k}": ({"loss": "topk_kl", "topk": k}, f"topk_kl, the teacher's top-{k} log-probs + a tail bucket")
        for k in (1, 2, 4)
    },
}
DEFAULT_VARIANTS = [
    "full_kl",
    "st_plain",
    "st_base",
    "st_base_g2",
    "st_base_b99",
    "topk1",
    "topk2",
    "topk4",
]  # every seed
# Variants tried once (seed 0, same budget) whose code was not kept: (what, held-out accuracy %).
NOT_KEPT = [
    (
        "sampled_token, position baseline, advantages also divided by the per-position std (GRPO-style whitening)",
        "76.8 (seed 1: 70.6)",
    ),
    (
        "sampled_token, regression baseline: per-position intercepts + the student's 1 - max p_s and entropy at the prefix, "
        "least squares over the batch",
        "84.8 (seed 1: 87.2)",
    ),
    ("sampled_token, the Rao-Blackwellised student term (now probe `cv_1`) without a baseline", "2.0"),
    ("sampled_token, position baseline, 32 prompts x 2 samples", "74.8"),
    (
        "sampled_token, same-prefix leave-one-out baseline among a prompt's samples (position baseline where no other "
        "sample shares the prefix), 32 prompts x 2 / 16 prompts x 4",
        "52.6 / 60.5",
    ),
    ("sampled_token, position baseline, no gradient-norm clipping (max_grad_norm=None)", "83.5"),
    ("sampled_token, position baseline, lr 5e-4 / 2e-3 instead of 1e-3", "83.2 / 27.3"),
    (
        "sampled_token, position baseline, rollouts at temperature 1.5 / 1.25 / 2.0 with per-token importance weights "
        "capped at 5, an earlier implementation whose code was not kept (its baseline and weighting may differ from "
        "probe `is_t<T>`, which gives 85.2 at temperature 1.5, seed 0), seed 0",
        "92.1 / 92.3 / 81.8 (1.5, seeds 1 / 2: 87.9 / 82.8)",
    ),
    ("sampled_token, position baseline, rollouts at temperature 1.5 without importance weights", "85.7"),
]
PROBE_VARIANTS = [
    "st_clip3", "st_base_clip10", "st_iw", "st_base_iw", "st_base_gn03", "st_base_gn01", "st_base_b95",
    "st_base_warm50", "st_base_warm100", "st_base_t08", "st_base_t06",
]  # fmt: skip  # the first seed only: they do not beat st_base


def run_variant(world: Any, name: str, seed: int, steps: int, task: str, eval_samples: int, work: Path) -> dict:
    """One cached run of variant ``name`` (``VARIANTS``) with ``seed``: accuracy, KL trace and timings."""
    overrides, _ = VARIANTS[name]
    path = work / f"{name}_steps{steps}_s{seed}.json"
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("overrides") == json.loads(json.dumps(overrides)):  # tuples come back as lists
            return cached
    run = ToyRunConfig(task=task).with_(
        **{"loss": "full_kl", "steps": steps, "seed": seed, "progress_bar": False, **overrides}
    )
    model, history, secs = opd_run(world.load_student(), world, run)
    kl = [h["kl"] for h in history]
    result = {
        "variant": name, "overrides": overrides, "seed": seed, "steps": steps, "task": task,
        "acc": heldout_accuracy(model, world, task, eval_samples),
        "kl_trace": {str(k): round(kl[k - 1], 4) for k in (1, 10, 20, 40, 80, 160, steps) if k <= len(kl)},
        "train_seconds": round(secs, 1), "config": opd_config(world, run).to_dict(),
    }  # fmt: skip
    write_json_atomic(path, result)
    print(f"{name} seed {seed}: acc {100 * result['acc']:.1f} %, kl {result['kl_trace']}, {secs:.0f} s", flush=True)
    return result


def _fmt(values: list[float]) -> str:
    pct = [100 * v for v in values]
    return f"{pct[0]:.1f}" if len(pct) == 1 else f"{statistics.mean(pct):.1f} ± {statistics.stdev(pct):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=sorted(VARIANTS))
    ap.add_argument("--probes", nargs="*", default=PROBE_VARIANTS, choices=sorted(VARIANTS), help="first seed only")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--task", default="add")
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("--work-dir", default=str(ROOT / "runs" / "bench_estimators"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "estimators.md"))
    ap.add_argument("--table-only", action="store_true", help="write the table from the cached runs only")
    args = ap.parse_args()
    torch.set_num_threads(1)

    world = load_world()
    work = Path(args.work_dir) / world.key
    work.mkdir(parents=True, exist_ok=True)
    anchor = heldout_accuracy(world.load_student(), world, args.task, args.eval_samples)
    rows = []
    plan = [(n, args.seeds) for n in args.variants] + [(n, args.seeds[:1]) for n in args.probes]
    for name, seeds in plan:
        runs = []
        for s in seeds:
            cached = work / f"{name}_steps{args.steps}_s{s}.json"
            if args.table_only and not cached.exists():
                continue
            runs.append(run_variant(world, name, s, args.steps, args.task, args.eval_samples, work))
        if runs:
            rows.append((name, runs))

    ref = [r["acc"] for n, rs in rows if n == "full_kl" for r in rs]
    ref_mean = statistics.mean(ref) if ref else None
    lines = [
        "# OPD estimators on the toy world",
        "",
        f"World `{world.key}`, task `{args.task}`, {args.steps} steps x 64 prompts, AdamW lr 1e-3, 10 warm-up steps, "
        f"linear decay, from the student anchor ({100 * anchor:.1f} % held-out accuracy). Greedy exact-match accuracy "
        f"(%) on {args.eval_samples} held-out prompts; `kl` is the per-token estimate mean(log p_s - log p_T) on the "
        "step's rollouts (seed-mean) at steps 1 / 40 / last.",
        "",
        "Generated by `nice -n 19 python benchmarks/bench_estimators.py"
        + (f" --variants {' '.join(args.variants)}" if args.variants != DEFAULT_VARIANTS else "")
        + (f" --probes {' '.join(args.probes)}" if args.probes != PROBE_VARIANTS else "")
        + f" --seeds {' '.join(map(str, args.seeds))}`.",
        "",
        "| variant | what | "
        + " | ".join(f"seed {s}" for s in args.seeds)
        + " | mean ± sd | vs full_kl | kl 1 / 40 / last |",
        "|---|---|" + "---|" * len(args.seeds) + "---|---|---|",
    ]
    for name, runs in rows:
        by_seed = {r["seed"]: r for r in runs}
        cells = [f"{100 * by_seed[s]['acc']:.1f}" if s in by_seed else "" for s in args.seeds]
        accs = [r["acc"] for r in runs]
        gap = f"{100 * (statistics.mean(accs) - ref_mean):+.1f}" if ref_mean is not None else ""
        kls = []
        for step in ("1", "40", str(args.steps)):
            vals = [r["kl_trace"][step] for r in runs if step in r["kl_trace"]]
            kls.append(f"{statistics.mean(vals):.2f}" if vals else "-")
        lines.append(
            f"| `{name}` | {VARIANTS[name][1]} | "
            + " | ".join(cells)
            + f" | {_fmt(accs)} | {gap} | {' / '.join(kls)} |"
        )
    probes = ROOT / "benchmarks" / "results" / "estimator_probes.json"
    if probes.exists():
        lines += [
            "",
            "Objectives that need code, not settings (`python benchmarks/estimator_probes.py`; same budget):",
            "",
        ]
        lines += ["| probe | what | accuracy (%) by seed | mean | vs full_kl | kl 1 / 40 / last (seed mean) |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        records = json.loads(probes.read_text())
        for name in dict.fromkeys(r["probe"] for r in records):
            rs = sorted((r for r in records if r["probe"] == name), key=lambda r: r["seed"])
            accs = [r["acc"] for r in rs]
            gap = f"{100 * (statistics.mean(accs) - ref_mean):+.1f}" if ref_mean is not None else ""
            by_seed = ", ".join(f"{100 * r['acc']:.1f} (s{r['seed']})" for r in rs)
            kls = " / ".join(f"{statistics.mean(r['kl_1_40_last'][i] for r in rs):.2f}" for i in range(3))
            what = rs[0]["what"]
            if "beta_1_40_last" in rs[0]:
                what += ": β " + " / ".join(f"{b:.2f}" for b in rs[0]["beta_1_40_last"])
            lines.append(f"| `{name}` | {what} | {by_seed} | {_fmt(accs)} | {gap} | {kls} |")
    if NOT_KEPT:
        lines += ["", "Also tried by an earlier session (seed 0, same budget; code not kept):", ""]
        lines += [f"- {what}: {acc} %" for what, acc in NOT_KEPT]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
