"""Sparse OPD on real checkpoints: a Qwen3-0.6B student distilled from a Qwen3-1.7B teacher on GSM8K prompts.

Needs Hub access (models and the ``datasets`` prompt set) and a GPU. The flow is the package's public API, the same
as the toy demo:

1. load student, teacher and tokenizers with ``AutoModelForCausalLM.from_pretrained(..., dtype=torch.bfloat16)``;
2. a mask: ``--mask PATH`` (a saved ``SparseMask``), or a short full-parameter OPD *probe* of the student's block
   Linears (``--probe-steps``, float32 master weights) followed by
   ``mask_from_checkpoints(student, probe_dir, rule="topk", density=--density)``;
3. ``get_peft_model(student, SparseOPDConfig(mask=mask))`` and ``OPDTrainer(...).train()`` (the trainer checks that
   student and teacher tokenize identically);
4. ``save_adapter`` (``OUT/adapter``), then ``merge_and_unload`` (``OUT/merged``).

    python examples/real_checkpoints.py --out runs/qwen3_gsm8k                      # probe -> mask -> adapter
    python examples/real_checkpoints.py --mask runs/qwen3_gsm8k/mask.safetensors    # reuse a mask
    accelerate launch --num_processes 2 examples/real_checkpoints.py                # data-parallel on 2 GPUs
    python examples/real_checkpoints.py --dry-run                                   # whole flow, tiny models, CPU

``--dry-run`` swaps in tiny random Qwen3 models (built from configs, saved to ``OUT/dry_run``) with the toy
character tokenizer and arithmetic prompts shaped like GSM8K rows, so the whole flow runs offline in under a minute.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import time
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparse_opd_peft import SparseMask, SparseOPDConfig, mask_from_checkpoints, save_adapter
from sparse_opd_peft.opd import OPDConfig, OPDTrainer

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--help`` lists them)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="Qwen/Qwen3-0.6B", help="Hub id or local path of the student")
    p.add_argument("--teacher", default="Qwen/Qwen3-1.7B", help="Hub id or local path of the teacher")
    p.add_argument("--dataset", default="openai/gsm8k", help="datasets id of the prompt set")
    p.add_argument("--dataset-config", default="main")
    p.add_argument("--split", default="train")
    p.add_argument("--eval-split", default="test", help="held-out split for the final greedy evaluation")
    p.add_argument("--prompt-column", default="question", help="column mapped to the trainer's 'prompt'")
    p.add_argument("--answer-column", default="answer", help="GSM8K-style answers ('... #### 42') for the reward")
    p.add_argument("--num-prompts", type=int, default=None, help="use only the first N training prompts")
    p.add_argument("--no-chat-template", action="store_true", help="feed raw prompts instead of the chat template")
    p.add_argument("--mask", type=Path, default=None, help="a saved SparseMask; skips the probe")
    p.add_argument("--probe-steps", type=int, default=50, help="full-OPD probe steps that pick the mask")
    p.add_argument("--probe-lr", type=float, default=1e-5)
    p.add_argument("--density", type=float, default=0.05, help="top-k |ΔW| mask density over the block Linears")
    p.add_argument("--loss", default="sampled_token", choices=["sampled_token", "full_kl"])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=5e-5, help="adapter learning rate (linear decay)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per step (global, over all processes)")
    p.add_argument("--grad-accum", type=int, default=4, help="micro-batches per step (memory only)")
    p.add_argument("--max-new-tokens", type=int, default=384)
    p.add_argument("--eval-samples", type=int, default=256, help="0 = no final evaluation")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default=None, help="default: cuda:<LOCAL_RANK> when CUDA is available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/real_checkpoints"))
    p.add_argument("--dry-run", action="store_true", help="tiny random Qwen3 models + toy tokenizer, offline, CPU")
    args = p.parse_args(argv)
    if args.mask is None and args.probe_steps < 1:
        p.error("give --mask PATH or --probe-steps >= 1 (the probe run that picks the mask)")
    return args


def dry_run_setup(args: argparse.Namespace) -> None:
    """Point ``args`` at tiny random Qwen3 checkpoints (toy tokenizer) saved under ``OUT/dry_run``; shrink the run."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from sparse_opd_peft.lab.toy import build_tokenizer

    tok = build_tokenizer()
    for name, hidden, seed in (("student", 32, 0), ("teacher", 64, 1)):
        config = Qwen3Config(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
            tie_word_embeddings=False, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )  # fmt: skip
        torch.manual_seed(seed)
        path = args.out / "dry_run" / name
        Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(path)  # stored in bf16, like Qwen3 on the Hub
        tok.save_pretrained(path)
        setattr(args, name, str(path))
    args.dataset, args.device, args.no_chat_template = None, args.device or "cpu", True
    args.probe_steps, args.steps, args.batch_size, args.grad_accum = min(args.probe_steps, 2), 3, 4, 2
    args.max_new_tokens, args.eval_samples, args.lr, args.probe_lr = 6, 8, 1e-2, 1e-2
    args.num_prompts, args.density = args.num_prompts or 64, 0.05


