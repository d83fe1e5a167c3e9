"""Rollouts: left-padded prompt batches, seeded sampling with ``generate``, completion masks, SFT batches.

Layout of a :class:`Rollout` of ``N`` rows (prompt-major: row ``i * n + k`` is sample ``k`` of prompt ``i``)::

    input_ids  = [pad .. pad  prompt tokens | completion tokens  EOS  pad .. pad]     (N, P + C)
    attention  = [0   .. 0    1 ........ 1  | 1 ............... 1    0   .. 0  ]
    completion_mask (N, C): True on completion tokens up to and including the first EOS; prompt, padding and
                            everything after EOS are excluded.

Sampling is seeded **per row** (:class:`SeededSampler`): every sampled sequence depends only on its own seed and on
the model, not on which other rows share its batch, so a run is reproducible across process counts, micro-batch
splits and resumes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import torch
from accelerate.utils import DistributedType
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase

__all__ = [
    "Rollout",
    "SeededSampler",
    "build_completion_batch",
    "completion_mask",
    "decode_completions",
    "encode_prompts",
    "generate_rollouts",
    "model_device",
    "position_ids_from_mask",
    "sample_seed",
    "unwrap_for_generation",
]


@dataclass
class Rollout:
    """A batch of prompt + completion rows (see the module docstring for the layout).

    Attributes:
        input_ids: ``(N, P + C)`` int64 token ids (prompt left-padded, completion right-padded with pad).
        attention_mask: ``(N, P + C)`` int64, 1 on real prompt tokens and on completion tokens up to EOS.
        completion_ids: ``(N, C)`` int64, the completion part of ``input_ids``.
        completion_mask: ``(N, C)`` bool, True on trained / scored completion tokens (EOS included).
        prompt_length: ``P``, the padded prompt length.
        prompt_index: ``(N,)`` int64, index of each row's prompt in the list given to the builder.
        sample_logprobs: ``(N, C)`` float32 log-probability of each sampled token under the sampling distribution
            (temperature applied), or None (greedy / SFT). Zero where ``completion_mask`` is False.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    prompt_length: int
    prompt_index: torch.Tensor
    sample_logprobs: Optional[torch.Tensor] = None

    @property
    def position_ids(self) -> torch.Tensor:
        """``(N, P + C)`` int64 positions counted over attended tokens (what ``generate`` uses with left padding)."""
        return position_ids_from_mask(self.attention_mask)

    @property
    def lengths(self) -> torch.Tensor:
        """``(N,)`` int64 completion lengths (EOS counted)."""
        return self.completion_mask.sum(-1)

    def ended_with_eos(self, eos_token_id: int) -> torch.Tensor:
        """``(N,)`` bool: whether each completion contains an EOS (it stopped rather than ran out of tokens)."""
        return ((self.completion_ids == eos_token_id) & self.completion_mask).any(-1)

    def to(self, device: torch.device | str) -> Rollout:
        """A copy with every tensor on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Rollout(
            move(self.input_ids),
            move(self.attention_mask),
            move(self.completion_ids),
            move(self.completion_mask),
            self.prompt_length,
            move(self.prompt_index),
            move(self.sample_logprobs),
        )


@contextmanager
def unwrap_for_generation(accelerator: Any, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Context yielding the bare model to call ``generate`` on: unwrapped from DDP, with the full parameters
    gathered under FSDP (version 1) and DeepSpeed ZeRO-3 (FSDP2 gathers in its own forward hooks)."""
    bare = accelerator.unwrap_model(model)
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP and getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, writeback=False, recurse=True):
            yield bare
    elif kind == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield bare
    else:
        yield bare


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of a model's inputs: ``model.device`` when defined (sharded / quantized HF models), else the first
    parameter's device."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def sample_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed derived from ``seed`` and any keys (e.g. step, global prompt index, sample index), stable across
    platforms and Python versions (BLAKE2b, not ``hash``)."""
    text = "/".join(str(k) for k in (seed, *keys))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of a left-padded ``(N, L)`` 0/1 mask: ``cumsum - 1`` on attended tokens, 1 on padding (as
    ``generate`` does). Returns ``(N, L)`` int64."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Mask of the completion tokens up to and including the first EOS.

    Args:
        completion_ids: ``(N, C)`` int64 generated ids (whatever follows the first EOS is ignored, so the pad id may
            equal the EOS id).
        eos_token_id: the EOS id.

    Returns:
        ``(N, C)`` bool; rows without EOS are True everywhere (truncated at ``max_new_tokens``).
    """
    if completion_ids.dim() != 2:
        raise ValueError(f"completion_ids must be 2-D (N, C), got shape {tuple(completion_ids.shape)}")
    is_eos = (completion_ids == eos_token_id).long()
    eos_before = is_eos.cumsum(-1) - is_eos  # number of EOS strictly before each position
    return eos_before == 0


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token so that rollouts can stop")
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize prompts (with the tokenizer's special tokens, e.g. BOS) and left-pad them.

    Returns:
        ``(input_ids, attention_mask)``, both ``(B, P)`` int64 on ``device``.
    """
    if len(prompts) == 0:
        raise ValueError("encode_prompts got no prompts")
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    if any(len(r) == 0 for r in rows):
        raise ValueError("a prompt encodes to zero tokens; prompts must be non-empty")
    width = max(len(r) for r in rows)
    pad = _pad_id(tokenizer)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids.to(device or "cpu"), mask.to(device or "cpu")


class SeededSampler(LogitsProcessor):
    """Sample one token per row from ``softmax(logits[:, :vocab_size] / temperature)`` with a per-row generator.

    Used as a logits processor of greedy ``generate``: it returns scores that are 0 at the sampled token and -inf
    elsewhere, so the greedy pick is the sample. Inverse-CDF sampling with one uniform draw per row and step (CPU
    generators, float64 cumulative sums) makes every row's sequence depend only on its own seed.
    """

    def __init__(self, seeds: Sequence[int], temperature: float = 1.0, vocab_size: Optional[int] = None):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature = float(temperature)
        self.vocab_size = vocab_size
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(
                f"SeededSampler has {len(self.generators)} seeds but generate produced {scores.shape[0]} rows"
            )
        logits = scores.float()
        if self.vocab_size is not None and logits.shape[-1] > self.vocab_size:
            logits = logits.clone()
            logits[:, self.vocab_size :] = float("-inf")
        logp = torch.log_softmax(logits / self.temperature, dim=-1)
        cdf = logp.double().exp().cumsum(-1)
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators]).to(cdf.device)
        u = u * cdf[:, -1]  # strictly below the total mass: never lands past the last token with mass
        tokens = torch.searchsorted(cdf, u[:, None], right=True).clamp_(max=cdf.shape[-1] - 1)
        self.logprobs.append(logp.gather(-1, tokens))
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(-1, tokens, 0.0)
        return out


def _generation_config(tokenizer: PreTrainedTokenizerBase, max_new_tokens: int) -> GenerationConfig:
    # Explicit neutral values: a model's own generation_config (e.g. repetition_penalty) must not reshape the sampling.
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        temperature=1.0,
        top_k=None,
        top_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=_pad_id(tokenizer),
        use_cache=True,
    )


@torch.no_grad()
def generate_rollouts(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    num_generations: int = 1,
    temperature: float = 1.0,
    seeds: Optional[Sequence[int]] = None,
    vocab_size: Optional[int] = None,
    greedy: bool = False,
) -> Rollout:
    """Sample (or greedy-decode) ``num_generations`` completions per prompt with ``model.generate``.

    Args:
        model: a causal LM (plain, PEFT-wrapped, quantized); inputs go to :func:`model_device`.
        tokenizer: provides BOS / EOS / pad; prompts are left-padded.
        prompts: ``B`` prompt strings.
        max_new_tokens: completion budget; generation stops at EOS.
        num_generations: samples per prompt (rows are prompt-major).
        temperature: sampling temperature.
        seeds: one seed per row (``B * num_generations``), e.g. from :func:`sample_seed`; required unless greedy.
        vocab_size: sample only ids below this (the tokenizer's length; excludes padded embedding rows).
        greedy: argmax decoding (evaluation); ``num_generations`` must then be 1.

    Returns:
        A :class:`Rollout` on the model's device, ``N = B * num_generations`` rows.
    """
    n_rows = len(prompts) * num_generations
    if greedy and num_generations != 1:
        raise ValueError(f"greedy decoding gives identical samples; use num_generations=1, got {num_generations}")
    if not greedy and (seeds is None or len(seeds) != n_rows):
        raise ValueError(
            f"sampling needs one seed per row: {len(prompts)} prompts x {num_generations} generations = {n_rows} seeds, "
            f"got {None if seeds is None else len(seeds)}"
        )
    device = model_device(model)
    ids, mask = encode_prompts(tokenizer, prompts, device)
    ids = ids.repeat_interleave(num_generations, 0)
    mask = mask.repeat_interleave(num_generations, 0)
    sampler = None if greedy else SeededSampler(seeds, temperature, vocab_size)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=_generation_config(tokenizer, max_new_tokens),
            logits_processor=LogitsProcessorList([sampler] if sampler is not None else []),
        )
    finally:
        model.train(was_training)
    width = ids.shape[1]
    comp = out[:, width:]
    if comp.shape[1] == 0:
        raise ValueError("generate returned no new tokens; check max_new_tokens and the model's generation settings")
    cmask = completion_mask(comp, tokenizer.eos_token_id)
    comp = comp.masked_fill(~cmask, _pad_id(tokenizer))
    sample_lp = None
    if sampler is not None:
        sample_lp = torch.cat(sampler.logprobs, dim=-1)[:, : comp.shape[1]].to(device) * cmask
    prompt_index = torch.arange(len(prompts), device=device).repeat_interleave(num_generations)
    return Rollout(
        input_ids=torch.cat([ids, comp], dim=1),
        attention_mask=torch.cat([mask, cmask.long()], dim=1),
        completion_ids=comp,
        completion_mask=cmask,
        prompt_length=width,
        prompt_index=prompt_index,
        sample_logprobs=sample_lp,
    )


def build_completion_batch(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    add_eos: bool = True,
    device: torch.device | str | None = None,
) -> Rollout:
    """A :class:`Rollout` of given completions (SFT / scoring): completions are tokenized without special tokens and
    followed by EOS (``add_eos``), right-padded; the completion mask covers exactly those tokens."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions; pass one completion per prompt")
    ids, mask = encode_prompts(tokenizer, prompts, device)
    rows = [
        tokenizer(c, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if add_eos else [])
        for c in completions
    ]
    if any(len(r) == 0 for r in rows):
        raise ValueError("a completion encodes to zero tokens (empty completion with add_eos=False)")
    width = max(len(r) for r in rows)
    comp = torch.full((len(rows), width), _pad_id(tokenizer), dtype=torch.long)
    cmask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        comp[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        cmask[i, : len(r)] = True
    comp, cmask = comp.to(ids.device), cmask.to(ids.device)
    return Rollout(
        input_ids=torch.cat([ids, comp], dim=1),
        attention_mask=torch.cat([mask, cmask.long()], dim=1),
        completion_ids=comp,
        completion_mask=cmask,
        prompt_length=ids.shape[1],
        prompt_index=torch.arange(len(prompts), device=ids.device),
    )


def decode_completions(
    tokenizer: PreTrainedTokenizerBase, rollout: Rollout, skip_special_tokens: bool = False
) -> list[str]:
    """Decode each row's masked completion tokens (EOS included as text unless ``skip_special_tokens``)."""
    out = []
    for row, m in zip(rollout.completion_ids.tolist(), rollout.completion_mask.tolist(), strict=True):
        toks = [t for t, keep in zip(row, m, strict=True) if keep]
        out.append(tokenizer.decode(toks, skip_special_tokens=skip_special_tokens))
    return out
