"""Channel-attention sections on the previous layer: [se], [cbam], [eca] (weights sized by the channel count)."""
from __future__ import annotations

from typing import Any

from compress.base.errors import CfgError
from compress.darknet.block import Block
from compress.darknet.layers import CBAM, ECA, SE
from compress.darknet.sections.base import Ctx, FlowOps, Key, Section, register

__all__ = ["se_hidden"]


def se_hidden(block: Block, channels: int, ctx: Ctx) -> int:
    """Hidden width of the SE/CBAM MLP. Ours: max(1, C // reduction), reduction 16. The reference dialect
    (its `SE` module): C // reduction with reduction 4, `filters=` naming C."""
    if ctx.dialect == "reference" and block.type == "se":
        return channels // block.get_int("reduction", 4)
    return max(1, channels // block.get_int("reduction", 16))


def _se_channels(block: Block, ins: list[int], ctx: Ctx) -> int:
    if block.has("filters") and block.get_int("filters") != ins[0]:
        raise CfgError(f"{block.where('filters')}: [{block.type}] filters={block.get_int('filters')} but the "
                       f"previous layer gives {ins[0]} channels; set filters={ins[0]}")
    if se_hidden(block, ins[0], ctx) < 1:
        raise CfgError(f"{block.where()}: [{block.type}] reduction={block.get_int('reduction', 4)} leaves no hidden "
                       f"unit for {ins[0]} channels; use a smaller reduction")
    return ins[0]


def _keep_inputs(block: Block, i: int, ins: list, ops: FlowOps) -> Any:
    ops.opaque(ins[0], block)  # the MLP/1-D conv mixes channels: cutting one changes the others' gates
    return ins[0]


def _weights_macs(block: Block, module: Any, ins: list, out: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def _build_se(block: Block, ins: list[int], ctx: Ctx) -> Any:
    gate = "hard_sigmoid" if ctx.dialect == "reference" else "sigmoid"
    return SE(block, ins[0], hidden=se_hidden(block, ins[0], ctx), gate=gate)


def _build_cbam(block: Block, ins: list[int], ctx: Ctx) -> Any:
    return CBAM(block, ins[0])


def _build_eca(block: Block, ins: list[int], ctx: Ctx) -> Any:
    return ECA(block)


_RESIZE_SE = lambda b, kept: b.replace(filters=kept) if b.has("filters") else b  # noqa: E731

register(Section(
    "se", "squeeze-excitation: reduction= (ours: 16, sigmoid gate); the reference dialect's filters=/reduction= "
    "(4, hard-sigmoid gate)", _build_se, keys=(Key("reduction", min=1), Key("filters", min=1)),
    channels=_se_channels, flow=_keep_inputs, macs=_weights_macs,
    params=lambda b, ins, c, ctx: 2 * c * se_hidden(b, c, ctx), resize=_RESIZE_SE,
    unit_passenger=True, dialects=("yolo-compress", "reference"),
    weights="fc1, fc2 (no bias)", pruning="input stays whole (the MLP mixes channels)"))

register(Section(
    "cbam", "channel then spatial attention: reduction=16, kernel=7", _build_cbam,
    keys=(Key("reduction", min=1), Key("kernel", min=1)), channels=_se_channels, flow=_keep_inputs,
    macs=_weights_macs, unit_passenger=True, dialects=("yolo-compress",),
    params=lambda b, ins, c, ctx: 2 * c * se_hidden(b, c, ctx) + 2 * b.get_int("kernel", 7) ** 2,
    weights="fc1, fc2, spatial conv (no bias)", pruning="input stays whole"))

register(Section(
    "eca", "efficient channel attention: a 1-D conv of size= across channels", _build_eca,
    keys=(Key("size", min=1),), flow=_keep_inputs, macs=_weights_macs, unit_passenger=True,
    dialects=("yolo-compress",),
    params=lambda b, ins, c, ctx: b.get_int("size", 3), weights="the 1-D kernel", pruning="input stays whole"))
