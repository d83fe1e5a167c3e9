"""Continual post-training on the toy world: T1 = add -> T2 = sub, full OPD vs LoRA vs our sparse adapter (issue 7.3).

Each stage is OPD (``ToyRunConfig`` recipe: ``full_kl``, AdamW lr 1e-3, 10 warm-up steps, linear decay, 64
prompts per step) from the previous stage's result, with one of:

* full-parameter OPD;
* peft LoRA on the block Linear modules, rank chosen so that its trainable count is closest to our adapter's,
  ``lora_alpha = 2·r``;
* our ``SparseOPDConfig`` adapter on the stage's own mask: top-``--density`` |ΔW| of a ``--probe-steps`` full-OPD
  probe run of that stage from the current model (the probe's steps are counted in the cost column). Stage 2 comes
  without a budget and with churn budgets (``--reuse-shares``): at most that share of stage 1's coordinates may be
  reused; 0 = disjoint, passed as ``SparseOPDConfig(mask=..., exclude=<stage-1 mask>)`` too.

Adapters are kept as separate named peft adapters (both active, stage 1 frozen) or merged in turn
(``merge_and_unload`` before stage 2 is added); ``--modes`` picks which. Per run a JSON lands in the work dir
(``--work-dir/<world key>-<settings hash>/``), with the stage-1 models / adapters / masks it needs; a re-run skips
finished runs. Writes ``benchmarks/results/continual.md`` (the README table) and ``continual.json``.

    python benchmarks/bench_continual.py --threads 1             # default toy world, ~6 min per seed on one thread
    python benchmarks/bench_continual.py --threads 1 --seeds 2   # the README table
    python benchmarks/bench_continual.py --tiny                  # smoke run on ToyRecipe.tiny() (seconds)

Multi-adapter notes (what works with our adapter): two SparseOPD adapters can be active together
(``model.add_adapter("sub", SparseOPDConfig(mask=..., exclude=...))`` then ``model.base_model.set_adapter(["add",
"sub"])``; ``PeftModel.set_adapter`` takes one name only, and activating re-enables gradients on every active
adapter, so the earlier one is frozen by hand); both reload onto the anchor with ``PeftModel.from_pretrained`` +
``load_adapter``. Merged in turn, the stage-2 adapter records the fingerprint of the merged stage-1 model, so it
loads onto that model only (the anchor is refused with a fingerprint mismatch).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("add", "sub")
MATCH_POINTS = 2.0  # "matched accuracy": stage-2 accuracy within this many points


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", default=None, help="toy-world cache (default $SPARSE_OPD_CACHE or ~/.cache)")
    ap.add_argument("--work-dir", default=None, help="per-run JSON and stage artifacts (default runs/bench_continual)")
    ap.add_argument("--tiny", action="store_true", help="ToyRecipe.tiny() smoke run (small steps, batch and eval)")
    ap.add_argument("--steps", type=int, default=None, help="OPD steps per stage (default 250; --tiny 12)")
    ap.add_argument("--probe-steps", type=int, default=None, help="full-OPD probe steps (default 50; --tiny 4)")
    ap.add_argument("--density", type=float, default=0.2, help="top-k |ΔW| density of our masks")
    ap.add_argument("--reuse-shares", type=float, nargs="*", default=[0.0],
                    help="stage-2 churn budgets: max share of stage-1 coordinates reused (0 = disjoint)")  # fmt: skip
    ap.add_argument("--modes", nargs="+", default=["separate", "merged"], choices=["separate", "merged"])
    ap.add_argument("--seeds", type=int, default=1, help="OPD seeds (1 or 2)")
    ap.add_argument("--batch-size", type=int, default=None, help="prompts per step (default 64; --tiny 16)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--eval-samples", type=int, default=None, help="held-out prompts per task (default 2000; --tiny 64)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="markdown table (default benchmarks/results/continual.md; --tiny: "
                    "<work dir>/continual.md); the JSON goes next to it")  # fmt: skip
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    args.command = _command(sys.argv[1:] if argv is None else argv)
    tiny = args.tiny
    for name, full, small in (("steps", 250, 12), ("probe_steps", 50, 4), ("batch_size", 64, 16),
                              ("eval_samples", 2000, 64)):  # fmt: skip
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else full)
    if args.work_dir is None:
        args.work_dir = str(ROOT / "runs" / ("bench_continual_tiny" if tiny else "bench_continual"))
    if args.out is None:
        args.out = str(Path(args.work_dir) / "continual.md") if tiny else str(ROOT / "benchmarks/results/continual.md")
    if not 1 <= args.seeds <= 2:
        ap.error("--seeds must be 1 or 2")
    if not 0 < args.density <= 1:
        ap.error("--density must be in (0, 1]")
    if any(not 0 <= r <= 1 for r in args.reuse_shares):
        ap.error("--reuse-shares must be in [0, 1]")
    if args.steps < 1 or args.probe_steps < 1:
        ap.error("--steps and --probe-steps must be >= 1")
    return args


def _command(argv: list[str]) -> str:
    """The command line that made the table, without local paths and --quiet."""
    keep, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--cache-dir", "--work-dir", "--out"):
            skip = True
        elif arg.split("=")[0] not in ("--cache-dir", "--work-dir", "--out", "--quiet"):
            keep.append(arg)
    return " ".join(["python benchmarks/bench_continual.py", *keep])


def _settings_hash(args: argparse.Namespace) -> str:
    keys = ("steps", "probe_steps", "density", "batch_size", "lr", "eval_samples")
    return hashlib.sha256(json.dumps({k: getattr(args, k) for k in keys}, sort_keys=True).encode()).hexdigest()[:10]


def _budget_tag(share: Optional[float]) -> str:
    return "own" if share is None else f"reuse{round(100 * share)}"


def _budget_label(share: Optional[float], density: float) -> str:
    if share is None:
        return f"ours, own top-{density:.0%} mask"
    if share == 0:
        return f"ours, own top-{density:.0%} mask disjoint from stage 1 (exclude)"
    return f"ours, own top-{density:.0%} mask reusing ≤ {share:.0%} of stage 1"


class Bench:
    """The benchmark's runs, each cached as ``<work>/<name>.json`` (artifacts in ``<work>/<name>/``)."""

    def __init__(self, args: argparse.Namespace):
        from sparse_opd_peft.lab.toy import ToyRecipe, ToyRunConfig, build_world
        from sparse_opd_peft.lab.toy.runs import toy_opd_config

        self.args = args
        recipe = ToyRecipe.tiny() if args.tiny else None
        self.world = build_world(args.cache_dir, recipe, progress=not args.quiet)
        self.work = Path(args.work_dir) / f"{self.world.key}-{_settings_hash(args)}"
        self.work.mkdir(parents=True, exist_ok=True)
        opd = toy_opd_config(lr=args.lr, steps=args.steps, batch_size=args.batch_size, progress_bar=not args.quiet)
        self.run_cfg = ToyRunConfig(opd=opd)
        self.anchor = self.world.load_student()

    # ------------------------------------------------------------------ plumbing
    def cached(self, name: str, fn: Callable[[Path], dict], needs_artifact: bool = False) -> dict:
        """Result of run ``name``: read from its JSON, or computed by ``fn(artifact_dir)`` and written (artifacts
        first, JSON last, so a JSON means a finished run)."""
        path, art = self.work / f"{name}.json", self.work / name
        if path.exists() and (not needs_artifact or art.exists()):
            return json.loads(path.read_text())
        t0 = time.perf_counter()
        result = fn(art)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        path.write_text(json.dumps(result, indent=1))
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {_short(result)}", flush=True)
        return result

    def accs(self, model: torch.nn.Module) -> dict[str, float]:
        from sparse_opd_peft.lab.toy import heldout_accuracy

        return {t: heldout_accuracy(model, self.world, t, self.args.eval_samples) for t in TASKS}

    def cfg(self, task: str, seed: int, steps: Optional[int] = None) -> Any:
        return self.run_cfg.with_(task=task, seed=seed, steps=steps or self.args.steps)

    def load_adapter(self, art: Path) -> torch.nn.Module:
        """The stage-1 adapter (saved as ``<art>/add``) on a fresh anchor, frozen."""
        from peft import PeftModel

        return PeftModel.from_pretrained(self.world.load_student(), art / "add", adapter_name="add")

    def load_mask(self, path: Path):
        from sparse_opd_peft import SparseMask

        return SparseMask.load(path)

    # ------------------------------------------------------------------ stage 1
    def stage1(self, seed: int) -> dict[str, dict]:
        from sparse_opd_peft.lab.continual import lora_rank_for, probe_mask, run_stage
        from sparse_opd_peft.masks import bf16_churn, block_linear_names

        a, out = self.args, {}

        def metrics(model, stage) -> dict:
            churn = bf16_churn(self.anchor, model)
            return {"acc": self.accs(model), "churn": churn["share"],
                    "churn_all": bf16_churn(self.anchor, model, "all")["share"], "trainable": stage.trainable,
                    "bytes": stage.stage_bytes, "train_seconds": round(stage.seconds, 1),
                    "final_kl": stage.history[-1].get("kl") if stage.history else None, "steps": a.steps}  # fmt: skip

        def full(art: Path) -> dict:
            st = run_stage(self.world.load_student(), self.world, self.cfg("add", seed), "full", save_dir=art)
            return metrics(st.model, st)

        out["full"] = self.cached(f"s{seed}_full_add", full, needs_artifact=True)

        def probe(art: Path) -> dict:
            mask, info = probe_mask(self.anchor, self.world, self.cfg("add", seed, a.probe_steps), a.density)
            art.mkdir(parents=True, exist_ok=True)
            mask.save(art / "mask.safetensors")
            return info

        out["probe"] = self.cached(f"s{seed}_probe_add", probe, needs_artifact=True)
        mask1 = self.load_mask(self.work / f"s{seed}_probe_add" / "mask.safetensors")

        def sparse(art: Path) -> dict:
            st = run_stage(self.world.load_student(), self.world, self.cfg("add", seed), "sparse",
                           adapter_name="add", mask=mask1, save_dir=art)  # fmt: skip
            return {**metrics(st.model, st), "nnz": mask1.nnz(), "density": mask1.density()}

        out["sparse"] = self.cached(f"s{seed}_sparse_add", sparse, needs_artifact=True)
        targets = block_linear_names(self.anchor)
        rank = lora_rank_for(self.anchor, targets, mask1.nnz())

        def lora(art: Path) -> dict:
            st = run_stage(self.world.load_student(), self.world, self.cfg("add", seed), "lora", adapter_name="add",
                           lora_rank=rank, target_modules=targets, save_dir=art)  # fmt: skip
            return {**metrics(st.model, st), "rank": rank}

        out["lora"] = self.cached(f"s{seed}_lora_add", lora, needs_artifact=True)
        return out

    # ------------------------------------------------------------------ stage 2
    def stage2(self, seed: int, s1: dict[str, dict]) -> dict[str, dict]:
        from transformers import Qwen3ForCausalLM

        from sparse_opd_peft.lab.continual import run_stage
        from sparse_opd_peft.lab.toy import opd_run
        from sparse_opd_peft.masks import (
            bf16_churn,
            block_linear_names,
            budgeted_topk_mask,
            changed_coordinates,
            mask_overlap,
            merged_copy,
        )

        a, out = self.args, {}
        targets = block_linear_names(self.anchor)

        def metrics(stage1_model, stage, stage1_row: dict) -> dict:
            model = stage.model
            ch1, ch2 = changed_coordinates(self.anchor, stage1_model), changed_coordinates(stage1_model, model)
            ov = mask_overlap(ch1, ch2) if ch1 is not None and ch2 is not None else None
            return {"acc": self.accs(model), "churn": bf16_churn(self.anchor, model)["share"],
                    "churn_all": bf16_churn(self.anchor, model, "all")["share"],
                    "churn_stage": bf16_churn(stage1_model, model)["share"], "changed_overlap": ov,
                    "trainable": stage.trainable, "bytes": stage.stage_bytes,
                    "total_bytes": stage.stage_bytes + (0 if stage1_row.get("full") else stage1_row["bytes"]),
                    "train_seconds": round(stage.seconds, 1),
                    "final_kl": stage.history[-1].get("kl") if stage.history else None}  # fmt: skip

        def full(art: Path) -> dict:
            s1_model = Qwen3ForCausalLM.from_pretrained(self.work / f"s{seed}_full_add", dtype=torch.float32).eval()
            before = merged_copy(s1_model)
            st = run_stage(s1_model, self.world, self.cfg("sub", seed), "full", save_dir=art)
            return {**metrics(before, st, {"full": True}), "steps": 2 * a.steps}

        out["full"] = self.cached(f"s{seed}_full_sub", full)
        for mode in a.modes:

            def lora(art: Path, mode: str = mode) -> dict:
                s1_model = self.load_adapter(self.work / f"s{seed}_lora_add")
                before = merged_copy(s1_model)
                st = run_stage(s1_model, self.world, self.cfg("sub", seed), "lora", mode=mode, adapter_name="sub",
                               lora_rank=s1["lora"]["rank"], target_modules=targets, save_dir=art)  # fmt: skip
                return {**metrics(before, st, s1["lora"]), "rank": s1["lora"]["rank"], "steps": 2 * a.steps}

            out[f"lora_{mode}"] = self.cached(f"s{seed}_lora_sub_{mode}", lora)

        # the stage-2 probe: full OPD of `sub` from ours' stage-1 model (shared by every budget and mode)
        def probe(art: Path) -> dict:
            start = merged_copy(self.load_adapter(self.work / f"s{seed}_sparse_add"))
            model, _, secs = opd_run(merged_copy(start), self.world, self.cfg("sub", seed, a.probe_steps))
            model.save_pretrained(art)
            return {"probe_steps": a.probe_steps, "probe_seconds": round(secs, 1)}

        out["probe"] = self.cached(f"s{seed}_probe_sub", probe, needs_artifact=True)
        mask1 = self.load_mask(self.work / f"s{seed}_probe_add" / "mask.safetensors")
        probe_model = None
        for share in [None, *a.reuse_shares]:
            tag = _budget_tag(share)
            mask_path = self.work / f"s{seed}_mask_sub_{tag}.safetensors"
            if not mask_path.exists():
                if probe_model is None:
                    probe_model = Qwen3ForCausalLM.from_pretrained(
                        self.work / f"s{seed}_probe_sub", dtype=torch.float32
                    )
                start = self.load_adapter(self.work / f"s{seed}_sparse_add")
                budgeted_topk_mask(start, probe_model, a.density, mask1, share).save(mask_path)
            mask2 = self.load_mask(mask_path)
            overlap = mask_overlap(mask1, mask2)
            for mode in a.modes:

                def sparse(art: Path, mode: str = mode, mask2=mask2, share=share, overlap=overlap) -> dict:
                    s1_model = self.load_adapter(self.work / f"s{seed}_sparse_add")
                    before = merged_copy(s1_model)
                    st = run_stage(s1_model, self.world, self.cfg("sub", seed), "sparse", mode=mode,
                                   adapter_name="sub", mask=mask2, exclude=mask1 if share == 0 else None,
                                   save_dir=art)  # fmt: skip
                    return {**metrics(before, st, s1["sparse"]), "mask_overlap": overlap, "nnz": mask2.nnz(),
                            "reused": mask2.metadata.get("reused"), "reuse_share": share,
                            "steps": 2 * a.steps + 2 * a.probe_steps}  # fmt: skip

                out[f"sparse_{tag}_{mode}"] = self.cached(f"s{seed}_sparse_sub_{tag}_{mode}", sparse)
        return out


