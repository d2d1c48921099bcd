"""How Darknet reads a block's compound keys: conv and pool windows, strides, anchors and masks. No torch import.

Both the section table (channels, shapes, FLOPs, parse checks) and the torch modules (`layers.py`,
`extra_layers.py`) need these readings; they live here, below both, so the modules never import the table
that builds them.
"""
from __future__ import annotations

import re

from compress.base.errors import CfgError
from compress.darknet.block import Block

__all__ = ["strides", "conv_geometry", "maxpool_geometry", "anchor_values", "anchor_count", "yolo_anchors",
           "yolo_mask"]

_NUMBER = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def strides(block: Block) -> tuple[int, int]:
    """(stride_y, stride_x): Darknet's stride_x=/stride_y= override stride= for convs and pools."""
    stride = block.get_int("stride", 1)
    return block.get_int("stride_y", stride), block.get_int("stride_x", stride)


def conv_geometry(block: Block) -> tuple[int, int, int]:
    """(kernel, stride, padding) of a conv block, as Darknet computes them (`pad=1` means size/2)."""
    size = block.get_int("size", 1)
    stride = block.get_int("stride", 1)
    pad = block.get_int("padding", 0)
    if block.get_int("pad", 0):
        pad = size // 2
    return size, stride, pad


def maxpool_geometry(block: Block) -> tuple[int, int, int]:
    """(size, stride, total padding) of a [maxpool]/[local_avgpool]; Darknet pads `size-1` in total by default."""
    stride = block.get_int("stride", 1)
    size = block.get_int("size", stride)
    padding = block.get_int("padding", size - 1)
    return size, stride, padding


def anchor_values(block: Block) -> list[float]:
    """The numbers of `anchors=` (Darknet's atof on each comma-separated item; empty items skipped)."""
    raw = block.get("anchors")
    if raw is None:
        return []
    out = []
    for item in raw.split(","):
        if not item.strip():
            continue
        m = _NUMBER.match(item)
        if m is None:
            raise CfgError(f"{block.where('anchors')}: [{block.type}] anchors={raw!r} is not a comma-separated list "
                           "of numbers; fix the value in the cfg")
        out.append(float(m.group(0)))
    return out


def anchor_count(block: Block, values: list[float]) -> int:
    """`num=`: the number of anchor pairs; defaults to the listed pairs (at least 1)."""
    return block.get_int("num", max(1, len(values) // 2)) if block.has("num") or values else 1


def yolo_anchors(block: Block) -> list[tuple[float, float]]:
    """All `num` anchor pairs (w, h) in pixels; pairs beyond the listed ones are (0.5, 0.5) like Darknet (its
    biases start at .5). A `mask=` index past `num` gets (0.5, 0.5) too: Darknet runs such a cfg, reading that
    default for it (`check_yolo_block` warns), so the list reaches the largest mask index."""
    values = anchor_values(block)
    total = anchor_count(block, values)
    total = max([total, *(m + 1 for m in yolo_mask(block))])   # without mask=: every anchor, no change
    values = (values + [0.5] * (2 * total))[:2 * total]
    return [(values[2 * k], values[2 * k + 1]) for k in range(total)]


def yolo_mask(block: Block) -> tuple[int, ...]:
    """`mask=`: the anchors a head predicts with (default: all of them)."""
    return block.get_ints("mask", tuple(range(anchor_count(block, anchor_values(block)))))
