"""Training-step time (and peak memory on CUDA): sparse OPD adapter vs peft LoRA r=16, SHiRA and Super-Tuning with the
same coordinates, and full fine-tuning — side by side in one process, interleaved.

All models are built from one Qwen3 (same weights, FFN + attention Linears targeted, AdamW, one fixed batch) and kept
in memory; after 2 warm-up steps each, every round runs one step of every model (the order rotated each round), so
machine noise hits all methods alike. Reported per method: the median step time, the median over rounds of the
step-time ratio to LoRA (and to SHiRA / Super-Tuning at the same coordinates), trainable parameters and, on CUDA,
the peak memory a step adds on top of the allocated memory before it plus the trained state (parameters that
require grad and AdamW's moments).

Masks: SHiRA needs exactly r * (in + out) coordinates per module, so every sparse mask has that size, with one r per
density level (about 1 % / 5 % / 50 % of the targeted weights on the CPU preset).

    python benchmarks/bench_adapter_step.py                       # CPU preset (fp32, 1 thread), writes adapter_step.md
    python benchmarks/bench_adapter_step.py --preset gpu --out-dir DIR    # bf16, hidden 2048 x 8 layers, batch 8 x 1024
    python benchmarks/bench_adapter_step.py --preset tiny --device cpu    # seconds; proves the script runs
    python benchmarks/bench_adapter_step.py --profile 0.01                # where one step's time goes (profiler)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from sparse_opd_peft.atomic import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).parent / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRESETS = {
    "cpu": dict(hidden=512, layers=4, inter=1536, heads=8, kv=4, head_dim=64, vocab=128, batch=16, seq=64,
                dtype="float32", device="cpu", densities=[0.01, 0.05, 0.5], rounds=8, name="adapter_step"),
    "gpu": dict(hidden=2048, layers=8, inter=6144, heads=16, kv=8, head_dim=128, vocab=32768, batch=8, seq=1024,
                dtype="bfloat16", device="cuda", densities=[0.01, 0.05, 0.2], rounds=10, name="adapter_step_gpu"),
    "tiny": dict(hidden=64, layers=2, inter=192, heads=4, kv=2, head_dim=16, vocab=128, batch=2, seq=32,
                 dtype="float32", device="cpu", densities=[0.01, 0.05, 0.2], rounds=3, name="adapter_step_tiny"),
}  # fmt: skip


def build_model(p: dict) -> torch.nn.Module:
    """The preset's Qwen3ForCausalLM, seeded, in the preset's dtype on its device."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["inter"], num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"], num_key_value_heads=p["kv"], head_dim=p["head_dim"],
        tie_word_embeddings=False, max_position_embeddings=max(2048, p["seq"]),
    )  # fmt: skip
    with torch.device(p["device"]):
        model = Qwen3ForCausalLM(cfg)
    return model.to(getattr(torch, p["dtype"]))


def targeted(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in TARGETS}


def rank_for(model: torch.nn.Module, density: float) -> int:
    """SHiRA's r giving about ``density`` of the targeted weights in total."""
    mods = targeted(model).values()
    numel = sum(m.weight.numel() for m in mods)
    return max(1, round(density * numel / sum(m.in_features + m.out_features for m in mods)))


