"""``sparse-opd train``: OPD / SFT / RLVR training of a sparse adapter, LoRA or all weights from the command line
(the flags of :class:`sparse_opd_peft.workflow.train.TrainJob`, run by :func:`~sparse_opd_peft.workflow.train.run_training`)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from .errors import cli_errors
from .options import (
    TRUST_HELP,
    Baseline,
    Command,
    Loss,
    ModelDtype,
    Optim,
    SaveDtype,
    Schedule,
    TokenKeep,
    flag,
    quiet_flag,
)

TRAIN_EPILOG = """\
Example on the toy world that ships with the package (full OPD; minutes on a CPU):

  W=$(python -c "from sparse_opd_peft.lab.toy.world import SHIPPED_WORLD_DIR; print(SHIPPED_WORLD_DIR)")

  python -c "from sparse_opd_peft.lab.toy import make_splits; make_splits('add', 20000, 0)['train'].to_json('add.jsonl')"

  sparse-opd train $W/student --teacher $W/teacher --tokenizer $W/tokenizer --prompts add.jsonl --reward toy:add --full --steps 250 --batch-size 64 --warmup-steps 10 --max-new-tokens 5 --out runs/toy

Prompt files are .json / .jsonl / .parquet with one prompt per row; the toy rows read {"prompt": "072+521=", "answer": "3950"} (3-digit a+b=, answer: the sum's 4 digits reversed). The toy models' directories hold no tokenizer: --tokenizer names it. The defaults (--loss full_kl, --lr 1e-3) are the ones that learn on the toy world.

Examples with other models: sparse-opd train ./student --teacher ./teacher --prompts prompts.jsonl --mask opd.mask.safetensors --out runs/a --steps 200 --batch-size 32 --save-every 50 ;  sparse-opd train Qwen/Qwen3-0.6B --teacher Qwen/Qwen3-1.7B --prompts openai/gsm8k --dataset-config main --prompt-column question --answer-column answer --lora-rank 16 --lr 1e-4 --out runs/lora ;  resume an interrupted run: the same command plus --resume runs/a.

Writes DIR/adapter (peft adapter; DIR/model with --full), DIR/state (resumable trainer state), DIR/train.json (recipe, config, per-step metrics) and, with --save-every, DIR/checkpoints. Rewards (--reward, needed by rlvr / mix, otherwise only logged): 'exact' compares the completion before EOS with the answer column; 'toy:add' / 'toy:sub' verify the toy world's arithmetic prompts."""


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
    full: bool = flag("--full", help="Train every weight (full fine-tuning) instead of an adapter."),
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
        Loss("full_kl"),
        "--loss",
        help="full_kl | topk_kl | sampled_token (OPD) | sft | rlvr (GRPO) | mix.",
    ),
    topk: int = typer.Option(
        20, "--topk", help="topk_kl: teacher log-probs kept per position (the rest: one tail bucket)."
    ),
    sampled_token_baseline: Baseline = typer.Option(
        None,
        "--sampled-token-baseline",
        help="sampled_token / mix: none | position (per-position mean advantage; default position for sampled_token, none for mix).",
    ),
    sampled_token_clip: float = typer.Option(
        None, "--sampled-token-clip", help="sampled_token / mix: clip |log p_s - log p_T| per token to this bound."
    ),
    sampled_token_prefix_gamma: float = typer.Option(
        0.0, "--sampled-token-prefix-gamma", help="sampled_token / mix: IW-OPD prefix weight gamma (0 = off)."
    ),
    alpha: float = typer.Option(0.5, "--alpha", help="mix: weight of the OPD advantage (1 = pure OPD)."),
    reward: str = typer.Option("none", "--reward", help="none | exact | toy:add | toy:sub (see below)."),
    steps: int = typer.Option(100, "--steps", help="Optimizer steps."),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts per step."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per step (memory only)."),
    lr: float = typer.Option(
        1e-3,
        "--lr",
        help="Peak learning rate (sparse adapters usually want 1e-4 to 1e-3; LoRA / full fine-tuning of large models less).",
    ),
    lr_schedule: Schedule = typer.Option(Schedule("linear"), "--lr-schedule", help="linear (decay to 0) | constant."),
    warmup_steps: int = typer.Option(0, "--warmup-steps", help="Linear warm-up steps."),
    optimizer: Optim = typer.Option(Optim("adamw"), "--optimizer", help="adamw | sgd."),
    momentum: float = typer.Option(0.0, "--momentum", help="sgd momentum."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="Weight decay."),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="Gradient clipping norm (0 = off)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Longest completion sampled."),
    num_generations: int = typer.Option(1, "--num-generations", help="Completions per prompt (rlvr / mix: >= 2)."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature of the rollouts."),
    off_policy: bool = flag("--off-policy", help="Roll out with the teacher instead of the student."),
    discount: float = typer.Option(0.0, "--discount", help="sampled_token / mix: discounted future sum of advantages."),
    token_keep: TokenKeep = typer.Option(
        TokenKeep("all"), "--token-keep", help="Token sparsification: all | top_gap | random."
    ),
    token_keep_ratio: float = typer.Option(1.0, "--token-keep-ratio", help="Share of completion tokens kept."),
    seed: int = typer.Option(0, "--seed", help="Seed of data order, rollouts and adapter init."),
    eval_every: int = typer.Option(0, "--eval-every", help="Greedy held-out evaluation every N steps (0 = never)."),
    eval_samples: int = typer.Option(256, "--eval-samples", help="Held-out prompts per evaluation."),
    save_every: int = typer.Option(
        0, "--save-every", help="Checkpoint (trainable state + resumable state) every N steps."
    ),
    resume: Path = typer.Option(None, "--resume", help="Continue from a trainer state: an earlier run's --out DIR."),
    save_dtype: SaveDtype = typer.Option(SaveDtype("float32"), "--save-dtype", help="Sparse adapter values on disk."),
    dtype: ModelDtype = typer.Option(
        ModelDtype("fp32"), "--dtype", help="dtype the student and teacher are loaded in."
    ),
    cpu: bool = flag("--cpu", help="Train on the CPU even when a GPU is present."),
    trust_remote_code: bool = flag("--trust-remote-code", help=TRUST_HELP),
    overwrite: bool = flag("--overwrite", help="Replace the outputs of an earlier run in --out."),
    quiet: bool = quiet_flag("No progress bars."),
) -> None:
    """Train STUDENT against a TEACHER with on-policy distillation (or SFT / RLVR / mix) and save the adapter, the trainer state and the metrics. Trains the sparse adapter (--mask and/or --subspace), a LoRA (--lora-rank) or every weight (--full)."""  # noqa: E501
    # Over 80 lines only because typer declares one parameter per flag above; the body just hands them to the library.
    args = {k: v.value if isinstance(v, Enum) else v for k, v in locals().items()}  # the flags, by TrainJob.from_flags
    from ..lab.toy.tasks import reward_verifiers
    from ..workflow.sources import quiet_library_warnings
    from ..workflow.train import TrainJob, run_training

    quiet_library_warnings()
    with cli_errors():
        result = run_training(TrainJob.from_flags(**args, verifiers=reward_verifiers()), echo=typer.echo)
    last = result.history[-1] if result.history else {}
    shown = ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "kl", "reward", "accuracy", "eval_accuracy") if k in last)
    typer.echo(
        f"trained {result.steps} steps ({result.loss}, {result.kind}, {result.n_trainable:,} trainable parameters)"
        f"{': ' if shown else ''}{shown}; wrote {', '.join(str(p) for p in result.written)}"
    )


def register(app: typer.Typer) -> None:
    """Add train to ``app``."""
    app.command(cls=Command, epilog=TRAIN_EPILOG)(train)
