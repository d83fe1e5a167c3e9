"""``sparse-opd train`` as a library function: OPD / SFT / RLVR / mix training of a sparse adapter, a LoRA or every
weight, from model directories or Hub ids and a prompt file or dataset.

:func:`run_training` checks every input (cheapest first) before it writes anything to ``job.out``; it writes
``out/adapter`` (``out/model`` for ``full``), ``out/state`` (resumable trainer state), ``out/train.json`` (recipe,
config, per-step metrics) and, with ``save_every``, ``out/checkpoints``.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .sources import (
    check_out_dir,
    has_tokenizer,
    load_causal_lm,
    load_tokenizer,
    missing_ancestors,
    remove_created,
    resolve_source,
    staged_dir,
    torch_dtype,
    write_json,
)

if TYPE_CHECKING:
    from ..opd.config import OPDConfig


def _opd_config_class() -> type:
    from ..opd.config import OPDConfig  # imported when used: importing this module stays light

    return OPDConfig


def _checkpoint_dir(out: str | Path) -> Path:
    """``out/checkpoints``: the snapshots (``save_every``) and their trainer state of a run into ``out``."""
    return Path(out) / "checkpoints"


@dataclass
class TrainJob:
    """Every input of a ``sparse-opd train`` run: the training knobs as one
    :class:`~sparse_opd_peft.opd.OPDConfig` (``opd``), and the job's own settings (models, adapter, data, reward,
    outputs), named after the command's flags (``--lora-rank`` -> ``lora_rank``) with the command's defaults.
    :meth:`from_flags` builds one from the flags of both kinds. :func:`run_training` sets ``opd.checkpoint_dir`` to
    ``out/checkpoints`` when ``opd.save_every`` asks for snapshots."""

    student: str
    prompts: str
    out: Path
    opd: OPDConfig = field(default_factory=lambda: _opd_config_class()())
    teacher: Optional[str] = None
    mask: Optional[Path] = None
    subspace: Optional[Path] = None
    lora_rank: Optional[int] = None
    lora_alpha: Optional[float] = None
    lora_targets: Optional[list[str]] = None
    full: bool = False
    tokenizer: Optional[str] = None
    split: str = "train"
    dataset_config: Optional[str] = None
    prompt_column: str = "prompt"
    answer_column: Optional[str] = None
    completion_column: Optional[str] = None
    eval_prompts: Optional[str] = None
    eval_split: Optional[str] = None
    reward: str = "none"
    resume: Optional[Path] = None
    save_dtype: str = "float32"
    dtype: str = "fp32"
    cpu: bool = False
    trust_remote_code: bool = False
    overwrite: bool = False
    quiet: bool = False
    verifiers: Optional[dict] = None  # named task verifiers for ``reward`` (the CLI passes the toy world's)

    @classmethod
    def from_flags(cls, **flags: Any) -> TrainJob:
        """A job from the command's flags: those named after ``OPDConfig`` fields make ``opd`` (``max_grad_norm=0``
        turns clipping off; ``quiet`` also hides the trainer's progress bar), the rest are the job's own. Invalid
        values raise a ``ValueError`` phrased in terms of the flags (``--token-keep-ratio=...``)."""
        opd_class = _opd_config_class()
        knobs = {k: flags.pop(k) for k in list(flags) if k in {f.name for f in fields(opd_class)}}
        if "max_grad_norm" in knobs:
            knobs["max_grad_norm"] = knobs["max_grad_norm"] or None
        knobs.setdefault("progress_bar", not flags.get("quiet", False))
        if knobs.get("save_every"):
            knobs["checkpoint_dir"] = str(_checkpoint_dir(flags["out"]))
        return cls(**flags, opd=_as_flags(lambda: opd_class(**knobs)))


def _as_flags(make: Callable[[], Any]) -> Any:
    """``make()``, with ``OPDConfig`` validation messages phrased in terms of the command's flags."""
    try:
        return make()
    except ValueError as err:
        msg = re.sub(r"OPDConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(err))
        raise ValueError(msg.replace("OPDConfig: ", "")) from None


@dataclass
class TrainResult:
    """What :func:`run_training` did: ``steps`` trained, ``loss`` (objective), ``kind`` (sparse_opd / lora / full),
    ``n_trainable`` parameters, per-step ``history`` and the paths it wrote."""

    steps: int
    loss: str
    kind: str
    n_trainable: int
    history: list[dict] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)


