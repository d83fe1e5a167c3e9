"""Run a causal LM over a rollout's completion positions and hand back what the vocabulary-wide losses need.

For a model whose logits are exactly ``lm_head(h)`` (a plain ``nn.Linear`` output embedding, no logit scaling or
soft-capping after it: checked once per model against its own logits), :class:`CompletionScorer` returns the
hidden states ``h`` that enter the head together with the head's weight and bias, so that
:func:`~.losses.head_objectives` never materialises the ``(N, C, V)`` logits. Any other model gets its logits
(and ``None`` for the head), which the same functions accept.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Optional

import torch
import torch.nn.functional as F

from .rollout import Rollout

__all__ = ["CompletionScorer", "base_model"]


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model under a PEFT wrapper (``get_base_model()``), else the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@contextmanager
def _bypassed(head: torch.nn.Module) -> Iterator[None]:
    """Make ``head`` return its input: the model's "logits" become the hidden states entering the head."""
    head.forward = _identity
    try:
        yield
    finally:
        del head.forward


class CompletionScorer:
    """Scores a rollout's completion positions with one model.

    Args:
        model: the model to call (possibly wrapped by ``accelerate``: DDP and the like).
        bare: the same model unwrapped (``accelerator.unwrap_model``), to find its output embedding.
        device: where its inputs go.
    """

    def __init__(self, model: torch.nn.Module, bare: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device
        try:
            params = inspect.signature(base_model(bare).forward).parameters
        except (TypeError, ValueError):
            params = {}
        self.logits_to_keep = "logits_to_keep" in params
        head = getattr(base_model(bare), "get_output_embeddings", lambda: None)()
        plain = (
            type(head) is torch.nn.Linear
            and "forward" not in vars(head)
            and not hasattr(head, "_hf_hook")
            and head.weight.device.type != "meta"
        )
        self.head: Optional[torch.nn.Linear] = head if plain else None
        self._verified = self.head is None

    def _call(self, ro: Rollout, keep: int, hidden: bool) -> torch.Tensor:
        kwargs = dict(
            input_ids=ro.input_ids.to(self.device), attention_mask=ro.attention_mask.to(self.device),
            position_ids=ro.position_ids.to(self.device), use_cache=False,
        )  # fmt: skip
        if self.logits_to_keep:
            kwargs["logits_to_keep"] = keep
        with _bypassed(self.head) if hidden else nullcontext():
            out = self.model(**kwargs)
        return out.logits if hasattr(out, "logits") else out[0]

    def _verify(self, ro: Rollout) -> None:
        """Once: the head applied to the bypassed output must reproduce the model's last-position logits (in eval
        mode, so no dropout and no random numbers are drawn); otherwise fall back to logits."""
        was = self.model.training
        self.model.eval()
        w, b = self.head.weight, self.head.bias
        try:
            with torch.no_grad():
                ref = self._call(ro, 1, hidden=False)[:, -1].float()
                h = self._call(ro, 1, hidden=True)[:, -1]
                got = F.linear(h.to(w.device, w.dtype), w, b).float().to(ref.device)
        except RuntimeError:  # e.g. a sharded weight (FSDP / ZeRO-3) that cannot be applied outside the model
            got = ref = None
        finally:
            self.model.train(was)
        tol = 1e-3 if w.dtype in (torch.float32, torch.float64) else 3e-2
        if (
            got is None
            or got.shape != ref.shape
            or not torch.allclose(got, ref, rtol=tol, atol=tol * (1.0 + float(ref.abs().max())))
        ):
            self.head = None
        self._verified = True

    def __call__(self, ro: Rollout) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(x, weight, bias)`` at the ``C`` completion positions of ``ro`` (the output at position ``t`` predicts
        ``completion_ids[:, t]``): ``x`` ``(N, C, H)`` hidden states with the head's ``(V', H)`` weight and ``(V',)``
        bias (or None), or ``x`` ``(N, C, V')`` logits with ``weight = bias = None``. Differentiable when grad mode
        is on."""
        if not self._verified:
            self._verify(ro)
        width = ro.completion_ids.shape[1]
        out = self._call(ro, width + 1, hidden=self.head is not None)[:, -(width + 1) : -1]
        if self.head is None:
            return out, None, None
        return out, self.head.weight, self.head.bias
