"""A self-contained tiny OPD run, for the multi-process equivalence test and as a launch example.

``accelerate launch --num_processes 2 --cpu tests/_distributed_check.py --out DIR`` trains a tiny
Qwen3 student against a tiny Qwen3 teacher on single-digit addition (char tokenizer built here, no toy world, no
network) and writes the final trainable weights (``final.safetensors``) and the history (``history.json``) to
``DIR``. Running it with one process and the same global batch gives the same weights up to float rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path
from typing import Any, Optional

import torch
from datasets import Dataset
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from sparse_opd_peft.opd.checkpoint import trainable_state_dict
from sparse_opd_peft.opd.config import OPDConfig
from sparse_opd_peft.opd.trainer import OPDTrainer

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARS = "0123456789+="


def tiny_tokenizer(
    chars: str = CHARS, specials: tuple[str, ...] = SPECIALS, eos: str = "<eos>"
) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer: ids ``0..len(specials)-1`` are the specials, then one id per char; BOS is
    prepended, padding is on the left."""
    vocab = {t: i for i, t in enumerate(list(specials) + list(chars))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token=eos, pad_token="<pad>", unk_token="<unk>",
        padding_side="left",
    )  # fmt: skip


def tiny_model(seed: int, vocab_size: int = 16, **overrides: Any) -> Qwen3ForCausalLM:
    """A 2-layer Qwen3 (hidden 32) with ``vocab_size`` embedding rows, float32, deterministic from ``seed``."""
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, tie_word_embeddings=False,
    )  # fmt: skip
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(**kwargs)).eval()


def tiny_dataset(n: int = 32, seed: int = 0) -> Dataset:
    """``n`` single-digit additions: ``prompt`` ``"3+4="``, ``answer`` ``"7"``, ``completion`` ``"7"``."""
    rng = random.Random(seed)
    rows = [(rng.randrange(10), rng.randrange(10)) for _ in range(n)]
    answers = [str(a + b) for a, b in rows]
    return Dataset.from_dict({"prompt": [f"{a}+{b}=" for a, b in rows], "answer": answers, "completion": answers})


def exact_reward(prompts: list[str], completions: list[str], answers: list[Any]) -> list[float]:
    """1.0 when the completion is exactly ``answer + "<eos>"``, else 0.0."""
    return [float(c == f"{a}<eos>") for c, a in zip(completions, answers, strict=True)]


def run(out_dir: str | Path, config: Optional[dict] = None, adapter: str = "plain") -> dict[str, Any]:
    """Train the tiny setup (``config`` overrides the defaults below) and write ``final.safetensors`` and
    ``history.json`` into ``out_dir`` (main process). ``adapter``: ``"plain"`` or ``"lora"``."""
    from accelerate import Accelerator

    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    student, teacher = tiny_model(0), tiny_model(1)
    if adapter == "lora":
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(
            student, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
        )
    defaults = dict(lr=1e-2, steps=3, batch_size=4, num_generations=2, max_new_tokens=4, seed=3, progress_bar=False)
    cfg = OPDConfig(**{**defaults, **(config or {})})
    trainer = OPDTrainer(
        student, teacher, tok, tiny_dataset(), cfg, reward_fn=exact_reward, accelerator=Accelerator(cpu=True)
    )
    history = trainer.train()
    out = Path(out_dir)
    if trainer.accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_file(trainable_state_dict(trainer.accelerator.unwrap_model(trainer.model)), str(out / "final.safetensors"))
        (out / "history.json").write_text(
            json.dumps({"history": history, "num_processes": trainer.accelerator.num_processes})
        )
    trainer.accelerator.wait_for_everyone()
    return {"history": history, "num_processes": trainer.accelerator.num_processes}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--config", default="{}", help="JSON dict of OPDConfig overrides")
    parser.add_argument("--adapter", default="plain", choices=["plain", "lora"])
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run(args.out, json.loads(args.config), args.adapter)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # tear gloo down before exit, not in interpreter shutdown
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
