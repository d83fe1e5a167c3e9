"""``sparse-opd train``: OPD / SFT / RLVR training of a sparse adapter, LoRA or all weights from the command line."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Optional

import typer

from .cli import app, cli_errors
from .cli_workflow import (
    TRUST_HELP,
    Loss,
    ModelDtype,
    Optim,
    SaveDtype,
    Schedule,
    TokenKeep,
    check_out_dir,
    has_tokenizer,
    load_causal_lm,
    load_tokenizer,
    missing_ancestors,
    quiet_library_warnings,
    remove_created,
    resolve_source,
    staged_dir,
    torch_dtype,
    write_json,
)

TRAIN_EPILOG = (
    "Examples: "
    "sparse-opd train ./student --teacher ./teacher --prompts prompts.jsonl --mask opd.mask.safetensors --out runs/a "
    "--steps 200 --batch-size 32 --lr 1e-3 --save-every 50 ;  "
    "sparse-opd train Qwen/Qwen3-0.6B --teacher Qwen/Qwen3-1.7B --prompts openai/gsm8k --dataset-config main "
    "--prompt-column question --answer-column answer --lora-rank 16 --out runs/lora ;  "
    "resume an interrupted run: the same command plus --resume runs/a.  "
    "Writes DIR/adapter (peft adapter; DIR/model with --full), DIR/state (resumable trainer state), DIR/train.json "
    "(recipe, config, per-step metrics) and, with --save-every, DIR/checkpoints. Prompt files are .json / .jsonl / "
    ".parquet with one prompt per row. Rewards (--reward, needed by rlvr / mix, otherwise only logged): 'exact' "
    "compares the completion before EOS with the answer column; 'toy:add' / 'toy:sub' verify the toy world's "
    "arithmetic prompts."
)


def _adapter_kind(mask: Optional[Path], subspace: Optional[Path], lora_rank: Optional[int], full: bool) -> str:
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


def _opd_config(**kwargs: Any):
    """``OPDConfig(**kwargs)`` with its validation messages phrased in terms of the CLI flags."""
    from .opd.config import OPDConfig

    try:
        return OPDConfig(**kwargs)
    except ValueError as err:
        msg = re.sub(r"OPDConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(err))
        raise ValueError(msg.replace("OPDConfig: ", "")) from None


def _resolve_resume(path: Path) -> Path:
    """The trainer state directory of ``--resume``: the directory itself, or the newer of DIR/state and
    DIR/checkpoints/state of an earlier ``sparse-opd train --out DIR`` (each the newest complete one of
    ``resolve_state_dir``: a save killed mid-swap leaves its state in ``state.tmp``)."""
    from .opd.checkpoint import STATE_FILE, read_training_state, resolve_state_dir

    if not path.is_dir():
        raise FileNotFoundError(f"--resume {path}: no such directory")
    candidates = (resolve_state_dir(c) for c in (path, path / "state", path / "checkpoints" / "state"))
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


def _build_student(student, kind: str, mask, basis, save_dtype: str, lora_rank, lora_alpha, lora_targets, seed: int):
    """Wrap ``student`` with the chosen adapter (or make every weight trainable for ``full``)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from .tuner import SparseOPDConfig

    torch.manual_seed(seed)  # LoRA's A initialisation
    if kind == "sparse_opd":
        return get_peft_model(student, SparseOPDConfig(mask=mask, subspace=basis, save_dtype=save_dtype))
    if kind == "lora":
        targets = lora_targets or "all-linear"
        config = LoraConfig(
            r=lora_rank,
            lora_alpha=lora_alpha or 2 * lora_rank,
            target_modules=targets,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(student, config)
    student.requires_grad_(True)
    return student


def _record_training(model, recipe: dict) -> bool:
    """Store the recipe in the adapter config's ``training`` field when this version of the package has one."""
    try:
        from . import model_card
    except ImportError:
        return False
    config = getattr(model, "peft_config", {}).get("default")
    if not hasattr(model_card, "record_training") or not hasattr(config, "training"):
        return False
    model_card.record_training(model, recipe, "default")
    return True


@app.command(epilog=TRAIN_EPILOG)
def train(
    student: str = typer.Argument(..., help="Student: model directory (config.json + safetensors) or Hub id."),
    teacher: str = typer.Option(
        None, "--teacher", "-t", help="Teacher sharing the student's tokenizer (not needed for sft / rlvr)."
    ),
    prompts: str = typer.Option(
        ..., "--prompts", "-p", help="Prompts: .json / .jsonl / .parquet file or datasets Hub id."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (new or empty, unless --overwrite)."),
    mask: Path = typer.Option(
        None, "--mask", help="Sparse adapter: train the coordinates of this mask (sparse-opd mask)."
    ),
    subspace: Path = typer.Option(
        None, "--subspace", help="Sparse adapter: train in this basis (sparse-opd subspace)."
    ),
    lora_rank: int = typer.Option(None, "--lora-rank", help="Train a peft LoRA of this rank instead."),
    lora_alpha: float = typer.Option(None, "--lora-alpha", help="LoRA alpha (default 2 x rank)."),
    lora_targets: list[str] = typer.Option(
        None, "--lora-target", help="LoRA target module names (default all-linear); repeatable."
    ),
    full: bool = typer.Option(False, "--full", help="Train every weight (full fine-tuning) instead of an adapter."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="Tokenizer directory or Hub id (default: the student's)."),
    split: str = typer.Option("train", "--split", help="Dataset split (slices such as 'train[:1000]' work)."),
    dataset_config: str = typer.Option(None, "--dataset-config", help="Hub dataset configuration (e.g. 'main')."),
    prompt_column: str = typer.Option("prompt", "--prompt-column", help="Column with the prompt text."),
    answer_column: str = typer.Option(
        None, "--answer-column", help="Column with reference answers (default 'answer' if present)."
    ),
    completion_column: str = typer.Option(
        None, "--completion-column", help="Column with SFT completions (default 'completion' if present)."
    ),
    eval_prompts: str = typer.Option(
        None, "--eval-prompts", help="Held-out prompts (same forms as --prompts) for --eval-every."
    ),
    eval_split: str = typer.Option(
        None, "--eval-split", help="Split of --eval-prompts (default 'train' for files, 'test' for Hub ids)."
    ),
    loss: Loss = typer.Option(
        Loss.sampled_token, "--loss", help="sampled_token | full_kl (OPD) | sft | rlvr (GRPO) | mix."
    ),
    alpha: float = typer.Option(0.5, "--alpha", help="mix: weight of the OPD advantage (1 = pure OPD)."),
    reward: str = typer.Option("none", "--reward", help="none | exact | toy:add | toy:sub (see below)."),
    steps: int = typer.Option(100, "--steps", help="Optimizer steps."),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts per step."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per step (memory only)."),
    lr: float = typer.Option(1e-5, "--lr", help="Peak learning rate (sparse adapters usually want 1e-4 to 1e-3)."),
    lr_schedule: Schedule = typer.Option(Schedule.linear, "--lr-schedule", help="linear (decay to 0) | constant."),
    warmup_steps: int = typer.Option(0, "--warmup-steps", help="Linear warm-up steps."),
    optimizer: Optim = typer.Option(Optim.adamw, "--optimizer", help="adamw | sgd."),
    momentum: float = typer.Option(0.0, "--momentum", help="sgd momentum."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="Weight decay."),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="Gradient clipping norm (0 = off)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Longest completion sampled."),
    num_generations: int = typer.Option(1, "--num-generations", help="Completions per prompt (rlvr / mix: >= 2)."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature of the rollouts."),
    off_policy: bool = typer.Option(False, "--off-policy", help="Roll out with the teacher instead of the student."),
    discount: float = typer.Option(0.0, "--discount", help="sampled_token / mix: discounted future sum of advantages."),
    token_keep: TokenKeep = typer.Option(
        TokenKeep.all, "--token-keep", help="Token sparsification: all | top_gap | random."
    ),
    token_keep_ratio: float = typer.Option(1.0, "--token-keep-ratio", help="Share of completion tokens kept."),
    seed: int = typer.Option(0, "--seed", help="Seed of data order, rollouts and adapter init."),
    eval_every: int = typer.Option(0, "--eval-every", help="Greedy held-out evaluation every N steps (0 = never)."),
    eval_samples: int = typer.Option(256, "--eval-samples", help="Held-out prompts per evaluation."),
    save_every: int = typer.Option(
        0, "--save-every", help="Checkpoint (trainable state + resumable state) every N steps."
    ),
    resume: Path = typer.Option(None, "--resume", help="Continue from a trainer state: an earlier run's --out DIR."),
    save_dtype: SaveDtype = typer.Option(SaveDtype.float32, "--save-dtype", help="Sparse adapter values on disk."),
    dtype: ModelDtype = typer.Option(ModelDtype.fp32, "--dtype", help="dtype the student and teacher are loaded in."),
    cpu: bool = typer.Option(False, "--cpu", help="Train on the CPU even when a GPU is present."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the outputs of an earlier run in --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Train STUDENT against a TEACHER with on-policy distillation (or SFT / RLVR / mix) and save the adapter, the trainer state and the metrics. Trains the sparse adapter (--mask and/or --subspace), a LoRA (--lora-rank) or every weight (--full)."""  # noqa: E501
    from .data import load_prompts, make_reward
    from .lab.toy.tasks import reward_verifiers

    quiet_library_warnings()
    with cli_errors():
        kind = _adapter_kind(mask, subspace, lora_rank, full)
        ckpt_dir = out / "checkpoints"
        cfg = _opd_config(
            loss=loss.value, alpha=alpha, steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
            lr_schedule=lr_schedule.value, warmup_steps=warmup_steps, optimizer=optimizer.value, momentum=momentum,
            weight_decay=weight_decay, max_grad_norm=max_grad_norm or None, max_new_tokens=max_new_tokens,
            num_generations=num_generations, temperature=temperature, off_policy=off_policy, seed=seed, discount=discount,
            token_keep=token_keep.value, token_keep_ratio=token_keep_ratio,
            eval_every=eval_every, eval_samples=eval_samples, save_every=save_every,
            checkpoint_dir=str(ckpt_dir) if save_every else None, progress_bar=not quiet,
        )  # fmt: skip
        if cfg.needs_teacher and not teacher:
            raise ValueError(f"--loss {cfg.loss}{' --off-policy' if off_policy else ''} needs --teacher MODEL")
        if cfg.needs_reward and reward == "none":
            raise ValueError(f"--loss {cfg.loss} needs a verifier reward: --reward exact (answer column) or toy:TASK")
        if eval_every and (not eval_prompts or reward == "none"):
            raise ValueError("--eval-every needs --eval-prompts DATA and a --reward to score them")
        resolve_source(student, "STUDENT")
        if teacher:
            resolve_source(teacher, "--teacher")
        resume_dir = _resolve_resume(resume) if resume is not None else None
        resuming_here = resume_dir is not None and _inside(resume_dir, out)
        check_out_dir(out, overwrite or resuming_here)
        # Inputs, cheapest first; nothing is written until every check passed.
        mask_obj = basis = None
        if mask is not None:
            from .masks import SparseMask

            mask_obj = SparseMask.load(mask)
        if subspace is not None:
            from .subspace import load_subspace

            basis = load_subspace(subspace)
        if quiet:
            import datasets

            datasets.disable_progress_bars()
        train_ds = load_prompts(prompts, split, prompt_column, answer_column, completion_column, dataset_config)
        eval_ds = None
        if eval_prompts:
            default = "train" if Path(eval_prompts).suffix.lower() in (".json", ".jsonl", ".parquet") else "test"
            eval_ds = load_prompts(
                eval_prompts, eval_split or default, prompt_column, answer_column, completion_column, dataset_config
            )
        if not quiet:
            typer.echo(f"prompts: {len(train_ds)} rows from {prompts} (columns {train_ds.column_names})")
        if not tokenizer and not has_tokenizer(student):
            raise FileNotFoundError(f"STUDENT {student} has no tokenizer files (tokenizer.json); pass --tokenizer DIR")
        tok = load_tokenizer(tokenizer or student, "--tokenizer" if tokenizer else "STUDENT", trust_remote_code)
        reward_fn = make_reward(reward, train_ds, tok.eos_token, reward_verifiers())
        if eval_ds is not None:
            make_reward(reward, eval_ds, tok.eos_token, reward_verifiers())  # checks the eval prompts too
        model_dtype = torch_dtype(dtype.value)
        base = load_causal_lm(student, "STUDENT", model_dtype, trust_remote_code)
        teacher_model = teacher_tok = None
        if teacher and (cfg.needs_teacher or cfg.loss != "sft"):
            teacher_model = load_causal_lm(teacher, "--teacher", model_dtype, trust_remote_code).eval()
            if Path(teacher).expanduser().is_dir():
                if has_tokenizer(teacher):
                    teacher_tok = load_tokenizer(teacher, "--teacher", trust_remote_code)
            else:
                try:
                    teacher_tok = load_tokenizer(teacher, "--teacher", trust_remote_code)
                except (OSError, ValueError):
                    teacher_tok = None  # a Hub teacher without tokenizer files: checked through its vocab rows only
        model = _build_student(base, kind, mask_obj, basis, save_dtype.value, lora_rank, lora_alpha, lora_targets, seed)
        from accelerate import Accelerator

        from .opd import OPDTrainer

        acc = Accelerator(cpu=cpu)
        if teacher_model is not None:
            teacher_model.to(acc.device)
        trainer = OPDTrainer(
            model,
            teacher_model,
            tok,
            train_ds,
            cfg,
            eval_dataset=eval_ds,
            reward_fn=reward_fn,
            teacher_tokenizer=teacher_tok,
            accelerator=acc,
        )
        # Every check passed: from here on the run writes into --out.
        created = missing_ancestors(out)
        out.mkdir(parents=True, exist_ok=True)
        if overwrite and not resuming_here and ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        try:
            history = trainer.train(resume_from=str(resume_dir) if resume_dir is not None else None)
        except BaseException:
            if not (ckpt_dir / "state").is_dir():
                remove_created(created)
            else:
                typer.echo(f"note: checkpoints kept in {ckpt_dir}; continue with --resume {out}", err=True)
            raise
        trained = trainer.accelerator.unwrap_model(trainer.model)
        recipe = {
            "method": kind, "loss": cfg.loss, "student": student, "teacher": teacher, "prompts": prompts,
            "split": split, "reward": reward, "steps": cfg.steps, "batch_size": cfg.batch_size,
            "num_generations": cfg.num_generations, "max_new_tokens": cfg.max_new_tokens,
            "temperature": cfg.temperature, "optimizer": cfg.optimizer, "lr": cfg.lr, "lr_schedule": cfg.lr_schedule,
            "seed": cfg.seed, "mask": str(mask) if mask else None, "subspace": str(subspace) if subspace else None,
            "final_metrics": {k: v for k, v in (history[-1] if history else {}).items() if k != "tokens_per_s"},
        }  # fmt: skip
        n_trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
        if kind == "full":
            target = out / "model"
            with staged_dir(target) as tmp:
                trained.save_pretrained(tmp)
                tok.save_pretrained(tmp)
        else:
            from .tuner import save_adapter

            target = out / "adapter"
            recorded = _record_training(trained, recipe)
            with staged_dir(target) as tmp:
                save_adapter(trained, tmp)
            recipe["recorded_in_adapter_config"] = recorded
        stale = out / ("adapter" if kind == "full" else "model")  # an earlier run of the other kind (--overwrite)
        if stale.is_dir() and not resuming_here:
            shutil.rmtree(stale)
        trainer.save_state(out / "state")
        write_json(out / "train.json", {"recipe": recipe, "config": cfg.to_dict(), "history": history})
    last = history[-1] if history else {}
    shown = ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "kl", "reward", "accuracy", "eval_accuracy") if k in last)
    typer.echo(
        f"trained {trainer.step} steps ({cfg.loss}, {kind}, {n_trainable:,} trainable parameters){': ' if shown else ''}"
        f"{shown}; wrote {target}, {out / 'state'}, {out / 'train.json'}"
    )
