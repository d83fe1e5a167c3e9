"""The end-to-end story on the embedded toy world (``sparse-opd demo``).

1. build or load the toy world (teacher, weak student anchor, tasks);
2. full OPD of the student from the anchor (exact reverse KL by default, lr warm-up + linear decay);
3. diagnose W0 -> W+ (report.json / report.md / PNGs);
4. extract a top-k |ΔW| mask from the checkpoint delta;
5. retrain only the mask's coordinates from W0 with OPD (the sparse adapter), and a random mask of the same
   per-module density (the control);
6. merge the adapter, check the merged model, save the adapter, and write an accuracy table + plots.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import get_peft_model

from .masks import SparseMask
from .tuner import SparseOPDConfig, save_adapter


@dataclass
class DemoConfig:
    """Settings of :func:`run_demo` (defaults: about 10 minutes on 2 CPU cores with a cached toy world)."""

    out: str = "runs/demo"
    cache_dir: str | None = None
    task: str = "add"
    loss: str = "full_kl"
    steps: int = 250
    warmup_steps: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    adapter_lr: float = 1e-3
    density: float = 0.2
    eval_samples: int = 2000
    seed: int = 0
    tiny: bool = False
    threads: int = 1
    progress: bool = True


def _run_config(cfg: DemoConfig, lr: float):
    from .toy import ToyRunConfig

    return ToyRunConfig(
        task=cfg.task, loss=cfg.loss, lr=lr, steps=cfg.steps, batch_size=cfg.batch_size, warmup_steps=cfg.warmup_steps,
        seed=cfg.seed, save_every=max(cfg.steps // 5, 1), progress=cfg.progress,
    )  # fmt: skip


def _opd(student, world, cfg: DemoConfig, lr: float, tag: str, out: Path):
    from .toy import opd_run

    return opd_run(student, world, _run_config(cfg, lr), checkpoint_dir=out / "checkpoints" / tag)


def _accuracy(model, world, cfg: DemoConfig) -> float:
    from .toy import heldout_accuracy

    return heldout_accuracy(model, world, cfg.task, cfg.eval_samples)


def _plot(rows: list[dict], histories: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["run"] for r in rows]
    ax1.bar(
        names, [100 * r["accuracy"] for r in rows], color=["#999", "#333", "#1f77b4", "#2ca02c", "#d62728"][: len(rows)]
    )
    ax1.set_ylabel("held-out greedy accuracy (%)")
    ax1.set_ylim(0, 100)
    ax1.tick_params(axis="x", rotation=25)
    for label in ax1.get_xticklabels():
        label.set_horizontalalignment("right")
    for i, r in enumerate(rows):
        ax1.text(i, 100 * r["accuracy"] + 1, f"{100 * r['accuracy']:.1f}", ha="center")
    for name, hist in histories.items():
        steps = [h["step"] for h in hist if "kl" in h]
        ax2.plot(steps, [h["kl"] for h in hist if "kl" in h], label=name)
    ax2.set_xlabel("step")
    ax2.set_ylabel("teacher reverse KL per token (estimate)")
    ax2.legend()
    fig.suptitle("Sparse OPD on the toy world: full OPD vs masked retraining vs random mask")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(cfg: DemoConfig) -> dict:
    """Run the whole story and write everything to ``cfg.out``; returns the summary dict (also ``demo.json``)."""
    from .diagnostics import diagnose, write_report
    from .toy import ToyRecipe, build_world

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    # The toy models are tiny: one thread is fastest, and steady when other work shares the cores.
    torch.set_num_threads(cfg.threads)
    world = build_world(cfg.cache_dir, ToyRecipe.tiny() if cfg.tiny else None, progress=cfg.progress)
    if cfg.task not in world.tasks:
        raise ValueError(f"task {cfg.task!r} is not in the toy world (has {sorted(world.tasks)})")
    rows = [
        {"run": "student (anchor)", "accuracy": _accuracy(world.load_student(), world, cfg), "trainable": 0},
        {"run": "teacher", "accuracy": _accuracy(world.teacher, world, cfg), "trainable": 0},
    ]
    histories = {}

    full, histories["full OPD"], secs = _opd(world.load_student(), world, cfg, cfg.lr, "full", out)
    full.save_pretrained(out / "full_opd")
    n_full = sum(p.numel() for p in full.parameters())
    rows.append({"run": "full OPD", "accuracy": _accuracy(full, world, cfg), "trainable": n_full, "seconds": secs})

    result = diagnose(world.student_path, out / "full_opd", progress=cfg.progress)
    write_report(result, out / "diagnostics", overwrite=True)

    mask = SparseMask.from_checkpoints(world.student_path, out / "full_opd", rule="topk", density=cfg.density)
    mask.save(out / "mask.safetensors")
    controls = {
        f"top-{cfg.density:.0%} abs-delta mask": mask,
        "random mask": SparseMask.random_like(mask, seed=cfg.seed),
    }
    adapter_model = None
    for name, m in controls.items():
        peft_model = get_peft_model(world.load_student(), SparseOPDConfig(mask=m, save_dtype="bfloat16"))
        trained, histories[name], secs = _opd(peft_model, world, cfg, cfg.adapter_lr, name.split()[0], out)
        rows.append({"run": name, "accuracy": _accuracy(trained, world, cfg), "trainable": m.nnz(), "seconds": secs})
        if adapter_model is None:
            adapter_model = trained
    from .model_card import record_training

    recipe = asdict(_run_config(cfg, cfg.adapter_lr))
    recipe.update(
        teacher=str(world.path / "teacher"), optimizer="adamw", mask=f"top-{cfg.density:.0%} |dW| of full OPD"
    )
    record_training(adapter_model, recipe, diagnostics=result)
    save_adapter(adapter_model, out / "adapter")
    visibility = adapter_model.bf16_visibility()["share"]
    merged = adapter_model.merge_and_unload()
    merged_acc = _accuracy(merged, world, cfg)

    _plot(rows, histories, out / "accuracy.png")
    summary = {
        "config": asdict(cfg),
        "world": {"key": world.key, "accuracies_at_build": world.accuracies},
        "results": rows,
        "merged_adapter_accuracy": merged_acc,
        "mask": {"density": mask.density(), "nnz": mask.nnz(), "by_type": mask.type_stats()},
        "adapter_bf16_visible_share": visibility,
        "diagnostics_summary": result.to_dict()["summary"],
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str))
    lines = [
        f"# Sparse OPD demo (task `{cfg.task}`, {cfg.steps} steps × {cfg.batch_size} prompts, "
        f"{cfg.eval_samples} held-out prompts, seed {cfg.seed})",
        "",
        "| run | held-out accuracy | trainable params | train time (s) |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['run']} | {100 * r['accuracy']:.1f} % | {r['trainable']:,} | {r.get('seconds', 0):.0f} |")
    lines += [
        "",
        f"Merged adapter (merge_and_unload): {100 * merged_acc:.1f} %. bf16-visible share of the adapter delta: "
        f"{100 * visibility:.1f} %. Mask density {100 * mask.density():.1f} % "
        f"(FFN share of coordinates {100 * mask.type_stats()['ffn']['share_of_nnz']:.1f} %).",
        "",
        "Diagnostics of W0 -> W+ (full OPD): see `diagnostics/report.md`.",
    ]
    (out / "demo.md").write_text("\n".join(lines) + "\n")
    return summary