def _short(result: dict) -> str:
    keep = {k: result[k] for k in ("acc", "churn", "trainable", "bytes", "seconds", "probe_seconds") if k in result}
    return json.dumps(keep)


# ---------------------------------------------------------------------- rendering
def _pct(values: list[float], digits: int = 1) -> str:
    v = [100 * x for x in values if x is not None]
    if not v:
        return "–"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}"


def _mean(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def _bytes(n: float) -> str:
    return f"{n / 1024:,.0f} KiB" if n < 1024**2 else f"{n / 1024**2:,.2f} MiB"


def render(bench: Bench, anchor: dict, teacher: dict, seeds: dict[int, dict]) -> tuple[str, dict]:
    """The markdown table (+ notes) and the JSON summary."""
    a = bench.args
    rows: list[tuple[str, str, str]] = [("full OPD", "full", "full")]
    lora_rank = seeds[0]["s1"]["lora"]["rank"]
    for mode in a.modes:
        rows.append((f"LoRA r={lora_rank}, {mode}", "lora", f"lora_{mode}"))
    for share in [None, *a.reuse_shares]:
        for mode in a.modes:
            rows.append((f"{_budget_label(share, a.density)}, {mode}", "sparse", f"sparse_{_budget_tag(share)}_{mode}"))
    n_sel = seeds[0]["s1"]["sparse"]["nnz"]
    lines = [
        f"Toy world `{bench.world.key}` (student anchor → teacher), T1 = `add` then T2 = `sub`, each stage "
        f"{a.steps} OPD steps × {a.batch_size} prompts (`full_kl`, AdamW lr {a.lr:g}, 10 warm-up steps, linear "
        f"decay) from the previous stage's result; greedy held-out accuracy (%) on {a.eval_samples} prompts per task, "
        f"{len(seeds)} seed(s) (mean ± std). Our masks: top-{a.density:.0%} |ΔW| of a {a.probe_steps}-step full-OPD "
        f"probe of the stage from the current model ({n_sel:,} coordinates of the block Linears); LoRA on the same "
        f"block Linears, rank {lora_rank} (closest trainable count, alpha 2r). Generated by "
        f"`{a.command}`.",
        "",
        "| method | add after T1 | sub after T1 | add after T2 (forgetting) | sub after T2 | cumulative churn T1 → T2 "
        "| adapter bytes T1 + T2 | stage overlap: IoU (random) | T2 share in T1 (random) | OPD steps incl. probes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| student anchor | {_pct([anchor['add']])} | {_pct([anchor['sub']])} | | | | | | | |",
        f"| teacher | {_pct([teacher['add']])} | {_pct([teacher['sub']])} | | | | | | | |",
    ]
    summary_rows = {}
    for label, m1, key in rows:
        r1 = [seeds[s]["s1"][m1] for s in seeds]
        r2 = [seeds[s]["s2"][key] for s in seeds]
        forget = [x["acc"]["add"] - y["acc"]["add"] for x, y in zip(r1, r2, strict=True)]
        ov = [r.get("mask_overlap") or r.get("changed_overlap") for r in r2]
        ov = [o for o in ov if o]
        kind = "" if m1 == "sparse" else " ¹"
        iou = f"{_pct([o['iou'] for o in ov])} ({_pct([o['random_iou'] for o in ov])}){kind}" if ov else "–"
        share = (
            f"{_pct([o['share_of_b'] for o in ov])} ({_pct([o['random_share_of_b'] for o in ov])}){kind}" if ov else "–"
        )
        nbytes = _mean([r["total_bytes"] for r in r2])
        churn = f"{_pct([r['churn'] for r in r1])} → {_pct([r['churn'] for r in r2])}"
        lines.append(
            f"| {label} | {_pct([r['acc']['add'] for r in r1])} | {_pct([r['acc']['sub'] for r in r1])} | "
            f"{_pct([r['acc']['add'] for r in r2])} ({_pct(forget)}) | {_pct([r['acc']['sub'] for r in r2])} | "
            f"{churn} | {_bytes(nbytes)}{' ²' if m1 == 'full' else ''} | {iou} | {share} | {r2[0]['steps']} |"
        )
        summary_rows[key] = {
            "label": label,
            "acc_add_t1": _mean([r["acc"]["add"] for r in r1]),
            "acc_sub_t1": _mean([r["acc"]["sub"] for r in r1]),
            "acc_add_t2": _mean([r["acc"]["add"] for r in r2]),
            "acc_sub_t2": _mean([r["acc"]["sub"] for r in r2]),
            "forgetting_add": _mean(forget),
            "churn_t1": _mean([r["churn"] for r in r1]),
            "churn_t2": _mean([r["churn"] for r in r2]),
            "churn_all_t2": _mean([r["churn_all"] for r in r2]),
            "bytes_t1_t2": nbytes,
            "overlap": ov,
            "steps": r2[0]["steps"],
        }
    lines += [
        "",
        "Forgetting = add accuracy after T1 − after T2 (points). Churn = share of the block Linear weight entries whose "
        "bf16 value differs from the anchor's (adapters merged into a float32 copy). Overlap: our stage-1 vs "
        "stage-2 masks; ¹ for full OPD and LoRA, the sets of entries each stage changed in bf16. Random = independent "
        "uniform masks of the same per-module sizes. ² full OPD: one whole float32 checkpoint (every parameter); "
        "adapters: the stage-1 + stage-2 `adapter_model.safetensors` (float32 values). OPD steps count the probes.",
    ]
    lines += ["", *goal_lines(summary_rows, a)]
    secs = [seeds[s]["s1"]["full"]["train_seconds"] for s in seeds]
    lines += ["", f"One {a.steps}-step OPD run: {_mean(secs):.0f} s on {a.threads} thread(s)."]
    summary = {
        "args": vars(a),
        "world": {"key": bench.world.key, "path": str(bench.world.path)},
        "anchor": anchor,
        "teacher": teacher,
        "rows": summary_rows,
        "runs": {str(s): v for s, v in seeds.items()},
    }
    return "\n".join(lines) + "\n", summary


def goal_lines(rows: dict[str, dict], a: argparse.Namespace) -> list[str]:
    """A table comparing each of our variants with full OPD and the LoRA of the same mode on the goal: matched
    new-task accuracy, less forgetting, less churn (means over seeds)."""
    out = [
        f"Goal check (means over seeds; matched = sub accuracy after T2 within {MATCH_POINTS:g} points of the "
        "baseline's; forgetting and retained add accuracy in points, churn in %, ours vs baseline):",
        "",
        "| ours | baseline | Δ sub after T2 | matched | add after T2 | forgetting | less forgetting | churn | less churn |",
        "|---|---|---:|---|---:|---:|---|---:|---|",
    ]
    for key, ours in rows.items():
        if not key.startswith("sparse_"):
            continue
        for b in ("full", "lora_" + key.rsplit("_", 1)[1]):  # full OPD and the LoRA of the same mode
            base = rows[b]
            d_sub = 100 * (ours["acc_sub_t2"] - base["acc_sub_t2"])
            out.append(
                f"| {ours['label']} | {base['label']} | {d_sub:+.1f} | {'yes' if abs(d_sub) <= MATCH_POINTS else 'no'} "
                f"| {100 * ours['acc_add_t2']:.1f} vs {100 * base['acc_add_t2']:.1f} "
                f"| {100 * ours['forgetting_add']:.1f} vs {100 * base['forgetting_add']:.1f} "
                f"| {'yes' if ours['forgetting_add'] < base['forgetting_add'] else 'no'} "
                f"| {100 * ours['churn_t2']:.1f} vs {100 * base['churn_t2']:.1f} "
                f"| {'yes' if ours['churn_t2'] < base['churn_t2'] else 'no'} |"
            )
    return out


def run_benchmark(args: argparse.Namespace) -> dict:
    """Run (or resume) every run and write the markdown table and JSON; returns the JSON summary."""
    torch.set_num_threads(args.threads)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="merging lost most of the adapter delta")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # transformers, via peft
    bench = Bench(args)
    anchor = bench.cached("anchor", lambda _: bench.accs(bench.anchor))
    teacher = bench.cached("teacher", lambda _: bench.accs(bench.world.teacher))
    seeds = {}
    for seed in range(args.seeds):
        s1 = bench.stage1(seed)
        seeds[seed] = {"s1": s1, "s2": bench.stage2(seed, s1)}
    text, summary = render(bench, anchor, teacher, seeds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1, default=str))
    print(text)
    return summary


def main(argv: Optional[list[str]] = None) -> None:
    run_benchmark(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
