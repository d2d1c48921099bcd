"""Sections that read other layers: [route], [shortcut], [scale_channels], [sam]."""
from __future__ import annotations

from typing import Any

from compress.base.errors import CfgError
from compress.darknet.block import Block
from compress.darknet.layers import SAM, Route, ScaleChannels, Shortcut
from compress.darknet.sections.base import Ctx, FlowOps, Key, Section, Shape, quant_join, register, resolve_refs

__all__ = ["weights_type"]

WEIGHTS_TYPES = ("none", "per_feature", "per_layer", "per_channel")
WEIGHTS_NORMS = ("none", "relu", "avg_relu", "softmax")


def _same_hw(block: Block, ins: list[Shape], names: list[str]) -> None:
    for shape, name in zip(ins[1:], names[1:]):
        if shape[1:] != ins[0][1:]:
            raise CfgError(f"{block.where()}: [{block.type}] joins {names[0]} ({ins[0][1]}x{ins[0][2]}) with {name} "
                           f"({shape[1]}x{shape[2]}); their sizes differ at this input size (use an input size that "
                           "is a multiple of the network stride, or fix the layer indices)")


# --- [route] ----------------------------------------------------------------------------------------------------

def _route_groups(block: Block) -> tuple[int, int]:
    groups, gid = block.get_int("groups", 1), block.get_int("group_id", 0)
    if groups < 1 or not 0 <= gid < groups:
        raise CfgError(f"{block.where()}: [route] group_id={gid} must be in 0..groups-1 (groups={groups})")
    return groups, gid


def _route_channels(block: Block, ins: list[int], ctx: Ctx) -> int:
    groups, _ = _route_groups(block)
    for c in ins:
        if c % groups:
            raise CfgError(f"{block.where()}: [route] an input has {c} channels, not divisible by groups={groups}")
    return sum(c // groups for c in ins)


def _route_shape(block: Block, ins: list[Shape], c: int, ctx: Ctx) -> Shape:
    _same_hw(block, ins, [f"input {k}" for k in range(len(ins))])
    return c, ins[0][1], ins[0][2]


def _route_flow(block: Block, i: int, ins: list, ops: FlowOps) -> Any:
    groups, gid = _route_groups(block)
    if groups == 1:
        return ops.cat(ins)
    for v in ins:  # the CSP split takes half of each input: those producers stay whole (reference rule 5)
        ops.keep_whole(v)
    return ops.cat([ops.part(v, groups, gid) for v in ins])


def _build_route(block: Block, ins: list[int], ctx: Ctx) -> Any:
    return Route(block)


register(Section(
    "route", "concatenate layers (layers=), optionally one of `groups` channel slices (group_id=)",
    _build_route, keys=(Key("groups", min=1), Key("group_id", min=0)), refs=("layers",), reads_previous=False,
    channels=_route_channels, shape=_route_shape, flow=_route_flow, quant=quant_join,
    pruning="concatenates its inputs' channels; with groups= its inputs stay whole"))


# --- [shortcut] -------------------------------------------------------------------------------------------------

def weights_type(block: Block) -> str:
    """[shortcut] weights_type=: none, per_feature, per_layer or per_channel (read here only)."""
    return (block.get("weights_type", "none") or "none").lower()


def _shortcut_shape(block: Block, ins: list[Shape], c: int, ctx: Ctx) -> Shape:
    # name the layers by their absolute index, as the cfg's reader counts them (from=0 is layer 0)
    refs = resolve_refs(block, ctx.index, "from")
    _same_hw(block, ins, ["the previous layer"] + [f"from layer {j}" for j in refs])
    return c, ins[0][1], ins[0][2]


def _shortcut_flow(block: Block, i: int, ins: list, ops: FlowOps) -> Any:
    if weights_type(block) != "none":
        for v in ins:  # per-channel weights are sized by the channel count
            ops.opaque(v, block)
        return ops.fresh(i)
    out = ins[0]
    for other in ins[1:]:
        out = ops.add(out, other)
    return ops.act(out, block)  # Darknet activates the sum: act(a + b), not act(a) + b


def _plain_add(block: Block) -> bool:
    """Removing the residual branch leaves exactly the identity only for an unweighted, linear add."""
    activation = (block.get("activation", "linear") or "linear").lower()
    return weights_type(block) == "none" and activation in ("linear", "none")


def _shortcut_params(block: Block, ins: list[int], c: int, ctx: Ctx) -> int:
    kind = weights_type(block)
    return 0 if kind == "none" else len(ins) * (c if kind == "per_channel" else 1)


def _build_shortcut(block: Block, ins: list[int], ctx: Ctx) -> Any:
    return Shortcut(block, ins, weights_type(block))


register(Section(
    "shortcut", "add layers (from=) to the previous one; unequal channels add where they overlap (Darknet); "
    "weights_type=per_feature|per_channel with weights_normalization=none|relu|softmax",
    _build_shortcut, keys=(Key("weights_type", "str", choices=WEIGHTS_TYPES),
                           Key("weights_normalization", "str", choices=WEIGHTS_NORMS)),
    refs=("from",), shape=_shortcut_shape, flow=_shortcut_flow, params=_shortcut_params, quant=quant_join,
    residual=_plain_add,
    pruning="ties its inputs channel by channel where they overlap (a removed channel's constant goes through "
            "its activation); weighted: inputs stay whole; only a linear unweighted one closes a removable block",
    weights="weights_type: one weight per input (per_feature) or per input and channel (per_channel)"))


# --- [scale_channels], [sam] ------------------------------------------------------------------------------------

def _one_from(block: Block, i: int) -> tuple[int, ...]:
    refs = resolve_refs(block, i, "from")
    if len(refs) != 1:
        raise CfgError(f"{block.where()}: [{block.type}] from= must name exactly one layer (got {len(refs)})")
    if i == 0:
        raise CfgError(f"{block.where()}: [{block.type}] cannot be the first layer")
    return i - 1, refs[0]


def _attention_channels(block: Block, ins: list[int], ctx: Ctx) -> int:
    """[scale_channels]/[sam] multiply two tensors channel by channel: their channel counts must agree."""
    if ins[0] != ins[1]:
        raise CfgError(f"{block.where()}: [{block.type}] multiplies the previous layer ({ins[0]} channels) with "
                       f"layer from= ({ins[1]} channels); they must have the same channels")
    return ins[1] if block.type == "scale_channels" else ins[0]


def _sam_shape(block: Block, ins: list[Shape], c: int, ctx: Ctx) -> Shape:
    _same_hw(block, ins, ["the previous layer", "layer from="])
    return c, ins[0][1], ins[0][2]


def _attention_flow(block: Block, i: int, ins: list, ops: FlowOps) -> Any:
    for v in ins:
        ops.opaque(v, block)
    return ins[1] if block.type == "scale_channels" else ins[0]


def _build_scale(block: Block, ins: list[int], ctx: Ctx) -> Any:
    return ScaleChannels()


def _build_sam(block: Block, ins: list[int], ctx: Ctx) -> Any:
    return SAM()


register(Section(
    "scale_channels", "multiply layer from= by the previous layer's (N,C,1,1) attention vector",
    _build_scale, refs=("from",), inputs=_one_from, channels=_attention_channels,
    shape=lambda b, ins, c, ctx: ins[1], flow=_attention_flow, pruning="inputs stay whole"))

register(Section(
    "sam", "spatial attention: layer from= times the previous layer",
    _build_sam, refs=("from",), inputs=_one_from, channels=_attention_channels, shape=_sam_shape,
    flow=_attention_flow, pruning="inputs stay whole"))
