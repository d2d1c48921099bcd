"""[convolutional] (Darknet) and [depthwise] (the reference project's dialect)."""
from __future__ import annotations

from typing import Any

import torch

from compress.base.errors import CfgError
from compress.darknet.block import Block
from compress.darknet.geometry import conv_geometry, strides
from compress.darknet.layers import ConvBNAct
from compress.darknet.sections.base import Ctx, FlowOps, Key, Section, Shape, register

__all__ = ["conv_geometry", "conv_groups", "is_depthwise"]

_CONV_KEYS = (Key("filters", min=1), Key("size", min=1), Key("stride", min=1), Key("stride_x", min=1),
              Key("stride_y", min=1), Key("pad", min=0), Key("padding", min=0), Key("groups", min=1),
              Key("dilation", min=1), Key("batch_normalize", min=0, max=1))


def conv_groups(block: Block, in_channels: int) -> int:
    """[depthwise] is grouped by its input channels; [convolutional] by `groups=`."""
    return in_channels if block.type == "depthwise" else block.get_int("groups", 1)


def is_depthwise(block: Block, in_channels: int) -> bool:
    """One filter per input channel: output channel j reads only input channel j."""
    return conv_groups(block, in_channels) == in_channels == block.get_int("filters", 1) and in_channels > 1


def _channels(block: Block, ins: list[int], ctx: Ctx) -> int:
    filters, c = block.get_int("filters", 1), ins[0]
    groups = conv_groups(block, c)
    if c % groups or filters % groups:
        what = "a multiple of its" if block.type == "depthwise" else f"divisible by groups={groups}, like its"
        raise CfgError(f"{block.where('filters')}: [{block.type}] filters={filters} must be {what} {c} input "
                       f"channels; fix filters/groups")
    return filters


def _shape(block: Block, ins: list[Shape], c: int, ctx: Ctx) -> Shape:
    k, s, p = conv_geometry(block)
    (sy, sx), (_, h, w) = strides(block), ins[0]
    oh, ow = (h + 2 * p - k) // sy + 1, (w + 2 * p - k) // sx + 1
    if oh < 1 or ow < 1:
        raise CfgError(f"{block.where('size')}: [{block.type}] size={k} stride={s} pad={p} leaves nothing of its "
                       f"{h}x{w} input; use a smaller size or a larger input")
    return c, oh, ow


def _build(block: Block, ins: list[int], ctx: Ctx) -> Any:
    return ConvBNAct(block, ins[0], groups=conv_groups(block, ins[0]))


@torch.no_grad()
def _copy_pruned(dst: ConvBNAct, src: ConvBNAct, out_idx: torch.Tensor | None, in_keep: torch.Tensor | None,
                 offset: torch.Tensor | None) -> None:
    """Rows `out_idx` of the kernel and BN (or bias); input columns where `in_keep` (a grouped conv has none to
    cut: it is cut with its producer); `offset` subtracted from the BN running mean (added to a plain bias)."""
    cut_inputs = in_keep is not None and src.conv.groups == 1 and not bool(in_keep.all())
    in_idx = in_keep.nonzero().flatten() if cut_inputs else None
    w = src.conv.weight
    w = w if out_idx is None else w[out_idx.to(w.device)]
    w = w if in_idx is None else w[:, in_idx.to(w.device)]
    dst.conv.weight.copy_(w)
    if src.bn is None:
        bias = src.conv.bias + (0 if offset is None else offset.to(src.conv.bias))
        dst.conv.bias.copy_(bias if out_idx is None else bias[out_idx.to(bias.device)])
        return
    state = dict(src.bn.state_dict())
    if offset is not None:
        state["running_mean"] = state["running_mean"] - offset.to(state["running_mean"])
    for k, v in state.items():
        if v.dim() and out_idx is not None:
            state[k] = v[out_idx.to(v.device)]
    dst.bn.load_state_dict(state)


def _shared(block: Block, i: int) -> int | None:
    """Darknet's share_index: the layer whose weights this conv uses (it stores none of its own)."""
    if not block.has("share_index"):
        return None
    ref = block.get_int("share_index")
    j = i + ref if ref < 0 else ref
    if not 0 <= j < i:
        raise CfgError(f"{block.where('share_index')}: [{block.type}] share_index={ref} points to layer {j}; "
                       f"it must name an earlier conv (0..{i - 1})")
    return j


def _bind(block: Block, i: int, graph: Any, layers: Any) -> None:
    j = _shared(block, i)
    if j is None:
        return
    src = layers[j]
    if not graph.sections[j].conv or src.conv.weight.shape != layers[i].conv.weight.shape:
        raise CfgError(f"{block.where('share_index')}: [{block.type}] share_index names layer {j}, which is not "
                       "a conv of the same shape; share weights only between identical convs")
    layers[i].share(src)


def _flow(block: Block, i: int, ins: list, ops: FlowOps) -> Any:
    own = ops.own(i)
    bn = block.get_int("batch_normalize", 0)
    shared = _shared(block, i)
    if shared is not None:
        for v in (ins[0], own, ops.own(shared)):   # one set of weights serves two places: keep them whole
            ops.keep_whole(v)
    elif is_depthwise(block, len(ins[0])) and bn:
        ops.tie(own, ins[0])            # pruned together with its producer
    elif conv_groups(block, len(ins[0])) > 1:
        ops.keep_whole(ins[0])          # other grouped convs: inputs and outputs stay whole
        ops.keep_whole(own)
    elif not bn:
        ops.keep_whole(own)             # head / attention logits: no gamma to rank
    return own


def _macs(block: Block, module: Any, ins: list[Shape], out: Shape) -> int:
    k, _, _ = conv_geometry(block)
    c, oh, ow = out
    return k * k * ins[0][0] // conv_groups(block, ins[0][0]) * c * oh * ow


def _params(block: Block, ins: list[int], c: int, ctx: Ctx) -> int:
    if block.has("share_index"):
        return 0
    k = block.get_int("size", 1)
    extra = 4 * c if block.get_int("batch_normalize", 0) else c
    return extra + c * (ins[0] // max(1, conv_groups(block, ins[0]))) * k * k


def _resize(block: Block, kept_out: int) -> Block:
    if block.type == "convolutional" and block.get_int("groups", 1) == block.get_int("filters", 1) > 1:
        return block.replace(filters=kept_out, groups=kept_out)   # a depthwise conv keeps groups == channels
    return block.replace(filters=kept_out)


register(Section(
    "convolutional", "conv -> batch norm (batch_normalize=1) -> activation; groups=, dilation=, pad/padding, "
    "stride_x/stride_y, share_index= (reuse an earlier conv's weights)",
    _build, keys=_CONV_KEYS, channels=_channels, shape=_shape, flow=_flow, macs=_macs, params=_params,
    resize=_resize, copy_pruned=_copy_pruned, bind=_bind, conv=True, aliases=("conv",),
    pruning="BN convs are cut; a depthwise conv with its producer; other grouped convs and convs without BN stay whole",
    weights="BN beta, gamma, mean, var (or bias), then the kernel"))

register(Section(
    "depthwise", "reference dialect: depthwise conv (groups = input channels), BN and activation as [convolutional]",
    _build, keys=_CONV_KEYS, channels=_channels, shape=_shape, flow=_flow, macs=_macs, params=_params,
    resize=_resize, copy_pruned=_copy_pruned, conv=True, dialects=("reference",), pruning="cut together with its producer",
    weights="as [convolutional]"))
