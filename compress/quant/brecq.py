"""Block reconstruction for learned rounding (BRECQ, Li et al. 2021): the rounding of every conv in a block is
learned jointly, so that the quantized block reproduces the float block's *output*, instead of each conv its own.

Layer by layer, each conv's rounding can only undo its own error; inside a block (yolov4-tiny's CSP block: a conv
that splits into two branches, convs on one branch, concats that join them again) later convs can also
compensate earlier ones, and the target is the tensor the rest of the network actually reads.

A block is found from the layer graph, not from layer names: it starts at a layer whose output goes to more than the
next layer and ends where those branches have joined again (every consumer of the block's layers, but the last,
lies inside it), if that happens within `MAX_SPAN` layers and before any detection head. A conv outside any block
keeps layer-wise learned rounding (`compress.quant.adaround`).

Each step takes a random window of the block's external inputs (quantized model) and of the float model's same
inputs, runs the quantized block (soft-rounded weights, activation quantizers as deployed) and the float block on
them and compares the outputs: both see the same window, so the target is exact for that input and a step costs
the same at any input size.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from compress.darknet.graph import LayerGraph
from compress.quant.adaround import (RoundingConfig, _capture_many, _eligible, _float_folded, _h, _init_v,
                                     _layer_out, regulariser)

__all__ = ["find_blocks", "fit_block", "block_error", "MAX_SPAN"]

log = logging.getLogger(__name__)

MAX_SPAN = 12   # layers a block may span (branches that rejoin further apart are fitted layer by layer)
_ALIGN = 8      # window origins on multiples of this (a block with a stride-2 layer keeps its grid)


def _block_end(graph: LayerGraph, a: int) -> int | None:
    """The last layer of the block starting at `a`, or None (a's output goes only to the next layer, or its branches
    rejoin too late or through a head)."""
    if not set(graph.consumers[a]) - {a + 1}:
        return None
    b = max(graph.consumers[a])
    while True:
        far = max((c for j in range(a, b) for c in graph.consumers[j] if c - a <= MAX_SPAN), default=b)
        if far <= b:
            break
        b = far
    if b - a > MAX_SPAN or any(graph.sections[j].head for j in range(a, b + 1)):
        return None
    return b


def find_blocks(model: nn.Module, config: RoundingConfig) -> list[tuple[int, int]]:
    """(first, last) layer of every block holding at least two convs whose rounding is learned, in order, not
    overlapping."""
    graph, out, a = model.graph, [], 0
    while a < len(model.layers):
        b = _block_end(graph, a)
        if b is not None and sum(_eligible(model.layers[j], config) for j in range(a, b + 1)) >= 2:
            out.append((a, b))
            a = b + 1
        else:
            a += 1
    return out


def _external(graph: LayerGraph, a: int, b: int) -> list[int]:
    """Producers outside [a, b] that the block reads (-1: the image)."""
    return sorted({s for j in range(a, b + 1) for s in graph.inputs[j] if s < a})


def _run(model: nn.Module, a: int, b: int, ext: dict[int, torch.Tensor],
         conv: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The block's output for external inputs `ext`; `conv(j, x)` replaces conv j's forward when it returns a
    tensor (the soft-rounded weights)."""
    vals = dict(ext)
    for j in range(a, b + 1):
        args = [vals[s] for s in model.graph.inputs[j]]
        y = conv(j, args[0]) if conv is not None else None
        vals[j] = y if y is not None else model.layers[j](*args)
    return vals[b]


