"""Static layer graph of a cfg: who feeds whom, channel counts and spatial sizes (no tensors).

Darknet's relative indices (`from=-3`, `layers=-1,61`) are resolved to absolute block indices here,
once; every other module (builder, pruning, layer removal, distillation) asks this graph instead of
hard-coding layer numbers. Index -1 in `inputs` means the network input image. What each section
reads, outputs and checks comes from the section table (`compress.darknet.sections`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from compress.darknet.cfg import Block, Cfg
from compress.base.errors import CfgError
from compress.darknet.sections import Ctx, Section, block_inputs, check_keys, conv_geometry, lookup, maxpool_geometry

__all__ = ["LayerGraph", "build_graph", "conv_geometry", "maxpool_geometry"]


@dataclass(frozen=True)
class LayerGraph:
    cfg: Cfg
    inputs: tuple[tuple[int, ...], ...]   # absolute producer indices per block (-1 = image)
    channels: tuple[int, ...]              # output channels per block

    @cached_property
    def sections(self) -> tuple[Section, ...]:
        return tuple(lookup(b) for b in self.cfg.blocks)

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
        return tuple(i for i, s in enumerate(self.sections) if s.head)

    @cached_property
    def kept_outputs(self) -> frozenset[int]:
        """Blocks whose output is read by a block other than the next one (forward must store them)."""
        return frozenset(s for j, ins in enumerate(self.inputs) for s in ins if 0 <= s != j - 1)

    def ctx(self, i: int) -> Ctx:
        return Ctx(i, self.cfg.dialect, self.cfg.channels, sum(1 for h in self.heads if h < i))

    def in_channels(self, i: int) -> int:
        src = self.inputs[i][0]
        return self.cfg.channels if src < 0 else self.channels[src]

    def input_channels(self, i: int) -> list[int]:
        return [self.cfg.channels if s < 0 else self.channels[s] for s in self.inputs[i]]

    def block(self, i: int) -> Block:
        return self.cfg.blocks[i]

    def shapes(self, height: int | None = None, width: int | None = None) -> list[tuple[int, int, int]]:
        """(C, H, W) of every block's output for an input of height x width (default: the cfg's). Raises CfgError
        naming the block when that size cannot flow through (a route joining 8x8 to 7x7, an empty output)."""
        h0 = height or self.cfg.height
        w0 = width or self.cfg.width
        if h0 < 1 or w0 < 1:
            raise CfgError(f"{self.cfg.net.where()}: input size {h0}x{w0} must be positive")
        out: list[tuple[int, int, int]] = []
        for i, (block, section) in enumerate(zip(self.cfg.blocks, self.sections)):
            ins = [(self.cfg.channels, h0, w0) if s < 0 else out[s] for s in self.inputs[i]]
            out.append(section.shape(block, ins, self.channels[i], self.ctx(i)))
        return out


def build_graph(cfg: Cfg) -> LayerGraph:
    """Resolve every block's inputs and output channels, checking keys and channel arithmetic (file:line)."""
    inputs: list[tuple[int, ...]] = []
    channels: list[int] = []
    heads = 0
    for i, block in enumerate(cfg.blocks):
        section = lookup(block)
        check_keys(block, section)
        srcs = block_inputs(block, section, i)
        ins = [cfg.channels if s < 0 else channels[s] for s in srcs]
        ctx = Ctx(i, cfg.dialect, cfg.channels, heads)
        inputs.append(srcs)
        channels.append(section.channels(block, ins, ctx))
        heads += section.head
    return LayerGraph(cfg, tuple(inputs), tuple(channels))