def adapter_kind(mask: Optional[Path], subspace: Optional[Path], lora_rank: Optional[int], full: bool) -> str:
    """``"sparse_opd"`` (mask and / or subspace), ``"lora"`` or ``"full"``; ``ValueError`` for none or several."""
    chosen = [
        f
        for f, on in (
            ("--mask", mask),
            ("--subspace", subspace),
            ("--lora-rank", lora_rank is not None),
            ("--full", full),
        )
        if on
    ]
    kinds = {"sparse" if c in ("--mask", "--subspace") else c for c in chosen}
    if not kinds:
        raise ValueError(
            "choose what to train: --mask FILE and/or --subspace FILE (the sparse adapter), --lora-rank R (LoRA) or "
            "--full (every weight)"
        )
    if len(kinds) > 1:
        raise ValueError(
            f"{' and '.join(chosen)} exclude each other: train the sparse adapter (--mask and/or --subspace), LoRA "
            "(--lora-rank) or all weights (--full)"
        )
    if lora_rank is not None and lora_rank < 1:
        raise ValueError(f"--lora-rank must be >= 1, got {lora_rank}")
    return {"sparse": "sparse_opd", "--lora-rank": "lora", "--full": "full"}[kinds.pop()]


def opd_config(job: TrainJob) -> OPDConfig:
    """The ``OPDConfig`` the job trains with: ``job.opd`` with ``checkpoint_dir`` = ``out/checkpoints`` when it
    saves snapshots (``None`` otherwise); validation messages are phrased in terms of the command's flags."""
    snapshots = str(_checkpoint_dir(job.out)) if job.opd.save_every else None
    return _as_flags(lambda: replace(job.opd, checkpoint_dir=snapshots))