def mask_for(model: torch.nn.Module, r: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bool mask (out, in) with exactly r * (in + out) coordinates per targeted Linear (CPU tensors)."""
    dev = next(model.parameters()).device  # drawn on the model's device (fast on CUDA), returned on CPU
    g = torch.Generator(device=dev).manual_seed(seed)
    out = {}
    for name, mod in targeted(model).items():
        n = min(r * (mod.in_features + mod.out_features), mod.weight.numel())
        flat = torch.zeros(mod.weight.numel(), dtype=torch.bool, device=dev)
        flat[torch.randperm(mod.weight.numel(), generator=g, device=dev)[:n]] = True
        out[name] = flat.view_as(mod.weight).cpu()
    return out


def wrap(base: torch.nn.Module, method: str, r: int | None, mask: dict | None, grad_path: str) -> torch.nn.Module:
    """A deep copy of ``base`` with ``method``'s trainable parameters."""
    from peft import LoraConfig, ShiraConfig, get_peft_model

    import sparse_opd_peft

    model = copy.deepcopy(base)
    if method == "full":
        return model
    if method == "frozen":  # the floor: forward + dx through every layer, no weight gradient (embeddings train)
        for name, prm in model.named_parameters():
            prm.requires_grad_(name.endswith("embed_tokens.weight"))
        return model
    if method == "lora":
        return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    if method == "shira":
        cfg = ShiraConfig(r=r, target_modules=TARGETS)
        lookup = {id(model.get_submodule(n)): m for n, m in mask.items()}
        cfg.mask_fn = lambda base_layer, r, lookup=lookup, **kw: lookup[id(base_layer)].to(
            device=base_layer.weight.device, dtype=base_layer.weight.dtype
        )
        return get_peft_model(model, cfg)
    if method == "supertuning":
        return _supertuning(model, mask)
    return get_peft_model(model, sparse_opd_peft.SparseOPDConfig(mask=mask, grad_path=grad_path))


def _supertuning(model: torch.nn.Module, mask: dict) -> torch.nn.Module:
    """peft's Super-Tuning with its magnitude-chosen coordinates replaced by ``mask``'s (values zero, float32)."""
    from peft import get_peft_model
    from peft.tuners.supertuning import SupertuningConfig

    pm = get_peft_model(model, SupertuningConfig(sparsity=0.99, target_modules=TARGETS))
    for name, m in mask.items():
        layer = pm.base_model.model.get_submodule(name)
        idx = m.reshape(-1).nonzero().squeeze(1).to(device=layer.get_base_layer().weight.device, dtype=torch.int32)
        layer.supertuning_indices["default"] = idx
        layer.supertuning_values["default"] = torch.nn.Parameter(torch.zeros(idx.numel(), device=idx.device))
    return pm


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step(entry: dict, ids: torch.Tensor, device: str) -> float:
    """One forward + backward + AdamW step; returns seconds: this thread's CPU time on CPU (robust to other processes
    sharing the machine; with one torch thread all the step's work runs on it), wall time on CUDA (synchronized).
    Records CUDA peak memory in ``entry``."""
    model, opt = entry["model"], entry["opt"]
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    clock = time.thread_time if device == "cpu" else time.perf_counter
    t, w = clock(), time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(device)
    dt = clock() - t
    entry.setdefault("wall", []).append(time.perf_counter() - w)
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        entry["step_peak_mb"] = max(entry.get("step_peak_mb", 0.0), peak)
    return dt


def state_mb(entry: dict) -> float:
    """MB held by the trained parameters and their AdamW state."""
    total = sum(p.numel() * p.element_size() for p in entry["params"])
    for st in entry["opt"].state.values():
        total += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    return total / 2**20


def methods_for(p: dict, only: list[str] | None) -> list[tuple[str, str, float | None, str]]:
    """(label, method, density, grad_path) for every configuration of the preset."""
    out = [("lora", "lora", None, "-"), ("full", "full", None, "-"), ("frozen (floor)", "frozen", None, "-")]
    ours_paths = ["auto"] if p["device"] == "cpu" else ["dense_rows", "sampled"]
    for d in p["densities"]:
        for gp in ours_paths:
            out.append((f"sparse_opd[{gp}] {d:.0%}", "sparse_opd", d, gp))
        out += [(f"shira {d:.0%}", "shira", d, "-"), (f"supertuning {d:.0%}", "supertuning", d, "-")]
    if only:
        out = [m for m in out if m[1] in only or m[1] == "lora"]
    return out


def run(p: dict, only: list[str] | None, rounds: int, on_round=None) -> dict:
    """Build every configuration, warm up, run the interleaved rounds; returns the JSON-able result (and hands the
    result so far to ``on_round`` after every round, so a run cut short by a time limit still leaves a table)."""
    device = p["device"]
    base = build_model(p)
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, p["vocab"], (p["batch"], p["seq"]), generator=g).to(device)
    masks, entries, errors = {}, [], {}
    for label, method, d, gp in methods_for(p, only):
        r = rank_for(base, d) if d is not None else None
        if d is not None and d not in masks:
            masks[d] = mask_for(base, r)
        try:  # one method failing (a tuner missing, out of memory) is recorded; the others still run
            model = wrap(base, method, r, masks.get(d), gp)
        except Exception as e:
            errors[label] = f"{type(e).__name__}: {e}"[:500]
            continue
        model.train()
        params = [q for q in model.parameters() if q.requires_grad]
        coords = sum(int(m.sum()) for m in masks[d].values()) if d is not None else None
        entries.append({"label": label, "method": method, "density": d, "grad_path": gp, "model": model,
                        "params": params, "opt": torch.optim.AdamW(params, lr=1e-4), "coords": coords,
                        "trainable": sum(q.numel() for q in params), "times": []})  # fmt: skip
    del base
    for i in range(-2, rounds):  # 2 warm-up steps each, then the timed rounds
        order = entries[i % len(entries) :] + entries[: i % len(entries)] if i >= 0 else list(entries)
        for e in order:
            try:
                t = step(e, ids, device)
            except Exception as err:
                errors[e["label"]] = f"{type(err).__name__}: {err}"[:500]
                entries.remove(e)
                e.clear()
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            if i >= 0:
                e["times"].append(t)
        if on_round is not None and i >= 0:
            on_round(dict(summarize(p, entries, i + 1), errors=errors))
    res = summarize(p, entries, rounds)
    res["errors"] = errors
    return res


