"""Study section "Where OPD sits" (issue 6 item 2; geometry-of-opd.md Table 1, Fig. 2-5).

SFT, OPD and RLVR (GRPO) are trained from the same student anchor on the same prompts with the same steps, lr
schedule and rollouts per step, then compared with :func:`~sparse_opd_peft.diagnostics.diagnose` (W0 = anchor,
W+ = final weights) and :func:`~sparse_opd_peft.diagnostics.trajectory` (the run's 10 trainable-state snapshots).

Matched budget: ``config.steps`` optimizer steps, ``config.lr`` with warm-up and linear decay, and 64 sequences per
step: OPD samples 1 rollout for each of ``batch_size`` prompts, RLVR ``RLVR_GENERATIONS`` rollouts for each of
``batch_size / RLVR_GENERATIONS`` prompts (GRPO needs a group), SFT trains on the ``batch_size`` prompts'
reference completions. GRPO collapses at this world's lr (reward -> 0 within tens of steps, after which every
group is all-wrong and carries no signal), so the section adds ``RLVR*``: the same RLVR at ``RLVR_LR``, where it
learns, with otherwise the same budget. Toy-scale adjustments of the paper's diagnostics (its matrices are 4096 wide, ours 64):
principal angles over the top ``TOP_K`` singular vectors and the principal mask from a rank-``PRINCIPAL_RANK``
reconstruction (the paper's 512 / 64 would span the whole 64-dimensional space and make both metrics trivial).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from .core import RenderInfo, Section, StudyContext, json_roundtrip, mean_std
from .geometry_claims import COLUMNS, LOW_LR, METHODS, SIM_K, claims

RLVR_LR = 1e-4
RLVR_GENERATIONS = 4
TOP_K = 16
PRINCIPAL_RANK = 8
COLORS = {"SFT": "tab:blue", "OPD": "tab:red", "RLVR": "tab:green", "RLVR*": "tab:olive"}

# Paper figures beside ours: (SFT, OPD, RLVR); geometry-of-opd.md Table 1, §3.2, Fig. 4-5 and, for the FFN share,
# dense-supervision-sparse-updates (65-86 % of OPD update energy in FFN modules).
PAPER = {
    "acc": "AIME (not comparable)",
    "bf16_sparsity": "8.1 / 51.6 / 77.2",
    "ffn_energy_share": "– / 65–86 / –",
    "low_magnitude_overlap": "31.9 / 53.6 / 73.5",
    "principal_overlap": "SFT > OPD > RLVR; OPD, RLVR < random",
    "nss": "~1e-3 / ~1e-4 / ~1e-5",
    "principal_angle_deg": ">10 / ~1 / <0.5 (one layer)",
    "relative_norm": "SFT > OPD > RLVR",
    "stable_rank": "SFT expands, OPD flat band, RLVR contracts",
    "sim_early": "OPD ≈ its final channel from the first checkpoint; SFT, RLVR later",
}


def method_changes(ctx: StudyContext, method: str) -> dict[str, Any]:
    """:class:`~sparse_opd_peft.lab.toy.ToyRunConfig` changes of ``method`` at the matched budget (OPD: none)."""
    if method == "SFT":
        return {"loss": "sft"}
    if method == "RLVR":
        return rlvr_changes(ctx)
    if method == "RLVR*":
        return {**rlvr_changes(ctx), "lr": RLVR_LR}
    if method == "OPD":
        return {}
    raise ValueError(f"unknown method {method!r}; choose from {COLUMNS}")


def rlvr_changes(ctx: StudyContext) -> dict[str, Any]:
    """GRPO with ``RLVR_GENERATIONS`` samples per prompt and as many rollouts per step as OPD."""
    return {
        "loss": "rlvr",
        "num_generations": RLVR_GENERATIONS,
        "batch_size": max(1, ctx.config.batch_size // RLVR_GENERATIONS),
    }


def snapshot_every(ctx: StudyContext) -> int:
    """Snapshot interval of every trajectory run (10 snapshots, as :meth:`StudyContext.full_opd`)."""
    return max(ctx.config.steps // 10, 1)


def run_saved(ctx: StudyContext, name: str, *, save_model: bool, save_every: int, **changes: Any) -> dict[str, Any]:
    """:meth:`StudyContext.opd` from the plain anchor, re-run when its cached artefacts were removed."""

    def go() -> dict[str, Any]:
        return ctx.opd(name, ctx.world.load_student, save_model=save_model, save_every=save_every, **changes)

    result = go()
    need = [ctx.artifact_dir(name) / "final"] if save_model else []
    need += [ctx.artifact_dir(name) / "checkpoints"] if save_every else []
    if not all(p.exists() for p in need):
        for stale in (name, f"{name}__trajectory", f"{name}__geometry"):  # derived results go with the run
            (ctx.runs_dir / f"{stale}.json").unlink(missing_ok=True)
        shutil.rmtree(ctx.artifact_dir(name), ignore_errors=True)
        result = go()
    return result


def method_run(ctx: StudyContext, method: str, seed: int) -> tuple[str, dict[str, Any], Path]:
    """The run of ``method`` and ``seed`` with final model and snapshots: ``(name, result, artefact dir)``."""
    if method == "OPD":
        result, final = ctx.full_opd(seed)
        return f"opd_full_s{seed}", result, final.parent
    name = f"geo_rlvr_lr{RLVR_LR:g}_s{seed}" if method == "RLVR*" else f"geo_{method.lower()}_s{seed}"
    result = run_saved(ctx, name, save_model=True, save_every=snapshot_every(ctx), seed=seed,
                       **method_changes(ctx, method))  # fmt: skip
    return name, result, ctx.artifact_dir(name)


def _finite(x: Any) -> Any:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def clean(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (recursively through dicts, lists and tuples)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def trajectory_of(ctx: StudyContext, name: str) -> list[dict[str, Any]]:
    """Cached ``[{step, stable_rank, fro_norm, sim_k, hill_alpha}]`` of run ``name``'s snapshots (Sim_K to the
    last one)."""
    from ...diagnostics import trajectory
    from ...opd.checkpoint import snapshot_paths

    def fn() -> dict[str, Any]:
        snaps = snapshot_paths(ctx.artifact_dir(name) / "checkpoints")
        res = trajectory(ctx.student_path(), [p for _, p in snaps], labels=[str(s) for s, _ in snaps], k=SIM_K,
                         device="cpu", progress=False)  # fmt: skip
        keys = ("stable_rank", "fro_norm", "sim_k", "hill_alpha")
        return {"steps": [{"step": int(r["label"])} | {k: _finite(r[k]) for k in keys} for r in res.steps]}

    return ctx.cached(f"{name}__trajectory", fn)["steps"]


def geometry_of(ctx: StudyContext, name: str) -> dict[str, Any]:
    """Cached diagnose summary of run ``name`` (anchor vs its saved final model), plus the FFN parameter share and
    the Sim_K random baseline (mean over matrices of K / in_features)."""
    from ...diagnostics import diagnose

    def fn() -> dict[str, Any]:
        res = diagnose(ctx.student_path(), ctx.artifact_dir(name) / "final", top_k=TOP_K,
                       principal_rank=PRINCIPAL_RANK, device="cpu", progress=False)  # fmt: skip
        s, rows = res.summary, res.matrices
        keys = ("bf16_sparsity", "ffn_energy_share", "low_magnitude_overlap", "principal_overlap", "nss",
                "principal_angle_deg", "relative_norm", "stable_rank", "hill_alpha")  # fmt: skip
        out = {k: _finite(s.get(k)) for k in keys}
        numel = sum(r["numel"] for r in rows)
        out["ffn_param_share"] = sum(r["numel"] for r in rows if r["type"] == "ffn") / numel
        out["sim_random"] = sum(min(SIM_K, *r["shape"]) / r["shape"][1] for r in rows) / len(rows)
        return out

    return {k: v for k, v in ctx.cached(f"{name}__geometry", fn).items() if k != "wall_seconds"}


def _at_fraction(traj: list[dict[str, Any]], key: str, frac: float) -> Any:
    """Value of ``key`` at the snapshot closest to ``frac`` of the run."""
    if not traj:
        return None
    end = traj[-1]["step"]
    return min(traj, key=lambda r: abs(r["step"] - frac * end))[key]


def _fmt_sci(values: list[Any]) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "–"
    m = sum(v) / len(v)
    if len(v) == 1:
        return f"{m:.2e}"
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
    return f"{m:.2e} ± {sd:.1e}"


def _mean(values: list[Any]) -> float:
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v else math.nan


def plot_trajectories(
    path: Path,
    curves: dict[str, list[list[dict[str, Any]]]],
    keys: tuple[str, ...],
    title: str,
    colors: dict[str, str] | None = None,
    random: float | None = None,
) -> None:
    """One panel per metric in ``keys`` (``stable_rank`` / ``fro_norm`` / ``sim_k``), one line per curve label (mean
    over seeds, min-max band when several)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = {"stable_rank": "stable rank of ΔW_t", "fro_norm": "‖ΔW_t‖_F (mean over matrices)",
             "sim_k": f"Sim_{SIM_K}(t, end)"}  # fmt: skip
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for label, runs in curves.items():
            runs = [r for r in runs if r]
            if not runs:
                continue
            steps = [p["step"] for p in runs[0]]
            cols = [[r[i][key] if i < len(r) and r[i][key] is not None else math.nan for r in runs]
                    for i in range(len(steps))]  # fmt: skip
            mean = [_mean([c for c in col if not math.isnan(c)]) for col in cols]
            color = (colors or {}).get(label)
            ax.plot(steps, mean, "o-", ms=3, label=label, color=color)
            if len(runs) > 1:
                ax.fill_between(steps, [min(c) for c in cols], [max(c) for c in cols], alpha=0.15, color=color)
        ax.set_ylim(bottom=0)  # absolute scale: a 5 % gap should look like one
        if key == "sim_k":
            ax.set_ylim(0, 1.05)
            if random is not None:
                ax.axhline(random, color="k", ls=":", lw=1, label=f"random ({random:.2f})")
        ax.set(xlabel="optimizer step", title=names[key])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _late_reward(result: dict[str, Any]) -> Any:
    """Mean training reward over the last 10 % of steps (None without rollouts, e.g. SFT)."""
    h = [r["reward"] for r in result["history"] if "reward" in r]
    tail = h[-max(1, len(h) // 10) :]
    return sum(tail) / len(tail) if tail else None


def _collect(ctx: StudyContext) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[Any]], dict[str, Any]]:
    """Train / load every run of the section: ``(per-column rows, per-column trajectories, low-lr rows)``."""
    per: dict[str, list[dict[str, Any]]] = {m: [] for m in COLUMNS}
    trajs: dict[str, list[list[dict[str, Any]]]] = {m: [] for m in COLUMNS}
    for seed in ctx.seeds:
        for m in COLUMNS:
            name, result, _ = method_run(ctx, m, seed)
            traj, geo = trajectory_of(ctx, name), geometry_of(ctx, name)
            per[m].append({"seed": seed, "run": name, "acc": result["acc"], "train_seconds": result["train_seconds"],
                           "late_reward": _late_reward(result), **geo,
                           "fro_end": traj[-1]["fro_norm"] if traj else None,
                           "stable_rank_first": traj[0]["stable_rank"] if traj else None,
                           "sim_early": _at_fraction(traj, "sim_k", 0.2),
                           "sim_early_step": _at_fraction(traj, "step", 0.2)})  # fmt: skip
            trajs[m].append(traj)
    low: dict[str, dict[str, Any]] = {}
    for m in METHODS:  # one seed, no snapshots: a point where bf16 sparsity is not saturated
        name = f"geo_lowlr{LOW_LR:g}_{m.lower()}_s0"
        result = run_saved(ctx, name, save_model=True, save_every=0, seed=0, **{**method_changes(ctx, m), "lr": LOW_LR})
        low[m] = {"run": name, "acc": result["acc"], **geometry_of(ctx, name)}
    return per, trajs, low