def _crop(tensors: list[torch.Tensor], idx: torch.Tensor, size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """The same images and the same random window of every tensor (all the same height and width); the whole
    map when it is smaller than the window or the sizes differ."""
    h, w = tensors[0].shape[2:]
    if any(t.shape[2:] != (h, w) for t in tensors) or (h <= size and w <= size):
        return [t[idx] for t in tensors]
    oy = int(torch.randint(0, max(h - size, 0) // _ALIGN + 1, (1,), generator=gen)) * _ALIGN
    ox = int(torch.randint(0, max(w - size, 0) // _ALIGN + 1, (1,), generator=gen)) * _ALIGN
    return [t[idx, :, oy:oy + size, ox:ox + size] for t in tensors]


def _soft_conv(qmodel: nn.Module, params: dict[int, tuple]) -> Callable[[int, torch.Tensor], torch.Tensor | None]:
    """Conv j's forward with its weights at floor(w / s) + h(V) (learned) or as it quantizes now (the others)."""
    def conv(j: int, x: torch.Tensor) -> torch.Tensor | None:
        layer = qmodel.layers[j]
        if j not in params:
            return None
        base, v, s, qp, b = params[j]
        wq = torch.clamp(base + _h(v), qp.qmin, qp.qmax) * s
        y = _layer_out(layer, x, wq, b, padded=False)
        return layer.act_quant(y) if layer.act_quant is not None else y
    return conv


def fit_block(float_model: nn.Module, qmodel: nn.Module, block: tuple[int, int], images: torch.Tensor,
              config: RoundingConfig, gen: torch.Generator, device: torch.device) -> dict[int, torch.Tensor]:
    """Learn the rounding of the block's eligible convs jointly; returns {conv: integer codes} (not yet fixed)."""
    a, b = block
    ext_ids = _external(qmodel.graph, a, b)
    xq = _capture_many(qmodel, ext_ids, images, device)
    xf = _capture_many(float_model, ext_ids, images, device)
    params: dict[int, tuple] = {}
    for j in range(a, b + 1):
        layer = qmodel.layers[j]
        if _eligible(layer, config):
            w, bias = _float_folded(layer)
            qp = layer._nearest(w).qparams
            s, _ = qp.view(w.dim())
            base = torch.floor(w / s)
            params[j] = (base, nn.Parameter(_init_v(w / s - base)), s, qp, bias)
    vs = [p[1] for p in params.values()]
    opt = torch.optim.Adam(vs, lr=config.lr)
    conv = _soft_conv(qmodel, params)
    warm = int(config.warmup * config.iters)
    qmodel.eval()
    float_model.eval()
    for step in range(config.iters):
        idx = torch.randint(0, len(images), (min(config.batch, len(images)),), generator=gen)
        crops = _crop([xq[i] for i in ext_ids] + [xf[i] for i in ext_ids], idx, config.block_window, gen)
        with torch.no_grad():
            target = _run(float_model, a, b, dict(zip(ext_ids, crops[len(ext_ids):])))
        out = _run(qmodel, a, b, dict(zip(ext_ids, crops[:len(ext_ids)])), conv)
        loss = (out - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)
        if step >= warm:
            loss = loss + config.reg * regulariser(torch.cat([_h(v).flatten() for v in vs]), step, warm, config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return {j: torch.clamp(base + (_h(v) >= 0.5).float(), qp.qmin, qp.qmax).long()
                for j, (base, v, s, qp, _) in params.items()}


@torch.no_grad()
def block_error(float_model: nn.Module, qmodel: nn.Module, block: tuple[int, int], images: torch.Tensor,
                device: torch.device) -> float:
    """Relative squared error of the quantized block's output (as it quantizes now) on `images`, fed its inputs in
    the quantized model, against the float block fed the float model's."""
    a, b = block
    ext_ids = _external(qmodel.graph, a, b)
    xq = _capture_many(qmodel, ext_ids, images, device)
    xf = _capture_many(float_model, ext_ids, images, device)
    num = den = 0.0
    for k in range(0, len(images), 8):
        target = _run(float_model, a, b, {i: xf[i][k:k + 8] for i in ext_ids})
        out = _run(qmodel, a, b, {i: xq[i][k:k + 8] for i in ext_ids})
        num, den = num + float((out - target).pow(2).sum()), den + float(target.pow(2).sum())
    return num / max(den, 1e-12)
