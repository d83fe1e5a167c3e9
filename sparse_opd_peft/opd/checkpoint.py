"""Checkpoint I/O of the OPD trainer: trainable-state snapshots for trajectory diagnostics and a pickle-free
resumable training state.

A state directory (:func:`save_training_state`) holds every tensor as safetensors and everything else as JSON::

    opd_trainer_state.json   trainer payload (step, history, config)
    manifest.json            format, version, backend, num_processes, file list, frozen-adapter digests
    trainable.safetensors    {parameter name: tensor} of every requires_grad parameter (a PEFT student: its adapter)
    optimizer.safetensors    {"state.<param index>.<key>": tensor, "param_groups.<group>.<key>": tensor}
    optimizer.json           optimizer class, parameter name and shape per index, ``state_dict()`` skeleton with the
                             tensors replaced by their keys (tuples, int dict keys and float/int/bool/None kept
                             exactly), GradScaler state (fp16 mixed precision)
    rng_<rank>.safetensors   {"torch_cpu": uint8 (5056,), "cuda.<device>": uint8 (16,)}, one per process
    rng_<rank>.json          python ``random.getstate()`` and numpy's global state, one per process

The trainer itself draws every random number from per-sample seeded generators (``sample_seed``); the global RNGs
only feed dropout (attention dropout, ``lora_dropout``), and are saved per process as ``accelerate.save_state`` did.
The codec and RNG helpers live in :mod:`._state_io`.

Writes go to ``<dir>.tmp``, every file atomically, ``manifest.json`` last (so a directory with a manifest whose files
are all there is complete); it is flushed to disk, then swapped in: ``<dir>`` -> ``<dir>.old``, ``<dir>.tmp`` ->
``<dir>``, ``<dir>.old`` removed. A save can be killed at any point: :func:`resolve_state_dir` (used by every reader)
picks the newest complete state among ``<dir>``, ``<dir>.tmp`` and ``<dir>.old``, and the next save first finishes
an interrupted swap. The main process writes everything but each process's ``rng_<rank>`` files, so the directory
must be on a filesystem every process sees. Every process loads; everything is read and checked before the model,
optimizer or RNGs change.

FSDP / DeepSpeed / Megatron-LM: their parameters and optimizer state are sharded or flattened by the engine, so there
the state falls back to ``accelerator.save_state`` / ``load_state`` (which pickles the optimizer and RNG states);
the manifest records ``backend: "accelerate"``, and a state written one way cannot be resumed the other way.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file

from ..atomic import normalize_modes
from ..safetensors_io import atomic_save_safetensors
from . import _state_io as sio

__all__ = [
    "STATE_FILE",
    "load_training_state",
    "read_training_state",
    "resolve_state_dir",
    "save_trainable_state",
    "save_training_state",
    "snapshot_paths",
    "trainable_state_dict",
]

STATE_FILE = "opd_trainer_state.json"
MANIFEST = "manifest.json"
FORMAT, VERSION = "sparse-opd-peft/opd-trainer-state", 1
PARAMS, OPT_TENSORS, OPT_JSON = "trainable.safetensors", "optimizer.safetensors", "optimizer.json"
_ENGINES = ("FSDP", "DEEPSPEED", "MEGATRON_LM")
_MISMATCH_FIX = (
    "resume with the student the run was started with (same adapter: mask / subspace / LoRA rank and targets, "
    "same dtype), or start a new run without resuming"
)
_DAMAGED_FIX = "the directory is incomplete or damaged: resume from another state directory or start the run again"


def trainable_state_dict(
    model: torch.nn.Module, state_dict: Optional[dict[str, torch.Tensor]] = None
) -> dict[str, torch.Tensor]:
    """The trainable state for trajectory diagnostics.

    A PEFT model gives its adapter state (``get_peft_model_state_dict``: e.g. ``sparse_opd_values`` 1-D float32, or
    LoRA's ``lora_A`` / ``lora_B``); a plain model the 2-D weights ``(out, in)`` of every trainable ``nn.Linear``,
    named as in ``model.state_dict()`` so the diagnostics can pair them with the source checkpoint.

    Args:
        model: the bare (unwrapped) student.
        state_dict: a full state dict to select from (e.g. ``accelerator.get_state_dict`` under FSDP / DeepSpeed);
            default ``model.state_dict()``.

    Returns:
        ``{name: tensor}`` on CPU, contiguous copies in the parameters' dtypes.
    """
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model, state_dict=state_dict)
    else:
        names = {
            f"{name}.weight" if name else "weight"
            for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and mod.weight.requires_grad
        }
        full = state_dict if state_dict is not None else model.state_dict()
        state = {k: v for k, v in full.items() if k in names}
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def snapshot_paths(checkpoint_dir: str | Path, include_start: bool = False) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of the ``step_<k>.safetensors`` trainable-state snapshots that :class:`OPDTrainer` writes
    into ``checkpoint_dir`` (``save_every``), in step order; ``step_0`` (the start) only with ``include_start``."""
    found = [(int(p.stem.split("_")[1]), p) for p in Path(checkpoint_dir).glob("step_*.safetensors")]
    return sorted((s, p) for s, p in found if include_start or s > 0)


def save_trainable_state(accelerator: Any, model: torch.nn.Module, path: str | Path, step: int) -> None:
    """Write :func:`trainable_state_dict` of a prepared ``model`` to ``path`` (safetensors, metadata ``step``).
    Call on every process (gathering is collective under FSDP / DeepSpeed); the main process writes."""
    full = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        state = trainable_state_dict(accelerator.unwrap_model(model), full)
        atomic_save_safetensors(state, path, metadata={"step": str(step)})
    accelerator.wait_for_everyone()


def _engine(accelerator: Any) -> Optional[str]:
    """The sharding engine (``"FSDP"``, ``"DEEPSPEED"``, ``"MEGATRON_LM"``) the accelerator runs, else None."""
    kind = accelerator.distributed_type
    name = getattr(kind, "name", str(kind))
    return name if name in _ENGINES else None


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _optimizer_params(optimizer: Any, model: torch.nn.Module) -> list[list[Any]]:
    """``[name, shape]`` per optimizer parameter index (the order of ``optimizer.state_dict()``)."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return [[names.get(id(p), f"<unnamed parameter {i}>"), list(p.shape)] for i, p in enumerate(params)]


# ---------------------------------------------------------------------------------------------- crash safety
def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def complete_step(path: str | Path) -> Optional[int]:
    """The step of ``path`` when it is a complete state directory (a manifest of this format whose files are all
    there, and a payload with an integer ``step``), else None. Reads only the two JSON files."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        payload = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or (manifest.get("format"), manifest.get("version")) != (FORMAT, VERSION):
        return None
    if not isinstance(manifest.get("files"), list) or not all((path / f).is_file() for f in manifest["files"]):
        return None
    step = payload.get("step") if isinstance(payload, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def resolve_state_dir(path: str | Path) -> Path:
    """The newest complete state among ``path``, ``path.tmp`` (a save killed before its swap) and ``path.old`` (killed
    between the swap's two renames); ``path`` on a tie, and ``path`` itself when none is complete (its own errors then
    say what is wrong). Warns when it is not ``path``."""
    path = Path(path)
    found = [(step, -i, c) for i, c in enumerate((path, _sibling(path, ".tmp"), _sibling(path, ".old")))
             if (step := complete_step(c)) is not None]  # fmt: skip
    if not found:
        return path
    step, _, best = max(found)
    if best != path:
        warnings.warn(
            f"{path}: a save was interrupted; using {best} (step {step}), the newest complete state", stacklevel=1
        )
    return best


def _settle(out: Path) -> None:
    """Main process, before a save: finish an interrupted save of ``out`` (the newest complete state becomes
    ``out``) and remove the leftovers. Each step leaves a complete state in place, so it may be killed too."""
    tmp, old, trash = _sibling(out, ".tmp"), _sibling(out, ".old"), _sibling(out, ".trash")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        best = resolve_state_dir(out)
    if best != out:
        if trash.exists():
            shutil.rmtree(trash)
        if out.exists():
            os.replace(out, trash)
        os.replace(best, out)
    for leftover in (tmp, old, trash):
        if leftover.exists():
            shutil.rmtree(leftover)


# ---------------------------------------------------------------------------------------------- writing
def save_training_state(
    accelerator: Any, model: torch.nn.Module, optimizer: Any, output_dir: str | Path, payload: dict[str, Any]
) -> None:
    """Write a resumable state (module docstring layout) to ``output_dir.tmp``, then swap it in, so an interrupted
    save never replaces a good state (see the module docstring: a kill at any point leaves the newest complete state
    for :func:`resolve_state_dir`). Call on every process: the main process writes the parameters, optimizer and
    JSON files, every process its own ``rng_<rank>`` files (the directory must be on a filesystem all see).

    Args:
        accelerator: the ``Accelerator`` that prepared ``model`` and ``optimizer``.
        model: the prepared student (DDP replicas hold identical parameters).
        optimizer: the prepared optimizer (any ``torch.optim.Optimizer``).
        output_dir: the state directory (replaced when it exists).
        payload: JSON-able trainer bookkeeping, written as ``opd_trainer_state.json``.
    """
    out = Path(output_dir)
    tmp, old = _sibling(out, ".tmp"), _sibling(out, ".old")
    engine = _engine(accelerator)
    if accelerator.is_main_process:
        out.parent.mkdir(parents=True, exist_ok=True)
        _settle(out)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    n = accelerator.num_processes
    if engine:
        accelerator.save_state(str(tmp))
    else:
        rank = accelerator.process_index
        rng_tensors, rng = sio.rng_state()
        atomic_save_safetensors(rng_tensors, tmp / f"rng_{rank}.safetensors")
        sio.write_json(tmp / f"rng_{rank}.json", rng, indent=None)
    if accelerator.is_main_process:
        manifest = {"format": FORMAT, "version": VERSION, "backend": "accelerate" if engine else "native",
                    "engine": engine, "num_processes": n, "files": []}  # fmt: skip
        if not engine:
            bare = accelerator.unwrap_model(model)
            params = {k: p.detach().cpu().contiguous() for k, p in _trainable(bare).items()}
            atomic_save_safetensors(sio.unshared(params), tmp / PARAMS)
            tensors: dict[str, torch.Tensor] = {}
            state = sio.encode(optimizer.state_dict(), (), tensors)
            scaler = getattr(accelerator, "scaler", None)
            opt = {"optimizer": type(getattr(optimizer, "optimizer", optimizer)).__name__,
                   "params": _optimizer_params(optimizer, bare), "state_dict": state,
                   "grad_scaler": scaler.state_dict() if scaler is not None else None}  # fmt: skip
            atomic_save_safetensors(sio.unshared(tensors), tmp / OPT_TENSORS)
            sio.write_json(tmp / OPT_JSON, opt)
            manifest["frozen_adapter_sha256"] = sio.frozen_adapter_digests(bare)
        sio.write_json(tmp / STATE_FILE, payload)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if engine:  # every file accelerate wrote (a partly removed directory is then seen as incomplete)
            manifest["files"] = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        else:
            manifest["files"] = [PARAMS, OPT_TENSORS, OPT_JSON] + [
                f"rng_{r}.{e}" for r in range(n) for e in ("safetensors", "json")
            ]
        normalize_modes(tmp)  # accelerate's / safetensors' files are private (0600) otherwise
        sio.write_json(tmp / MANIFEST, manifest)  # last: its presence marks the directory complete
        sio.fsync_tree(tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------- reading
def read_training_state(input_dir: str | Path) -> dict[str, Any]:
    """The JSON payload of a :func:`save_training_state` directory (the newest complete one of
    :func:`resolve_state_dir`).

    Raises:
        ValueError: when ``input_dir`` is not such a directory, or its payload is not readable JSON.
    """
    path = resolve_state_dir(input_dir)
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"{path} is not an OPDTrainer state directory (no {STATE_FILE}); pass a checkpoint_dir/state")
    return _read(path, STATE_FILE)


def _damaged(path: Path, what: str) -> ValueError:
    return ValueError(f"cannot resume from {path}: {what}; {_DAMAGED_FIX}")


def _read(path: Path, name: str) -> Any:
    """JSON file ``name`` of state directory ``path``, or its safetensors tensors (CPU) when ``name`` ends so."""
    try:
        if name.endswith(".safetensors"):
            return load_file(str(path / name))
        return json.loads((path / name).read_text())
    except Exception as err:  # noqa: BLE001 - OSError, JSON errors, safetensors' own error types
        raise _damaged(path, f"{name} is unreadable ({err})") from err


def _header(path: Path, name: str) -> dict[str, tuple[list[int], str]]:
    try:
        return sio.safetensors_header(path / name)
    except Exception as err:  # noqa: BLE001
        raise _damaged(path, f"{name} is unreadable ({err})") from err


def _param_mismatch(path: Path, model: torch.nn.Module, manifest: dict) -> Optional[str]:
    """Why the saved parameters do not fit ``model``'s trainable ones (names, shapes, dtypes, frozen adapter
    tensors), or None."""
    saved, mine = _header(path, PARAMS), _trainable(model)
    if set(saved) != set(mine):
        extra, missing = sorted(set(saved) - set(mine)), sorted(set(mine) - set(saved))
        return (f"its {len(saved)} trainable parameters are not the student's {len(mine)} (only in the state: "
                f"{extra[:2]}; only in the student: {missing[:2]})")  # fmt: skip
    for name, p in mine.items():
        want = (list(p.shape), str(p.dtype).removeprefix("torch."))
        if saved[name] != want:
            return f"{name} is {saved[name][1]} {saved[name][0]} in the state but {want[1]} {want[0]} in the student"
    ref, now = manifest.get("frozen_adapter_sha256", {}), sio.frozen_adapter_digests(model)
    bad = sorted(k for k in set(ref) | set(now) if ref.get(k) != now.get(k))
    if bad:
        return f"the adapter's frozen tensors differ (e.g. {bad[0]}): the state was written with another mask"
    return None


def _read_rng(path: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Process ``rank``'s RNG files (checked without changing any global generator)."""
    tensors, rng = _read(path, f"rng_{rank}.safetensors"), _read(path, f"rng_{rank}.json")
    try:
        sio.check_rng(tensors, rng)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise _damaged(path, f"rng_{rank}.* hold no valid RNG state ({err!r})") from err
    return tensors, rng


def _check_manifest(path: Path, accelerator: Any) -> dict[str, Any]:
    """The manifest of ``path`` after checking format, backend and that every listed file is there."""
    if not (path / MANIFEST).is_file():
        if (path / "optimizer.bin").is_file() or any(path.glob("random_states_*.pkl")):
            raise ValueError(
                f"cannot resume from {path}: it was written by an older version (accelerate save_state, pickled), "
                "which is no longer read; start the run again, or finish it with the version that wrote it"
            )
        raise _damaged(path, f"no {MANIFEST}")
    manifest = _read(path, MANIFEST)
    if not isinstance(manifest, dict) or (manifest.get("format"), manifest.get("version")) != (FORMAT, VERSION):
        raise _damaged(path, f"{MANIFEST} is not a {FORMAT} v{VERSION} manifest")
    engine, saved = _engine(accelerator), manifest.get("engine")
    if engine != saved:
        raise ValueError(
            f"cannot resume from {path}: it was written under {saved or 'no sharding engine'} and this run uses "
            f"{engine or 'none'}; resume with the accelerate setup (FSDP / DeepSpeed or neither) that wrote it"
        )
    missing = [f for f in manifest.get("files", []) if not (path / f).is_file()]
    if missing:
        raise _damaged(path, f"missing {', '.join(missing)}")
    return manifest


def load_training_state(accelerator: Any, model: torch.nn.Module, optimizer: Any, input_dir: str | Path) -> None:
    """Restore a :func:`save_training_state` directory into the prepared ``model`` and ``optimizer`` (bit-exact:
    ``optimizer.state_dict()`` equals the saved one) and the global RNGs. Call on every process: each loads the
    parameters and optimizer state, and its own RNG states (skipped, with a warning, when the process count changed).

    Everything is read and checked first, so on error the model, the optimizer and the RNGs are unchanged.

    Raises:
        ValueError: naming the directory and the fix, when it is incomplete or damaged, was written under another
            backend (FSDP / DeepSpeed vs neither), or does not fit the student (trainable names, shapes, dtypes,
            adapter mask) or the optimizer (class, parameter per index, param groups).
    """
    path = resolve_state_dir(input_dir)
    manifest = _check_manifest(path, accelerator)
    if manifest.get("engine"):
        accelerator.load_state(str(path))
        return
    bare = accelerator.unwrap_model(model)
    problem = _param_mismatch(path, bare, manifest)
    opt = _read(path, OPT_JSON)
    try:
        state_dict = sio.decode(opt["state_dict"], _read(path, OPT_TENSORS))
        saved = (opt["optimizer"], opt["params"], [len(g["params"]) for g in state_dict["param_groups"]])
    except (KeyError, TypeError, ValueError) as err:
        raise _damaged(path, f"{OPT_JSON} and {OPT_TENSORS} do not fit together ({err!r})") from err
    cls = type(getattr(optimizer, "optimizer", optimizer)).__name__
    mine = (cls, _optimizer_params(optimizer, bare), [len(g["params"]) for g in optimizer.param_groups])
    if problem is None and saved != mine:
        pairs = zip(saved[1], mine[1], strict=False)
        problem = next(
            (f"optimizer parameter {i} is {a} in the state but {b} now" for i, (a, b) in enumerate(pairs) if a != b),
            f"the optimizer is {saved[0]} with groups of {saved[2]} in the state but {mine[0]} with {mine[2]} now",
        )
    if problem is not None:
        raise ValueError(f"cannot resume from {path}: {problem}; {_MISMATCH_FIX}")
    rank, rng = accelerator.process_index, None
    if manifest.get("num_processes") == accelerator.num_processes:
        rng = _read_rng(path, rank)
    elif accelerator.is_main_process:
        warnings.warn(
            f"{path} was written by {manifest.get('num_processes')} processes and this run has "
            f"{accelerator.num_processes}: the global RNG states (dropout only) are not restored",
            stacklevel=2,
        )
    params = _read(path, PARAMS)
    # Everything is checked: apply (the optimizer first; torch checks its groups again before changing anything).
    optimizer.load_state_dict(state_dict)
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and opt.get("grad_scaler"):
        scaler.load_state_dict(opt["grad_scaler"])
    with torch.no_grad():
        for name, p in _trainable(bare).items():
            p.copy_(params[name])
    if rng is not None:
        sio.set_rng(*rng)