def run(ctx: StudyContext) -> Section:
    """Train SFT / OPD / RLVR / RLVR* per seed (plus one low-lr point), diagnose them and write the section."""
    n = len(ctx.seeds)
    per, trajs, low = _collect(ctx)
    means = {k: {m: _mean([r[k] for r in per[m]]) for m in COLUMNS} for k in per["OPD"][0] if k not in ("run", "seed")}
    ctx.plots.mkdir(parents=True, exist_ok=True)
    plot = ctx.plots / "geometry_trajectories.png"
    plot_trajectories(plot, trajs, ("stable_rank", "fro_norm", "sim_k"),
                      f"Cumulative update ΔW_t per method (mean over {n} seed(s), band = min–max)", COLORS,
                      means["sim_random"]["OPD"])  # fmt: skip
    data = {"methods": per, "means": means, "low_lr": {"lr": LOW_LR, **low}, "trajectories": trajs,
            "budget": {"steps": ctx.config.steps, "lr": ctx.config.lr, "sequences_per_step": ctx.config.batch_size,
                       **rlvr_changes(ctx), "rlvr_star_lr": RLVR_LR}}  # fmt: skip
    data, plots = json_roundtrip(clean(data)), [str(plot.relative_to(ctx.out))]
    title = "Where OPD sits: SFT vs OPD vs RLVR"
    return Section("geometry", title, render(RenderInfo.from_context(ctx), data, plots), data, plots)


