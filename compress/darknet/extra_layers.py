"""Torch modules of the sections added through the section table: [local_avgpool], [reorg]/[reorg3d],
[Gaussian_yolo] and the reference dialect's ASFF [yolo] head. Darknet's src/*_layer.c are the spec."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.darknet.block import Block
from compress.darknet.geometry import maxpool_geometry, strides
from compress.darknet.layers import YOLOLayer, _grid_and_stride

__all__ = ["LocalAvgPool", "Reorg", "GaussianYOLOLayer", "ASFFYOLOLayer"]


class LocalAvgPool(nn.Module):
    """Average over each window; padding as Darknet's maxpool (size-1 in total, top-left first); taps outside
    the image are not counted (forward_local_avgpool_layer divides by the valid count)."""

    def __init__(self, block: Block) -> None:
        super().__init__()
        self.size, _, padding = maxpool_geometry(block)
        self.stride = strides(block)
        self.pad = (padding // 2, padding - padding // 2) * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(1, 1, *x.shape[2:], dtype=x.dtype, device=x.device)
        total = F.avg_pool2d(F.pad(x, self.pad), self.size, self.stride)
        count = F.avg_pool2d(F.pad(ones, self.pad), self.size, self.stride)
        return total / count


def _reorg_index(c: int, h: int, w: int, s: int) -> torch.Tensor:
    """Darknet's reorg_cpu(x, w, h, c, stride, forward=0) as a gather: out[t] = x[index[t]] over flat (c, h, w)."""
    k = torch.arange(c).view(c, 1, 1)
    j = torch.arange(h).view(1, h, 1)
    i = torch.arange(w).view(1, 1, w)
    out_c = c // (s * s)
    c2, offset = k % out_c, k // out_c
    w2, h2 = i * s + offset % s, j * s + offset // s
    return (w2 + w * s * (h2 + h * s * c2)).flatten()


class Reorg(nn.Module):
    """[reorg] (Darknet's reorg_old: reorg_cpu on the input's own w, h, c) and [reorg3d] (reorg_cpu on the
    output's w, h, c: a plain space-to-depth). `old`: [reorg]; `identity` for the reference dialect's [reorg3d]."""

    def __init__(self, block: Block, identity: bool = False, old: bool = False) -> None:
        super().__init__()
        self.stride = block.get_int("stride", 1)
        self.reverse = bool(block.get_int("reverse", 0))
        self.old = old
        self.identity = identity or self.stride == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x
        n, c, h, w = x.shape
        s = self.stride
        out_shape = (n, c // (s * s), h * s, w * s) if self.reverse else (n, c * s * s, h // s, w // s)
        # the (w, h, c) that Darknet hands to reorg_cpu, and whether it gathers (forward=0) or scatters
        dims = (c, h, w) if self.old else out_shape[1:]
        index = _reorg_index(dims[0], dims[1], dims[2], s).to(x.device)
        flat = x.reshape(n, -1)
        if not self.reverse:
            out = flat[:, index]
        else:
            out = torch.empty_like(flat)
            out[:, index] = flat
        return out.view(out_shape)


class GaussianYOLOLayer(YOLOLayer):
    """[Gaussian_yolo]: per anchor x, σx, y, σy, w, σw, h, σh, objectness, classes. Decoded output is the usual
    (cx, cy, w, h, obj, classes) with obj scaled by (1 - mean σ), as Darknet scores its detections. Raw maps
    keep the 5+C YOLO entries (means, objectness, classes), so training treats it as a [yolo] head."""

    _MEANS = (0, 2, 4, 6)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        return self.full(x)[..., [0, 2, 4, 6, *range(8, 9 + self.classes)]]

    def full(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        return x.view(n, self.num_anchors, self.classes + 9, h, w).permute(0, 1, 3, 4, 2).contiguous()

    def forward(self, x: torch.Tensor, img_hw: tuple[int, int], raw: bool) -> torch.Tensor:
        if raw:
            return self.raw(x)
        p = self.full(x)
        sigma = torch.sigmoid(p[..., [1, 3, 5, 7]]).mean(-1, keepdim=True)
        out = self.decode(self.raw(x), img_hw).view(*p.shape[:4], self.classes + 5)
        out = torch.cat((out[..., :4], out[..., 4:5] * (1 - sigma), out[..., 5:]), -1)
        return out.view(p.shape[0], -1, self.classes + 5)


class ASFFYOLOLayer(YOLOLayer):
    """The reference project's ASFF [yolo] (from=L0,L1,L2): head k reads level k; the last n channels of each level
    are fusion logits, w = sigmoid(logits of level k) * 2/n; p = Σ_j w_j * bilinear-resize(level j[:, :-n])."""

    def __init__(self, block: Block, index: int) -> None:
        super().__init__(block)
        self.index = index
        self.levels = len(block.get_ints("from"))

    def fuse(self, xs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        n, own = self.levels, xs[self.index]
        w = torch.sigmoid(own[:, -n:]) * (2 / n)
        p = own[:, :-n] * w[:, self.index:self.index + 1]
        for j, level in enumerate(xs):
            if j != self.index:
                p = p + w[:, j:j + 1] * F.interpolate(level[:, :-n], size=own.shape[2:], mode="bilinear",
                                                      align_corners=False)
        return p

    def forward(self, *args):
        *xs, img_hw, raw = args
        p = self.raw(self.fuse(tuple(xs)))
        return p if raw else self.decode(p, img_hw)


_ = _grid_and_stride  # shared grid helper lives in layers.py
