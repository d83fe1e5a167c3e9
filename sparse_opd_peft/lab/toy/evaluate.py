"""Greedy held-out accuracy of a (possibly PEFT-wrapped) causal LM on a toy task."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .tasks import Task, get_task


@torch.no_grad()
def greedy_completions(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 256,
) -> list[str]:
    """Greedy-decode a continuation of every prompt with ``model.generate``.

    Prompts are encoded with BOS and left padding (``(B, L)`` ``int64`` ids + attention mask on the model's
    device). Each continuation is cut at its first EOS, decoded without skipping special tokens (a stray pad or
    BOS makes the text wrong instead of vanishing) and returned with ``"<eos>"`` appended when EOS was generated.
    Works for a plain ``PreTrainedModel`` and a ``PeftModel`` (its ``generate`` forwards keyword arguments).
    """
    if batch_size <= 0 or max_new_tokens <= 0:
        raise ValueError(f"batch_size and max_new_tokens must be > 0, got {batch_size}, {max_new_tokens}")
    device = next(model.parameters()).device
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    was_training = model.training
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    model.eval()
    texts: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
            out = model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
            )
            new = out[:, enc["input_ids"].shape[1] :].tolist()
            for row in new:
                if eos_id in row:
                    cut = row.index(eos_id)
                    texts.append(tokenizer.decode(row[:cut], skip_special_tokens=False) + tokenizer.eos_token)
                else:
                    texts.append(tokenizer.decode(row, skip_special_tokens=False))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return texts


def evaluate_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    task: str | Task,
    *,
    batch_size: int = 256,
    max_new_tokens: int | None = None,
) -> float:
    """Share of ``dataset`` prompts whose greedy completion the task's verifier scores 1.0.

    Args:
        model: a causal LM (plain or PEFT-wrapped) with ``generate``.
        tokenizer: the tokenizer the model was trained with.
        dataset: a ``datasets.Dataset`` with a ``prompt`` column (the ``answer`` column is not needed: the
            verifier recomputes the answer from the prompt).
        task: task name or :class:`Task`.
        batch_size: prompts per ``generate`` call.
        max_new_tokens: defaults to the task's answer width + 1 (room for EOS).

    Returns:
        accuracy in ``[0, 1]``; ``0.0`` for an empty dataset.
    """
    task = get_task(task)
    if "prompt" not in dataset.column_names:
        raise ValueError(f"dataset needs a 'prompt' column, has {dataset.column_names}")
    prompts = list(dataset["prompt"])
    if not prompts:
        return 0.0
    completions = greedy_completions(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens or task.answer_width + 1, batch_size=batch_size
    )
    return sum(task.rewards(prompts, completions)) / len(prompts)