def resolve_resume(path: Path) -> Path:
    """The trainer state directory of ``--resume``: the directory itself, or the newer of DIR/state and
    DIR/checkpoints/state of an earlier ``sparse-opd train --out DIR`` (each the newest complete one of
    ``resolve_state_dir``: a save killed mid-swap leaves its state in ``state.tmp``)."""
    from ..opd.checkpoint import STATE_FILE, read_training_state, resolve_state_dir

    if not path.is_dir():
        raise FileNotFoundError(f"--resume {path}: no such directory")
    candidates = (resolve_state_dir(c) for c in (path, path / "state", _checkpoint_dir(path) / "state"))
    found = [c for c in candidates if (c / STATE_FILE).is_file()]
    if not found:
        raise ValueError(
            f"--resume {path}: not a trainer state (no {STATE_FILE} in it, in state/ or in checkpoints/state/); pass "
            "the --out DIR of an earlier `sparse-opd train` run"
        )
    return max(found, key=lambda c: int(read_training_state(c).get("step", 0)))


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def build_student(student, kind: str, mask, basis, job: TrainJob):
    """Wrap ``student`` with the chosen adapter (or make every weight trainable for ``full``)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from ..tuner import SparseOPDConfig

    torch.manual_seed(job.opd.seed)  # LoRA's A initialisation
    if kind == "sparse_opd":
        return get_peft_model(student, SparseOPDConfig(mask=mask, subspace=basis, save_dtype=job.save_dtype))
    if kind == "lora":
        config = LoraConfig(
            r=job.lora_rank,
            lora_alpha=job.lora_alpha or 2 * job.lora_rank,
            target_modules=job.lora_targets or "all-linear",
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(student, config)
    student.requires_grad_(True)
    return student


@dataclass
class _Plan:
    """The checked flags of a job: adapter kind, ``OPDConfig``, resume directory."""

    kind: str
    cfg: Any
    resume_dir: Optional[Path]
    resuming_here: bool


def _check_flags(job: TrainJob) -> _Plan:
    kind = adapter_kind(job.mask, job.subspace, job.lora_rank, job.full)
    cfg = opd_config(job)
    if cfg.needs_teacher and not job.teacher:
        raise ValueError(f"--loss {cfg.loss}{' --off-policy' if cfg.off_policy else ''} needs --teacher MODEL")
    if cfg.needs_reward and job.reward == "none":
        raise ValueError(f"--loss {cfg.loss} needs a verifier reward: --reward exact (answer column) or toy:TASK")
    if cfg.eval_every and (not job.eval_prompts or job.reward == "none"):
        raise ValueError("--eval-every needs --eval-prompts DATA and a --reward to score them")
    resolve_source(job.student, "STUDENT")
    if job.teacher:
        resolve_source(job.teacher, "--teacher")
    resume_dir = resolve_resume(job.resume) if job.resume is not None else None
    resuming_here = resume_dir is not None and _inside(resume_dir, job.out)
    check_out_dir(job.out, job.overwrite or resuming_here)
    return _Plan(kind, cfg, resume_dir, resuming_here)


def _load_inputs(job: TrainJob, echo: Callable[[str], None]) -> dict:
    """Mask, basis, prompts, tokenizer and rewards of a job, cheapest first."""
    from ..data import load_prompts, make_reward

    found: dict[str, Any] = {"mask": None, "basis": None, "eval_ds": None}
    if job.mask is not None:
        from ..masks import SparseMask

        found["mask"] = SparseMask.load(job.mask)
    if job.subspace is not None:
        from ..masks.subspace import load_subspace

        found["basis"] = load_subspace(job.subspace)
    if job.quiet:
        import datasets

        datasets.disable_progress_bars()
    columns = (job.prompt_column, job.answer_column, job.completion_column, job.dataset_config)
    train_ds = found["train_ds"] = load_prompts(job.prompts, job.split, *columns)
    if job.eval_prompts:
        default = "train" if Path(job.eval_prompts).suffix.lower() in (".json", ".jsonl", ".parquet") else "test"
        found["eval_ds"] = load_prompts(job.eval_prompts, job.eval_split or default, *columns)
    if not job.quiet:
        echo(f"prompts: {len(train_ds)} rows from {job.prompts} (columns {train_ds.column_names})")
    if not job.tokenizer and not has_tokenizer(job.student):
        raise FileNotFoundError(f"STUDENT {job.student} has no tokenizer files (tokenizer.json); pass --tokenizer DIR")
    what = "--tokenizer" if job.tokenizer else "STUDENT"
    tok = found["tok"] = load_tokenizer(job.tokenizer or job.student, what, job.trust_remote_code)
    found["reward_fn"] = make_reward(job.reward, train_ds, tok.eos_token, job.verifiers)
    if found["eval_ds"] is not None:
        make_reward(job.reward, found["eval_ds"], tok.eos_token, job.verifiers)  # checks the eval prompts too
    return found


def _load_teacher(job: TrainJob, cfg, model_dtype):
    """``(teacher model, teacher tokenizer or None)``, or ``(None, None)`` when the loss needs no teacher."""
    if not (job.teacher and (cfg.needs_teacher or cfg.spec.rollouts)):
        return None, None
    teacher = job.teacher
    model = load_causal_lm(teacher, "--teacher", model_dtype, job.trust_remote_code).eval()
    if Path(teacher).expanduser().is_dir():
        tok = load_tokenizer(teacher, "--teacher", job.trust_remote_code) if has_tokenizer(teacher) else None
        return model, tok
    try:
        return model, load_tokenizer(teacher, "--teacher", job.trust_remote_code)
    except (OSError, ValueError):
        return model, None  # a Hub teacher without tokenizer files: checked through its vocab rows only


def _make_trainer(job: TrainJob, plan: _Plan, inputs: dict):
    """Load the models, wrap the student and build the ``OPDTrainer`` (the trainer checks tokenizer compatibility)."""
    from accelerate import Accelerator

    from ..opd import OPDTrainer

    model_dtype = torch_dtype(job.dtype)
    base = load_causal_lm(job.student, "STUDENT", model_dtype, job.trust_remote_code)
    teacher_model, teacher_tok = _load_teacher(job, plan.cfg, model_dtype)
    model = build_student(base, plan.kind, inputs["mask"], inputs["basis"], job)
    acc = Accelerator(cpu=job.cpu)
    if teacher_model is not None:
        teacher_model.to(acc.device)
    return OPDTrainer(
        model,
        teacher_model,
        inputs["tok"],
        inputs["train_ds"],
        plan.cfg,
        eval_dataset=inputs["eval_ds"],
        reward_fn=inputs["reward_fn"],
        teacher_tokenizer=teacher_tok,
        accelerator=acc,
    )


def _train(job: TrainJob, plan: _Plan, trainer) -> list[dict]:
    """Run the trainer into ``job.out``; on failure remove what this run created, unless checkpoints exist."""
    out, ckpt_dir = job.out, _checkpoint_dir(job.out)
    created = missing_ancestors(out)
    out.mkdir(parents=True, exist_ok=True)
    if job.overwrite and not plan.resuming_here and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    try:
        return trainer.train(resume_from=str(plan.resume_dir) if plan.resume_dir is not None else None)
    except BaseException:
        if not (ckpt_dir / "state").is_dir():
            remove_created(created)
        else:
            print(f"note: checkpoints kept in {ckpt_dir}; continue with --resume {out}", file=sys.stderr)
        raise


def _recipe(job: TrainJob, kind: str, cfg, history: list[dict]) -> dict:
    return {
        "method": kind, "loss": cfg.loss, "student": job.student, "teacher": job.teacher, "prompts": job.prompts,
        "split": job.split, "reward": job.reward, "steps": cfg.steps, "batch_size": cfg.batch_size,
        "num_generations": cfg.num_generations, "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature, "optimizer": cfg.optimizer, "lr": cfg.lr, "lr_schedule": cfg.lr_schedule,
        "seed": cfg.seed, "mask": str(job.mask) if job.mask else None,
        "subspace": str(job.subspace) if job.subspace else None,
        "final_metrics": {k: v for k, v in (history[-1] if history else {}).items() if k != "tokens_per_s"},
    }  # fmt: skip


def _save_outputs(job: TrainJob, plan: _Plan, trainer, history: list[dict]) -> TrainResult:
    out, kind, cfg = job.out, plan.kind, plan.cfg
    trained = trainer.accelerator.unwrap_model(trainer.model)
    recipe = _recipe(job, kind, cfg, history)
    n_trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    if kind == "full":
        target = out / "model"
        with staged_dir(target) as tmp:
            trained.save_pretrained(tmp)
            trainer.tokenizer.save_pretrained(tmp)
    else:
        from ..model_card import record_training, save_adapter

        target = out / "adapter"
        recorded = kind == "sparse_opd"  # its config has a ``training`` field; LoRA's has none
        if recorded:
            record_training(trained, recipe, "default")
        with staged_dir(target) as tmp:
            save_adapter(trained, tmp)
        recipe["recorded_in_adapter_config"] = recorded
    stale = out / ("adapter" if kind == "full" else "model")  # an earlier run of the other kind (--overwrite)
    if stale.is_dir() and not plan.resuming_here:
        shutil.rmtree(stale)
    trainer.save_state(out / "state")
    write_json(out / "train.json", {"recipe": recipe, "config": cfg.to_dict(), "history": history})
    return TrainResult(trainer.step, cfg.loss, kind, n_trainable, history, [target, out / "state", out / "train.json"])


def run_training(job: TrainJob, echo: Callable[[str], None] = print) -> TrainResult:
    """Check every input of ``job``, train, and write the outputs (see the module docstring); ``echo`` receives the
    one progress line ("prompts: ..."). Nothing is written before every check passed; a failed run leaves no
    output behind, except checkpoints (``save_every``) it can resume from."""
    plan = _check_flags(job)
    inputs = _load_inputs(job, echo)
    trainer = _make_trainer(job, plan, inputs)
    history = _train(job, plan, trainer)
    return _save_outputs(job, plan, trainer, history)
