"""bitsandbytes 8-bit / 4-bit bases: detect, dequantize, requantize (the path peft's LoRA uses to merge)."""

from __future__ import annotations

import torch
from torch import nn


def quantized_kind(layer: nn.Module) -> str | None:
    """``"8bit"`` / ``"4bit"`` when ``layer.weight`` is a bitsandbytes ``Int8Params`` / ``Params4bit``, else None."""
    name = type(getattr(layer, "weight", None)).__name__
    return {"Int8Params": "8bit", "Params4bit": "4bit"}.get(name)


def dequantize(layer: nn.Module) -> torch.Tensor:
    """Dense float32 (out, in) weight of a bitsandbytes layer (or a plain Linear's weight as float32)."""
    kind = quantized_kind(layer)
    if kind is None:
        return layer.weight.detach().to(torch.float32)
    from peft.utils.integrations import dequantize_bnb_weight

    state = getattr(layer, "state", None) if kind == "8bit" else None
    return dequantize_bnb_weight(layer.weight, state=state).to(torch.float32)


def requantize(layer: nn.Module, dense: torch.Tensor) -> dict:
    """Replace ``layer.weight`` by the quantization of ``dense`` (float (out, in)).

    Returns everything needed for :func:`restore` to put the old quantized state back bit-exactly (the old
    parameter and, for 8-bit layers, the ``CB`` / ``SCB`` tensors bitsandbytes moves between weight and state).
    """
    import bitsandbytes as bnb

    old = layer.weight
    kind = quantized_kind(layer)
    backup = {"weight": old, "data": old.data}
    if kind == "8bit":
        state = layer.state
        backup.update(w_cb=getattr(old, "CB", None), w_scb=getattr(old, "SCB", None), s_cb=state.CB, s_scb=state.SCB)
        new = bnb.nn.Int8Params(dense.to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights)
        layer.weight = new.to(old.device)
        state.reset_grads()
        state.CB, state.SCB = None, None
    elif kind == "4bit":
        kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_")}
        kwargs.pop("data", None)
        kwargs["requires_grad"] = False
        if "bnb_quantized" in kwargs:
            kwargs["bnb_quantized"] = False
        new = bnb.nn.Params4bit(dense.to(torch.float32).to("cpu"), **kwargs)
        layer.weight = new.to(old.device)
    else:
        raise TypeError(f"requantize: {type(layer).__name__} has no bitsandbytes weight")
    return backup


def restore(layer: nn.Module, backup: dict) -> None:
    """Put back the quantized state saved by :func:`requantize` (bit-exact unmerge)."""
    old = backup["weight"]
    old.data = backup["data"]
    layer.weight = old
    if quantized_kind(layer) == "8bit":
        old.CB, old.SCB = backup["w_cb"], backup["w_scb"]
        layer.state.reset_grads()
        layer.state.CB, layer.state.SCB = backup["s_cb"], backup["s_scb"]