def _ratio(a: dict, b: dict | None) -> float | None:
    if b is None:
        return None
    return statistics.median(x / y for x, y in zip(a["times"], b["times"], strict=True))


def summarize(p: dict, entries: list[dict], rounds: int) -> dict:
    lora = next(e for e in entries if e["method"] == "lora")
    rows = []
    for e in entries:
        same = {m: next((o for o in entries if o["method"] == m and o["density"] == e["density"]), None)
                for m in ("shira", "supertuning")}  # fmt: skip
        row = {k: e[k] for k in ("label", "method", "density", "grad_path", "trainable", "coords")}
        row |= {"step_s": statistics.median(e["times"]), "wall_s": statistics.median(e["wall"][2:]), "x_lora": _ratio(e, lora),
                "x_shira": _ratio(e, same["shira"]), "x_supertuning": _ratio(e, same["supertuning"])}  # fmt: skip
        if p["device"] == "cuda":
            row |= {"step_peak_mb": e["step_peak_mb"], "state_mb": state_mb(e)}
        rows.append(row)
    if p["device"] == "cuda":
        lt = next(r for r in rows if r["method"] == "lora")
        for r in rows:
            if r["coords"]:
                extra = (r["step_peak_mb"] + r["state_mb"]) - (lt["step_peak_mb"] + lt["state_mb"])
                r["extra_bytes_per_coord_vs_lora"] = extra * 2**20 / r["coords"]
    device = torch.cuda.get_device_name() if p["device"] == "cuda" else "cpu"
    return {"preset": p, "device": device, "threads": torch.get_num_threads(), "rounds": rounds, "rows": rows}


