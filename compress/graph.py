"""Static layer graph of a cfg: who feeds whom, channel counts and spatial sizes. No torch import.

Darknet's relative indices (`from=-3`, `layers=-1,61`) are resolved to absolute block indices here,
once; every other module (builder, pruning, layer removal, distillation) asks this graph instead of
hard-coding layer numbers. Index -1 in `inputs` means the network input image.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from .cfg import Block, Cfg
from .errors import CfgError

__all__ = ["LayerGraph", "build_graph", "conv_geometry", "maxpool_geometry"]


def conv_geometry(block: Block) -> tuple[int, int, int]:
    """(kernel, stride, padding) of a [convolutional] block, as Darknet computes them."""
    size = block.get_int("size", 1)
    stride = block.get_int("stride", 1)
    pad = block.get_int("padding", 0)
    if block.get_int("pad", 0):
        pad = size // 2
    return size, stride, pad


def maxpool_geometry(block: Block) -> tuple[int, int, int]:
    """(size, stride, total padding) of a [maxpool]; Darknet pads `size-1` in total by default."""
    stride = block.get_int("stride", 1)
    size = block.get_int("size", stride)
    padding = block.get_int("padding", size - 1)
    return size, stride, padding


@dataclass(frozen=True)
class LayerGraph:
    cfg: Cfg
    inputs: tuple[tuple[int, ...], ...]   # absolute producer indices per block (-1 = image)
    channels: tuple[int, ...]              # output channels per block

    @cached_property
    def consumers(self) -> tuple[tuple[int, ...], ...]:
        out: list[list[int]] = [[] for _ in self.inputs]
        for j, ins in enumerate(self.inputs):
            for i in ins:
                if i >= 0 and j not in out[i]:
                    out[i].append(j)
        return tuple(tuple(c) for c in out)

    @cached_property
    def heads(self) -> tuple[int, ...]:
        return tuple(i for i, b in enumerate(self.cfg.blocks) if b.type in ("yolo", "region"))

    @cached_property
    def kept_outputs(self) -> frozenset[int]:
        """Blocks whose output is read by a block other than the next one (forward must store them)."""
        return frozenset(s for j, ins in enumerate(self.inputs) for s in ins if 0 <= s != j - 1)

    def in_channels(self, i: int) -> int:
        src = self.inputs[i][0]
        return self.cfg.channels if src < 0 else self.channels[src]

    def block(self, i: int) -> Block:
        return self.cfg.blocks[i]

    def shapes(self, height: int | None = None, width: int | None = None) -> list[tuple[int, int, int]]:
        """(C, H, W) of every block's output for an input of height x width (default: the cfg's)."""
        h0 = height or self.cfg.height
        w0 = width or self.cfg.width
        out: list[tuple[int, int, int]] = []
        for i, block in enumerate(self.cfg.blocks):
            ins = [(self.cfg.channels, h0, w0) if s < 0 else out[s] for s in self.inputs[i]]
            out.append(_block_shape(block, ins, self.channels[i]))
        return out


def _block_shape(block: Block, ins: list[tuple[int, int, int]], c: int) -> tuple[int, int, int]:
    _, h, w = ins[0]
    t = block.type
    if t == "convolutional":
        k, s, p = conv_geometry(block)
        return c, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    if t == "maxpool":
        size, s, p = maxpool_geometry(block)
        return c, (h + p - size) // s + 1, (w + p - size) // s + 1
    if t == "upsample":
        s = block.get_int("stride", 2)
        return c, h * s, w * s
    if t == "avgpool":
        return c, 1, 1
    if t == "scale_channels":
        return ins[1]
    return c, h, w


def _abs_index(block: Block, i: int, ref: int, key: str, n_blocks: int) -> int:
    j = i + ref if ref < 0 else ref
    if j < 0 or j >= i:
        raise CfgError(f"{block.where()}: [{block.type}] {key}={ref} points to layer {j}, but layer {i} can only "
                       f"read layers 0..{i - 1}; fix the index")
    return j


def _resolve(block: Block, i: int, channels: list[int], in_c: int, n: int) -> tuple[tuple[int, ...], int]:
    t = block.type
    prev = i - 1
    if t == "route":
        layers = block.get_ints("layers")
        if not layers:
            raise CfgError(f"{block.where()}: [route] needs at least one index in layers=")
        srcs = tuple(_abs_index(block, i, r, "layers", n) for r in layers)
        groups = block.get_int("groups", 1)
        group_id = block.get_int("group_id", 0)
        if groups < 1 or not 0 <= group_id < groups:
            raise CfgError(f"{block.where()}: [route] group_id={group_id} must be in 0..groups-1 (groups={groups})")
        for s in srcs:
            if channels[s] % groups:
                raise CfgError(f"{block.where()}: [route] layer {s} has {channels[s]} channels, not divisible "
                               f"by groups={groups}")
        return srcs, sum(channels[s] // groups for s in srcs)
    if t in ("shortcut", "scale_channels", "sam"):
        refs = block.get_ints("from")
        if len(refs) != 1:
            raise CfgError(f"{block.where()}: [{t}] from= must name exactly one layer (got {len(refs)})")
        src = _abs_index(block, i, refs[0], "from", n)
        if prev < 0:
            raise CfgError(f"{block.where()}: [{t}] cannot be the first layer")
        if t == "shortcut" and channels[src] != in_c:
            raise CfgError(f"{block.where()}: [shortcut] adds layer {src} ({channels[src]} channels) to layer "
                           f"{prev} ({in_c} channels); channel counts must match")
        if t == "scale_channels":
            return (prev, src), channels[src]
        return (prev, src), in_c
    if t == "convolutional":
        filters = block.get_int("filters", 1)
        groups = block.get_int("groups", 1)
        if filters < 1 or groups < 1 or in_c % groups or filters % groups:
            raise CfgError(f"{block.where()}: [convolutional] filters={filters}, groups={groups} do not divide "
                           f"its {in_c} input channels; fix filters/groups")
        return (prev,), filters
    if t == "maxpool" and block.get_int("maxpool_depth", 0):
        return (prev,), block.get_int("out_channels", 1)
    return (prev,), in_c


def build_graph(cfg: Cfg) -> LayerGraph:
    inputs: list[tuple[int, ...]] = []
    channels: list[int] = []
    n = len(cfg.blocks)
    for i, block in enumerate(cfg.blocks):
        in_c = cfg.channels if i == 0 else channels[i - 1]
        srcs, c = _resolve(block, i, channels, in_c, n)
        inputs.append(srcs)
        channels.append(c)
    for i, block in enumerate(cfg.blocks):
        if block.type == "yolo":
            b = block
            need = len(b.get_ints("mask", tuple(range(len(b.get_floats("anchors", ())) // 2)))) * (b.get_int("classes", 20) + 5)
            if channels[i] != need:
                raise CfgError(f"{b.where()}: [yolo] expects {need} input channels (len(mask) x (classes+5)) but "
                               f"layer {i - 1} gives {channels[i]}; set filters={need} in the conv before it")
    return LayerGraph(cfg, tuple(inputs), tuple(channels))