def gsm8k_like_rows(n: int, seed: int) -> Dataset:
    """Offline stand-in for GSM8K rows (``question`` / ``answer`` with ``#### N``) the toy tokenizer can encode."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(0, 1000, (2, n), generator=g).tolist()
    pairs = list(zip(a, b, strict=True))
    return Dataset.from_dict(
        {"question": [f"{x:03d}+{y:03d}=" for x, y in pairs], "answer": [f"#### {x + y}" for x, y in pairs]}
    )


def load_prompts(args: argparse.Namespace, tokenizer, split: str, limit: int | None) -> Dataset:
    """Prompt set with the trainer's columns: ``prompt`` (chat-formatted question) and ``answer`` (the gold number)."""
    if args.dataset is None:
        rows = gsm8k_like_rows(limit or 64, seed=0 if split == args.split else 1)
    else:
        rows = load_dataset(args.dataset, args.dataset_config, split=split)
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))

    def convert(row: dict) -> dict:
        question = row[args.prompt_column]
        if not args.no_chat_template and tokenizer.chat_template:
            question = tokenizer.apply_chat_template(
                [{"role": "user", "content": question + "\nPut the final number after '####'."}],
                tokenize=False, add_generation_prompt=True, enable_thinking=False,
            )  # fmt: skip
        return {"prompt": question, "answer": str(row[args.answer_column]).split("####")[-1].strip().replace(",", "")}

    return rows.map(convert, remove_columns=rows.column_names)


def gsm8k_reward(prompts: list[str], completions: list[str], answers: list[str]) -> list[float]:
    """1.0 when the last number of the completion (after ``####`` if present) equals the gold answer."""
    out = []
    for completion, gold in zip(completions, answers, strict=True):
        text = completion.split("####")[-1]
        numbers = _NUMBER.findall(text)
        out.append(float(bool(numbers) and numbers[-1].replace(",", "").rstrip(".") == str(gold)))
    return out


def load_model(path: str, dtype: torch.dtype, device: str):
    """``AutoModelForCausalLM.from_pretrained`` onto one device (each process gets its own copy under accelerate)."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device})


def opd_config(args: argparse.Namespace, lr: float, steps: int, **overrides) -> OPDConfig:
    """The run's ``OPDConfig`` (probe and adapter share everything but lr / steps)."""
    return OPDConfig(
        loss=args.loss, lr=lr, lr_schedule="linear", steps=steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, max_new_tokens=args.max_new_tokens, seed=args.seed,
        eval_samples=args.eval_samples, eval_batch_size=max(1, args.batch_size // args.grad_accum), **overrides,
    )  # fmt: skip


def probe_mask(args, tokenizer, teacher, train_ds, device: str) -> SparseMask:
    """Full OPD of the student's block Linears (float32 master weights) for ``--probe-steps``, then top-k |ΔW|."""
    probe = load_model(args.student, torch.float32, device)
    for name, param in probe.named_parameters():
        param.requires_grad = ".layers." in name and name.endswith("proj.weight")
    trainer = OPDTrainer(probe, teacher, tokenizer, train_ds, opd_config(args, args.probe_lr, args.probe_steps),
                         reward_fn=gsm8k_reward)  # fmt: skip
    trainer.train()
    probe_dir = args.out / "probe"
    if trainer.accelerator.is_main_process:
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(probe_dir)
    trainer.accelerator.wait_for_everyone()
    del trainer, probe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mask = mask_from_checkpoints(args.student, probe_dir, rule="topk", density=args.density)
    mask.save(args.out / "mask.safetensors")
    return mask


def main(argv: list[str] | None = None) -> dict:
    """Run the whole flow; returns (and writes to ``OUT/summary.json``) the summary."""
    args = parse_args(argv)
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        dry_run_setup(args)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)

    tokenizer = AutoTokenizer.from_pretrained(args.student)
    teacher_tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    tokenizer.padding_side = "left"
    teacher = load_model(args.teacher, dtype, device).eval()
    train_ds = load_prompts(args, tokenizer, args.split, args.num_prompts)
    eval_ds = load_prompts(args, tokenizer, args.eval_split, args.eval_samples) if args.eval_samples else None

    mask = (
        SparseMask.load(args.mask) if args.mask is not None else probe_mask(args, tokenizer, teacher, train_ds, device)
    )
    print(f"mask: {mask} (FFN share of coordinates {mask.type_stats()['ffn']['share_of_nnz']:.1%})")

    student = load_model(args.student, dtype, device)
    model = get_peft_model(student, SparseOPDConfig(mask=mask, save_dtype="bfloat16"))
    model.print_trainable_parameters()
    trainer = OPDTrainer(
        model, teacher, tokenizer, train_ds, opd_config(args, args.lr, args.steps), eval_dataset=eval_ds,
        reward_fn=gsm8k_reward, teacher_tokenizer=teacher_tokenizer,
    )  # fmt: skip
    before = trainer.evaluate() if eval_ds is not None else {}
    history = trainer.train()
    after = trainer.evaluate() if eval_ds is not None else {}

    summary = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "mask": {"nnz": mask.nnz(), "density": mask.density()},
        "eval_before": before,
        "eval_after": after,
        "last_step": history[-1],
    }
    acc = trainer.accelerator
    if acc.is_main_process:
        trained = acc.unwrap_model(trainer.model)
        save_adapter(trained, args.out / "adapter")
        summary["bf16_visible_share"] = trained.bf16_visibility()["share"]
        merged = trained.merge_and_unload()
        merged.save_pretrained(args.out / "merged")
        tokenizer.save_pretrained(args.out / "merged")
        summary["seconds"] = time.time() - t0
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(json.dumps({k: summary[k] for k in ("eval_before", "eval_after", "bf16_visible_share", "seconds")}))
        print(f"wrote {args.out}/(mask.safetensors, adapter, merged, summary.json)")
    acc.wait_for_everyone()
    return summary


if __name__ == "__main__":
    main()
