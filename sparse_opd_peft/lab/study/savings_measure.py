"""The savings section's measurements: one configuration (full OPD, masked or LoRA; toy or Qwen3 student) per
fresh process, forked from a server process that has only imported the libraries, so that peak memory is that
configuration's own (``python -m sparse_opd_peft.lab.study.savings_measure --serve``; :func:`_measure_all` starts it).
"""

from __future__ import annotations

import json
import resource
import statistics as st
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..continual import dir_bytes

_PRELOAD = ["torch", "transformers", "peft", "accelerate", "sparse_opd_peft", "sparse_opd_peft.opd"]


def _proc_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current resident set
        return True
    except OSError:
        return False


def _wrap(model, method: str, mask, lora_r: int):
    from peft import LoraConfig, get_peft_model

    from ... import SparseOPDConfig

    if method == "full":
        return model
    if method == "masked":
        return get_peft_model(model, SparseOPDConfig(mask=mask))
    return get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=list(mask)))


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """Build, wrap, run ``warmup + steps`` steps and measure (runs in a fresh forked process)."""
    import torch

    from ...masks import SparseMask

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    mask = SparseMask.load(spec["mask"])
    if spec["model"] == "toy":
        from ...opd import OPDTrainer
        from ..toy import load_world, runs

        world = load_world(spec["world"])
        model = _wrap(world.load_student(), spec["method"], mask, spec["lora_r"])
        cfg = runs.ToyRunConfig.from_dict(spec["run"])
        trainer = OPDTrainer(model, world.teacher, world.tokenizer, world.datasets[cfg.task]["train"],
                             runs.opd_config(world, cfg), reward_fn=runs.toy_reward_fn(world, cfg.task))  # fmt: skip
        opt = trainer.optimizer

        def step(i: int) -> None:
            trainer.train(max_steps=i + 1)
    else:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        from ...opd import full_reverse_kl

        qcfg = Qwen3Config(**spec["qwen"])
        model = _wrap(Qwen3ForCausalLM(qcfg), spec["method"], mask, spec["lora_r"])
        torch.manual_seed(1)
        teacher = Qwen3ForCausalLM(qcfg).eval()
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        ids = torch.randint(0, qcfg.vocab_size, (16, 64), generator=torch.Generator().manual_seed(2))
        keep = torch.ones(16, 32, dtype=torch.bool)

        def step(i: int) -> None:
            with torch.no_grad():
                t_logits = teacher(input_ids=ids).logits[:, -33:-1]
            s_logits = model(input_ids=ids).logits[:, -33:-1]
            loss = full_reverse_kl(s_logits, t_logits, keep, qcfg.vocab_size, 256).sum() / keep.numel()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rss0 = _proc_kb("VmRSS")
    hwm_ok = _reset_peak() and rss0 is not None
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        step(i)
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    if hwm_ok:
        growth_kb = _proc_kb("VmHWM") - rss0
    else:
        growth_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss0
    inner = getattr(opt, "optimizer", opt)
    opt_bytes = sum(t.numel() * t.element_size() for s in inner.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor))  # fmt: skip
    model = getattr(model, "module", model)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        file_bytes, weights_bytes = dir_bytes(tmp, "*"), dir_bytes(tmp)
    return {"model": spec["model"], "method": spec["method"], "trainable": trainable, "step_s": st.median(times),
            "step_times": times, "peak_growth_mb": growth_kb / 1024, "peak_via": "VmHWM" if hwm_ok else "ru_maxrss",
            "optimizer_state_bytes": opt_bytes, "file_bytes": file_bytes,
            "weights_bytes": weights_bytes}  # fmt: skip


_MARK = "@@savings-result "


def _fork_measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Fork a child that runs :func:`_child` for ``spec``; ``{"ok": result}`` or ``{"error": message}``."""
    import os

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, report through the pipe, exit without running any parent cleanup
        os.close(r)
        try:
            out = {"ok": _child(spec)}
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            out = {"error": f"{type(err).__name__}: {err}"}
        with os.fdopen(w, "w") as fh:
            fh.write(json.dumps(out))
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as fh:
        text = fh.read()
    _, status = os.waitpid(pid, 0)
    return json.loads(text) if text else {"error": f"the measuring process died (wait status {status})"}


def _serve() -> None:
    """Measurement server (``python -m sparse_opd_peft.lab.study.savings_measure --serve``): import the libraries once, then for
    every JSON spec on stdin fork a fresh child that runs :func:`_child`, and print its result as one marked line."""
    import importlib

    for name in _PRELOAD:
        importlib.import_module(name)
    for line in sys.stdin:
        print(_MARK + json.dumps(_fork_measure(json.loads(line))), flush=True)


def _measure_all(specs: list[dict[str, Any]], in_process: bool = False) -> list[dict[str, Any]]:
    """Measure every spec, each in a fresh process forked from one server process that has only imported the
    libraries (so that peak memory is the configuration's own); results in order. ``in_process``: fork the calling
    process instead (no server start-up; its heap is not clean, so only for smoke tests)."""
    if in_process:
        outs = [_fork_measure(spec) for spec in specs]
        bad = [(spec, o["error"]) for spec, o in zip(specs, outs, strict=True) if "error" in o]
        if bad:
            raise RuntimeError(f"savings measurement {bad[0][0]['model']}/{bad[0][0]['method']} failed: {bad[0][1]}")
        return [o["ok"] for o in outs]
    cmd = [sys.executable, "-m", "sparse_opd_peft.lab.study.savings_measure", "--serve"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    results = []
    try:
        for spec in specs:
            proc.stdin.write(json.dumps(spec) + "\n")
            proc.stdin.flush()
            line = ""
            while not line.startswith(_MARK):
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"the savings measurement server exited (code {proc.poll()})")
            out = json.loads(line[len(_MARK) :])
            if "error" in out:
                raise RuntimeError(f"savings measurement {spec['model']}/{spec['method']} failed: {out['error']}")
            results.append(out["ok"])
    finally:
        proc.stdin.close()
        proc.wait(timeout=120)
    return results


if __name__ == "__main__":
    if sys.argv[1:] != ["--serve"]:
        raise SystemExit("usage: python -m sparse_opd_peft.lab.study.savings_measure --serve  (the study starts it)")
    _serve()