def to_markdown(res: dict, command: str) -> str:
    p = res["preset"]
    cuda = p["device"] == "cuda"
    clock = "wall time (synchronized)" if cuda else "the thread's CPU time (median wall time in the JSON)"
    head = (
        f"Qwen3 (hidden {p['hidden']}, {p['layers']} layers, intermediate {p['inter']}, vocab {p['vocab']}), "
        f"batch {p['batch']} x {p['seq']} tokens, {p['dtype']}, AdamW, device {res['device']}, "
        f"{res['threads']} torch thread(s); all models in one process, {res['rounds']} interleaved rounds after 2 "
        f"warm-up steps; step = {clock}, ratios are medians of per-round ratios. Generated by `{command}`.\n\n"
    )
    cols = "| method | grad path | trainable | step (s) | × LoRA | × SHiRA same coords | × Super-Tuning same coords |"
    sep = "|---|---|---:|---:|---:|---:|---:|"
    if cuda:
        cols += " step peak (MB) | trained state (MB) | extra B / coord vs LoRA |"
        sep += "---:|---:|---:|"
    lines = [cols, sep]
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in res["rows"]:
        line = (f"| {r['label']} | {r['grad_path']} | {r['trainable']:,} | {r['step_s']:.3f} | {f(r['x_lora'])} | "
                f"{f(r['x_shira'])} | {f(r['x_supertuning'])} |")  # fmt: skip
        if cuda:
            extra = r.get("extra_bytes_per_coord_vs_lora")
            line += f" {r['step_peak_mb']:.0f} | {r['state_mb']:.0f} | {'-' if extra is None else f'{extra:.1f}'} |"
        lines.append(line)
    errors = "".join(f"\n- {k} failed: {v}" for k, v in res.get("errors", {}).items())
    return head + "\n".join(lines) + "\n" + (f"\nNot measured:{errors}\n" if errors else "")


def profile(p: dict, density: float, rows: int = 12) -> str:
    """Where one step's time goes: torch.profiler tables (self CPU time by op, and by op and input shapes) of one step of the
    frozen floor and of ours at ``density`` (after 2 warm-up steps each), then their step times."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    base = build_model(p)
    ids = torch.randint(0, p["vocab"], (p["batch"], p["seq"]), generator=torch.Generator().manual_seed(0))
    r = rank_for(base, density)
    text = [f"# one {p['dtype']} step on {p['device']}, {torch.get_num_threads()} thread(s), density {density:.0%}", ""]
    for label, method in (("frozen (floor)", "frozen"), (f"sparse_opd {density:.0%}", "sparse_opd")):
        model = wrap(base, method, r, mask_for(base, r) if method == "sparse_opd" else None, "auto")
        params = [q for q in model.parameters() if q.requires_grad]
        entry = {"model": model, "opt": torch.optim.AdamW(params, lr=1e-4), "params": params}
        for _ in range(2):
            step(entry, ids, p["device"])
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            secs = step(entry, ids, p["device"])
        by_op = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
        by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows)
        text += [f"## {label}: {secs:.3f} s (profiled step)", "", "by op:", by_op, "by op and input shapes:", by_shape]
    return "\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--device", help="override the preset's device (cpu / cuda)")
    parser.add_argument("--dtype", help="override the preset's dtype (float32 / bfloat16)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: the preset's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--only", help="comma-separated methods besides lora (sparse_opd,shira,supertuning,full,frozen)"
    )
    parser.add_argument("--densities", help="comma-separated densities overriding the preset's")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--profile", type=float, metavar="DENSITY", help="profile one step at DENSITY instead")
    args = parser.parse_args()
    p = dict(PRESETS[args.preset])
    p.update({k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v})
    if args.densities:
        p["densities"] = [float(d) for d in args.densities.split(",")]
    torch.set_num_threads(args.threads)
    if args.profile is not None:
        print(profile(p, args.profile))
        return
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = p["name"] if p["device"] == PRESETS[args.preset]["device"] else f"{p['name']}_{p['device']}"
    command = "python benchmarks/bench_adapter_step.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v and k not in ("out_dir",)
    )

    def write(res: dict) -> None:
        write_json_atomic(out / f"{name}.json", res)
        write_text_atomic(out / f"{name}.md", to_markdown(res, command))

    res = run(p, args.only.split(",") if args.only else None, args.rounds or p["rounds"], write)
    write(res)
    print(to_markdown(res, command))


if __name__ == "__main__":
    main()