def render(info: RenderInfo, data: dict[str, Any], plots: list[str]) -> str:
    """The section's markdown from its data (as stored in ``study.json``)."""
    steps, lr, n = info.config.steps, info.config.lr, info.config.seeds
    per, trajs = data["methods"], data["trajectories"]
    low = {m: data["low_lr"][m] for m in METHODS}
    anchor = info.anchor

    def col(m: str, key: str) -> list[Any]:
        return [r[key] for r in per[m]]

    means = {k: {m: math.nan if v is None else v for m, v in d.items()} for k, d in data["means"].items()}
    pct = lambda key: [mean_std(col(m, key), 100) for m in COLUMNS]  # noqa: E731
    num = lambda key, d=2: [mean_std(col(m, key), 1, d) for m in COLUMNS]  # noqa: E731
    sim_rand = means["sim_random"]["OPD"]
    rows = [
        (f"held-out accuracy (%) [anchor {100 * anchor:.1f}]", pct("acc"), PAPER["acc"]),
        ("train reward, last 10 % of steps (%)", pct("late_reward"), "–"),
        ("bf16 update sparsity (%)", pct("bf16_sparsity"), PAPER["bf16_sparsity"]),
        (f"FFN share of Σ‖ΔW‖²_F (%) [FFN param share {100 * means['ffn_param_share']['OPD']:.0f} %]",
         pct("ffn_energy_share"), PAPER["ffn_energy_share"]),
        ("low-magnitude overlap (%) [random 50]", pct("low_magnitude_overlap"), PAPER["low_magnitude_overlap"]),
        (f"principal overlap (%) [random 50; rank-{PRINCIPAL_RANK} W0]", pct("principal_overlap"),
         PAPER["principal_overlap"]),
        ("NSS", [_fmt_sci(col(m, "nss")) for m in COLUMNS], PAPER["nss"]),
        (f"principal angle, top-{TOP_K} mean (°)", num("principal_angle_deg"), PAPER["principal_angle_deg"]),
        ("‖ΔW‖_F / ‖W0‖_F (matrix mean)", num("relative_norm", 3), PAPER["relative_norm"]),
        (f"stable rank of ΔW_t, step {max(steps // 10, 1)} → end",
         [f"{mean_std(col(m, 'stable_rank_first'), 1, 2)} → {mean_std(col(m, 'stable_rank'), 1, 2)}"
          for m in COLUMNS], PAPER["stable_rank"]),
        ("‖ΔW_end‖_F (matrix mean)", num("fro_end", 3), "OPD > RLVR"),
        (f"Sim_{SIM_K}(≈20 % of run, end) [random {sim_rand:.2f}]", num("sim_early"), PAPER["sim_early"]),
        ("train wall-clock (s)", num("train_seconds", 0), "–"),
    ]  # fmt: skip
    table = [
        f"| metric | SFT | OPD | RLVR | RLVR* (lr {RLVR_LR:g}) | paper (SFT / OPD / RLVR) |",
        "|---|---|---|---|---|---|",
    ]
    table += [f"| {label} | {' | '.join(vals)} | {paper} |" for label, vals, paper in rows]
    low_keys = (("acc", "held-out accuracy (%)"), ("bf16_sparsity", "bf16 update sparsity (%)"),
                ("low_magnitude_overlap", "low-magnitude overlap (%)"), ("principal_overlap", "principal overlap (%)"),
                ("ffn_energy_share", "FFN energy share (%)"))  # fmt: skip
    low_table = [f"| lr {LOW_LR:g}, seed 0 | SFT | OPD | RLVR |", "|---|---|---|---|"]
    low_table += [
        f"| {label} | " + " | ".join(mean_std([low[m][k]], 100) for m in METHODS) + " |" for k, label in low_keys
    ]
    low_table.append("| NSS | " + " | ".join(_fmt_sci([low[m]["nss"]]) for m in METHODS) + " |")
    budget = (f"Matched budget: {steps} steps, lr {lr:g} (10 warm-up steps, linear decay), {info.config.batch_size} "
              f"sequences per step for every method: SFT and OPD {info.config.batch_size} prompts × 1, RLVR (GRPO, "
              f"std-normalised group advantages) {data['budget']['batch_size']} prompts × {RLVR_GENERATIONS} "
              "rollouts; same anchor, same prompt stream. OPD is the shared full-OPD run (exact reverse KL); SFT "
              f"trains on the reference answers. RLVR* is RLVR at lr {RLVR_LR:g}, where GRPO "
              "learns on this world, same budget otherwise. Diagnostics on the block Linear weights (W0 = anchor): "
              f"principal angles over the top {TOP_K} singular vectors and the principal mask from a "
              f"rank-{PRINCIPAL_RANK} reconstruction (scaled down from the paper's 512 / 64 for 64-wide matrices); "
              f"trajectories from {len(trajs['OPD'][0])} snapshots. Sim_{SIM_K}'s random level is K / in_features.")  # fmt: skip
    return "\n".join([budget, "", *table, "", f"One low-lr point (lr {LOW_LR:g}, seed 0, same budget otherwise):",
                      "", *low_table, "", "Paper claims on the toy world:", "", *claims(means, low, anchor, lr, n), "",
                      f"![trajectories](plots/{Path(plots[0]).name})", ""])  # fmt: skip
