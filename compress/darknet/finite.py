"""Numbers that cannot lie: find the layer whose weights or outputs are NaN/Inf.

A diverged run or a corrupt file can hold NaN weights; every figure computed from them (mAP, a prune threshold, a
quantization error of 0 vs 0) is then made up. `load` checks the weights it reads and `evaluate.predict` the
outputs it scores, and both name the first layer at fault with its cfg line, so the error says where to look.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from compress.base.errors import WeightsError

__all__ = ["nonfinite_weights", "check_finite_weights", "first_nonfinite_output", "describe_layer"]


def describe_layer(model: Any, i: int) -> str:
    """`layer 3 [convolutional] (demo.cfg:40)`, or `layer 3` for a model without a cfg."""
    blocks = getattr(getattr(model, "cfg", None), "blocks", ())
    if i < len(blocks):
        return f"layer {i} [{blocks[i].type}] ({blocks[i].where()})"
    return f"layer {i}"


def nonfinite_weights(model: Any) -> tuple[int, str] | None:
    """(layer index, tensor name) of the first layer whose parameters or float buffers hold NaN/Inf, else None."""
    for i, layer in enumerate(getattr(model, "layers", ())):
        tensors = list(layer.named_parameters()) + list(layer.named_buffers())
        for name, t in tensors:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return i, name
    return None


def check_finite_weights(model: Any, source: str | os.PathLike) -> None:
    """Raise WeightsError naming the first layer with NaN/Inf weights (`source`: the weights file)."""
    found = nonfinite_weights(model)
    if found is not None:
        i, name = found
        raise WeightsError(f"{source}: {describe_layer(model, i)} holds NaN/Inf values ({name}); the weights are "
                           "broken (a diverged training run or a corrupt file); pass weights with finite values")


@torch.no_grad()
def first_nonfinite_output(model: Any, x: torch.Tensor) -> int | None:
    """Index of the first layer whose output on `x` holds NaN/Inf (forward hooks on `model.layers`), else None."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        return None
    found: list[int] = []

    def hook(i: int):
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            outs = output if isinstance(output, (tuple, list)) else (output,)
            if not found and any(isinstance(o, torch.Tensor) and o.is_floating_point()
                                 and not bool(torch.isfinite(o).all()) for o in outs):
                found.append(i)
        return record

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None
