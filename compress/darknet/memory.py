"""Inference memory at an input size, estimated from the graph's shapes before anything is allocated.

The forward pass keeps the outputs later layers read (`LayerGraph.kept_outputs`) plus the layer being computed
(its input, a conv's output before and after BN and the activation: about three outputs of temporaries), and the
heads' decoded boxes twice (each head's, then their concatenation). That sum x 4 bytes x batch, plus the input
batch, the weights and 64 MiB for the framework's own buffers, is the estimate; `check_inference_memory` refuses work that exceeds the free memory
with both figures and the fix, instead of an allocator traceback or the OOM killer.
"""
from __future__ import annotations

from typing import Any

import torch

from compress.base.memory import MemoryLimitError, device_free_memory
from compress.darknet.graph import LayerGraph

__all__ = ["inference_bytes", "check_inference_memory"]

_TEMPORARIES = 3   # conv output, BN output, activation output of the largest layer alive at once
# The framework's own buffers (conv workspaces, allocator arenas) on top of the tensors: a forward of
# yolov4-tiny at 416 grows the peak RSS by ~48 MiB where its tensors hold 29 (benchmarks/inference_memory.py)
_RUNTIME = 64 * 2**20


def inference_bytes(graph: LayerGraph, hw: tuple[int, int], batch: int = 1, weights: int = 0) -> tuple[int, int]:
    """(estimated peak bytes of an eval-mode forward of `batch` images of `hw`, index of the largest layer).
    `weights`: floats of the model's weights (counted once)."""
    shapes = graph.shapes(*hw)
    sizes = [c * h * w for c, h, w in shapes]
    largest = max(range(len(sizes)), key=sizes.__getitem__) if sizes else 0
    kept = sum(sizes[i] for i in graph.kept_outputs)
    heads = sum(sizes[i] for i in graph.heads)
    image = graph.cfg.channels * hw[0] * hw[1] + 3 * hw[0] * hw[1]
    per_image = kept + _TEMPORARIES * (sizes[largest] if sizes else 0) + 2 * heads + image
    return 4 * (batch * per_image + weights) + _RUNTIME, largest


def check_inference_memory(model: Any, hw: tuple[int, int], batch: int, device: str | torch.device,
                           fix: str) -> int | None:
    """Raise MemoryLimitError when `model` (a DarknetModel; other predictors pass) would need more memory than
    `device` has free for `batch` images of `hw`; `fix` says which options lower it. Returns the estimate."""
    graph = getattr(model, "graph", None)
    if not isinstance(graph, LayerGraph):
        return None
    weights = sum(p.numel() for p in model.parameters())
    need, largest = inference_bytes(graph, hw, batch, weights)
    free = device_free_memory(device)
    if free and need > free:
        block = graph.cfg.blocks[largest]
        raise MemoryLimitError(
            f"{hw[0]}x{hw[1]} input, batch {batch}: inference needs about {need / 2**30:.1f} GiB (layer {largest} "
            f"[{block.type}] alone outputs {4 * batch * _size(graph, hw, largest) / 2**30:.1f} GiB) but "
            f"{free / 2**30:.1f} GiB are free on {torch.device(device).type}; {fix}")
    return need


def _size(graph: LayerGraph, hw: tuple[int, int], i: int) -> int:
    c, h, w = graph.shapes(*hw)[i]
    return c * h * w
