"""Tiny ``Qwen3ForCausalLM`` models built from configs, and deterministic supervised training on the toy tasks.

Embeddings are **untied** (``tie_word_embeddings=False``): ``lm_head`` is its own ``Linear``, so a sparse adapter
or a mask over Linear weights never silently edits the input embedding through a shared tensor, and the weight
count per module type is unambiguous. (Larger Qwen3 checkpoints, 8B and up, are untied too.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, Qwen3Config, Qwen3ForCausalLM


@dataclass(frozen=True)
class ModelSpec:
    """Architecture and training schedule of one toy model.

    Attributes:
        hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size: Qwen3 config values.
        steps: optimizer steps actually taken.
        lr: peak AdamW learning rate.
        warmup_steps: linear warm-up steps from 0 to ``lr``.
        decay_steps: the linear decay reaches 0 at this step; ``None`` means ``steps``. A value above ``steps``
            stops training early on a schedule planned for longer (how the weak student anchor is made).
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    steps: int
    lr: float
    warmup_steps: int = 50
    decay_steps: int | None = None

    def validate(self, what: str = "model") -> None:
        """Raise ``ValueError`` with a clear message for impossible values."""
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{what}.{name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{what}.num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.steps < 0 or self.warmup_steps < 0:
            raise ValueError(f"{what}.steps and warmup_steps must be >= 0, got {self.steps}, {self.warmup_steps}")
        if self.decay_steps is not None and self.decay_steps < self.steps:
            raise ValueError(f"{what}.decay_steps ({self.decay_steps}) must be >= steps ({self.steps}) or None")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"{what}.lr must be a finite number > 0, got {self.lr}")


def build_model(
    spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, seed: int, *, max_position_embeddings: int = 64
) -> Qwen3ForCausalLM:
    """A freshly initialised float32 ``Qwen3ForCausalLM`` for ``spec``, deterministic in ``seed``.

    The global torch RNG is forked, so the caller's RNG state is unchanged. ``max_position_embeddings`` (64 fits the
    toy tasks) does not change the weights.
    """
    spec.validate()
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_sliding_window=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.float()


def tokenize_sft(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], answers: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode ``bos + prompt + answer + eos`` sequences for supervised training, right-padded.

    Returns:
        ``(input_ids, attention_mask, labels)``, each ``(N, L)`` ``int64``; ``labels`` is ``-100`` on BOS, the
        prompt and padding, and equals ``input_ids`` on the completion (answer + EOS) tokens.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    p_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    a_ids = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    length = max((len(p) + len(a) + 1 for p, a in zip(p_ids, a_ids, strict=True)), default=1)
    n = len(p_ids)
    input_ids = torch.full((n, length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((n, length), -100, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    for i, (p, a) in enumerate(zip(p_ids, a_ids, strict=True)):
        seq = p + a + [tokenizer.eos_token_id]
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention_mask[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = torch.tensor(seq[len(p) :])
    return input_ids, attention_mask, labels


def lr_factor(step: int, spec: ModelSpec) -> float:
    """Multiplier of ``spec.lr`` at optimizer step ``step`` (0-based): linear warm-up, then linear decay to 0."""
    if spec.warmup_steps and step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    total = spec.decay_steps if spec.decay_steps is not None else spec.steps
    span = max(1, total - spec.warmup_steps)
    return max(0.0, 1.0 - (step - spec.warmup_steps) / span)


def train_sft(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    spec: ModelSpec,
    *,
    batch_size: int,
    seed: int,
    weight_decay: float = 0.0,
    progress: bool = True,
    desc: str = "train",
    callback: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Supervised cross-entropy on completion tokens only (answer + EOS), AdamW, fixed data order.

    Batches are consecutive slices of per-epoch permutations drawn from a ``torch.Generator`` seeded with ``seed``,
    so two runs with the same inputs (and the same torch build / thread count) give bit-identical weights. The
    model is trained in place and left in eval mode. ``callback(step, loss)``, if given, runs after every step
    (e.g. to evaluate the model every k steps; greedy evaluation does not touch any RNG, so it does not change
    the result).

    Returns:
        the training loss of every step (floats).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if len(prompts) == 0:
        raise ValueError("no training examples")
    input_ids, attention_mask, labels = tokenize_sft(tokenizer, prompts, answers)
    n = input_ids.shape[0]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    model.train()
    losses: list[float] = []
    order = torch.empty(0, dtype=torch.long)
    bar = tqdm(range(spec.steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        if order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        idx, order = order[:batch_size], order[batch_size:]
        width = int(attention_mask[idx].sum(1).max())
        for group in opt.param_groups:
            group["lr"] = spec.lr * lr_factor(step, spec)
        # Padding is on the right and carries label -100, and attention is causal, so no real token can attend to
        # a pad: the attention mask is omitted, which keeps the fast mask-free SDPA path.
        out = model(input_ids=input_ids[idx, :width], labels=labels[idx, :width])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(out.loss.detach()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if callback is not None:
            callback(step, losses[-1])
    model.eval()
    return losses
