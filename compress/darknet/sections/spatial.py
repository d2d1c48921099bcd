"""Sections that move pixels, not channels: pooling, upsampling, reorg, dropout."""
from __future__ import annotations

from typing import Any, Sequence

from compress.base.errors import CfgError
from compress.darknet.block import Block
from compress.darknet.extra_layers import LocalAvgPool, Reorg
from compress.darknet.geometry import maxpool_geometry, strides
from compress.darknet.layers import Dropout, GlobalAvgPool, MaxPool, Upsample
from compress.darknet.sections.base import Ctx, FlowOps, Key, Section, Shape, _flow_fixed, quant_keep, register

__all__ = ["maxpool_geometry"]

_POOL_KEYS = (Key("size", min=1), Key("stride", min=1), Key("stride_x", min=1), Key("stride_y", min=1),
              Key("padding", min=0))


def _depth(block: Block) -> bool:
    return block.type == "maxpool" and bool(block.get_int("maxpool_depth", 0))


def _pool_shape(block: Block, ins: list[Shape], c: int, ctx: Ctx) -> Shape:
    _, h, w = ins[0]
    if _depth(block):
        return c, h, w
    size, s, p = maxpool_geometry(block)
    sy, sx = strides(block)
    oh, ow = (h + p - size) // sy + 1, (w + p - size) // sx + 1
    if oh < 1 or ow < 1:
        raise CfgError(f"{block.where('size')}: [{block.type}] size={size} stride={s} leaves nothing of its "
                       f"{h}x{w} input; use a smaller size or a larger input")
    return c, oh, ow


def _feeds_spp(blocks: Sequence[Block], i: int) -> bool:
    """Reference rule 4: a [maxpool] followed by a [route] is SPP; the conv feeding it is not pruned."""
    return i + 1 < len(blocks) and blocks[i + 1].type == "route"


def _pool_flow(block: Block, i: int, ins: list, ops: FlowOps) -> Any:
    return _flow_fixed(block, i, ins, ops) if _depth(block) else ins[0]


def _build_maxpool(block: Block, ins: list[int], ctx: Ctx) -> Any:
    return MaxPool(block, zero_pad=ctx.dialect == "reference")


def _build_local_avg(block: Block, ins: list[int], ctx: Ctx) -> Any:
    return LocalAvgPool(block)


register(Section(
    "maxpool", "max pooling with Darknet's padding (size-1, split top-left first; the reference dialect zero-pads "
    "size=2 stride=1); maxpool_depth=1 pools channels",
    _build_maxpool, keys=_POOL_KEYS + (Key("out_channels", min=1), Key("maxpool_depth", min=0, max=1)),
    channels=lambda b, ins, ctx: b.get_int("out_channels", 1) if _depth(b) else ins[0],
    shape=_pool_shape, flow=_pool_flow, quant=quant_keep, guards_producer=_feeds_spp, aliases=("max",),
    pruning="passes channels through; maxpool_depth: input stays whole"))

register(Section(
    "local_avgpool", "average pooling over a window, Darknet padding, out-of-image taps not counted",
    _build_local_avg, keys=_POOL_KEYS, shape=_pool_shape, aliases=("local_avg",)))


def _build_avgpool(block: Block, ins: list[int], ctx: Ctx) -> Any:
    return GlobalAvgPool()


register(Section(
    "avgpool", "global average pooling to 1x1", _build_avgpool,
    shape=lambda b, ins, c, ctx: (c, 1, 1), aliases=("avg",)))


def _build_upsample(block: Block, ins: list[int], ctx: Ctx) -> Any:
    return Upsample(block)


register(Section(
    "upsample", "nearest-neighbour upsampling by stride=, output times scale=", _build_upsample,
    keys=(Key("stride", min=1), Key("scale", "float")),
    shape=lambda b, ins, c, ctx: (c, ins[0][1] * b.get_int("stride", 2), ins[0][2] * b.get_int("stride", 2)),
    quant=quant_keep, guards_producer=lambda blocks, i: True))


def _build_dropout(block: Block, ins: list[int], ctx: Ctx) -> Any:
    return Dropout(block)


register(Section(
    "dropout", "dropout while training, identity at inference", _build_dropout,
    keys=(Key("probability", "float", min=0, max=1),), unit_passenger=True, inference_identity=True))


# --- [reorg] (YOLOv2, Darknet's reorg_old) and [reorg3d] (space-to-depth) ---------------------------------------

def _reorg_identity(block: Block, ctx: Ctx) -> bool:
    """The reference project builds [reorg3d] as an empty module: channels and size pass through."""
    return block.type == "reorg3d" and ctx.dialect == "reference"


def _reorg_channels(block: Block, ins: list[int], ctx: Ctx) -> int:
    if _reorg_identity(block, ctx):
        return ins[0]
    s2 = block.get_int("stride", 1) ** 2
    if block.get_int("reverse", 0):
        if ins[0] % s2:
            raise CfgError(f"{block.where()}: [{block.type}] reverse=1 needs channels divisible by stride^2={s2} "
                           f"(got {ins[0]})")
        return ins[0] // s2
    return ins[0] * s2


def _reorg_shape(block: Block, ins: list[Shape], c: int, ctx: Ctx) -> Shape:
    _, h, w = ins[0]
    if _reorg_identity(block, ctx):
        return c, h, w
    s = block.get_int("stride", 1)
    if block.get_int("reverse", 0):
        return c, h * s, w * s
    if h % s or w % s:
        raise CfgError(f"{block.where()}: [{block.type}] stride={s} needs an input size divisible by {s} "
                       f"(got {h}x{w}); use an input size that is a multiple of the network stride")
    return c, h // s, w // s


def _build_reorg(block: Block, ins: list[int], ctx: Ctx) -> Any:
    return Reorg(block, identity=_reorg_identity(block, ctx), old=block.type == "reorg")


def _reorg_flow(block: Block, i: int, ins: list, ops: FlowOps) -> Any:
    return _flow_fixed(block, i, ins, ops) if block.get_int("stride", 1) > 1 else ins[0]


_REORG_KEYS = (Key("stride", min=1), Key("reverse", min=0, max=1))
register(Section(
    "reorg", "YOLOv2 passthrough: Darknet's reorg_old (stride^2 x channels, size / stride)", _build_reorg,
    keys=_REORG_KEYS, channels=_reorg_channels, shape=_reorg_shape, flow=_reorg_flow, pruning="input stays whole"))
register(Section(
    "reorg3d", "space-to-depth (stride^2 x channels, size / stride); the reference dialect passes it through",
    _build_reorg, keys=_REORG_KEYS, channels=_reorg_channels, shape=_reorg_shape, flow=_reorg_flow,
    pruning="input stays whole"))
