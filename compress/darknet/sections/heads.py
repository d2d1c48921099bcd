"""Detection heads: [yolo] (with the reference dialect's ASFF `from=`), [Gaussian_yolo], [region].

Anchors are read as Darknet reads them: comma-separated numbers (spaces, a trailing comma allowed),
`num=` may exceed the listed pairs (the rest are 0.5, Darknet's initial value) and defaults to the
number of listed pairs.
"""
from __future__ import annotations

import logging
from typing import Any

from compress.base.errors import CfgError
from compress.darknet import extra_layers, layers
from compress.darknet.block import Block
from compress.darknet.geometry import anchor_count, anchor_values, yolo_anchors, yolo_mask
from compress.darknet.sections.base import Ctx, FlowOps, Key, Section, register, resolve_refs

__all__ = ["anchor_values", "yolo_anchors", "yolo_mask", "head_outputs", "check_yolo_block", "check_anchors"]

log = logging.getLogger(__name__)
_EXTRA = {"yolo": 5, "gaussian_yolo": 9}   # per-anchor entries besides the class scores


def head_outputs(block: Block) -> int:
    """Channels a head reads: anchors x (classes + 5), +4 uncertainties for [Gaussian_yolo], coords for [region]."""
    classes = block.get_int("classes", 20)
    if block.type == "region":
        return anchor_count(block, anchor_values(block)) * (classes + block.get_int("coords", 4) + 1)
    return len(yolo_mask(block)) * (classes + _EXTRA[block.type])


def check_anchors(block: Block) -> list[float]:
    """No listed anchor is negative or infinite (Darknet reads them and trains with zero losses, no error)."""
    values = anchor_values(block)
    # 0 is accepted here (a published VisDrone cfg has one; inference gives zero-size boxes, as Darknet does);
    # training refuses an anchor of 0 in a head's mask (detection.losses.build_loss)
    bad = [v for v in values if not (0 <= v < float("inf"))]
    if bad:
        raise CfgError(f"{block.where('anchors')}: [{block.type}] anchors has {bad[0]:g}; every anchor width and "
                       "height must be a positive number of pixels; fix anchors= (e.g. `yolo-compress anchors`)")
    return values


def check_yolo_block(block: Block) -> None:
    """Parse-time checks of a [yolo]/[Gaussian_yolo] (anchors, num, mask), with file:line errors."""
    values = check_anchors(block)
    total = anchor_count(block, values)
    if total < 1:
        raise CfgError(f"{block.where('num')}: [{block.type}] num={total} must be >= 1")
    if not block.has("num") and len(values) % 2:
        raise CfgError(f"{block.where('anchors')}: [{block.type}] anchors has an odd count ({len(values)}); list w,h "
                       "pairs (or set num=)")
    mask = yolo_mask(block)
    bad = [m for m in mask if m < 0]
    if bad:
        raise CfgError(f"{block.where('mask')}: [{block.type}] mask {bad} is negative; use anchor indices "
                       f"0..{total - 1}")
    if any(2 * m + 1 >= len(values) for m in mask):  # past anchors= (or num=): Darknet runs it, with 0.5
        log.warning("%s: [%s] mask uses anchors that anchors= does not list; Darknet uses 0.5 for them",
                    block.where(), block.type)
    if block.get_int("classes", 20) < 1:
        raise CfgError(f"{block.where('classes')}: [{block.type}] classes={block.get_int('classes', 20)} must be >= 1")


def _head_inputs(block: Block, i: int) -> tuple[int, ...]:
    if block.type == "yolo" and block.has("from"):    # reference ASFF head: reads every level
        return resolve_refs(block, i, "from")
    if i == 0:
        raise CfgError(f"{block.where()}: [{block.type}] cannot be the first layer")
    return (i - 1,)


def _asff(block: Block) -> int:
    return len(block.get_ints("from")) if block.type == "yolo" and block.has("from") else 0


def _head_channels(block: Block, ins: list[int], ctx: Ctx) -> int:
    n = _asff(block)
    need = head_outputs(block) + n
    own = ctx.head_index if n else 0
    if n and own >= n:
        raise CfgError(f"{block.where('from')}: [yolo] is head {own} but from= lists {n} layers; list one per head")
    if ins[own] != need:
        what = {"yolo": "len(mask) x (classes+5)", "gaussian_yolo": "len(mask) x (classes+9)",
                "region": "num x (classes+coords+1)"}[block.type] + (f" + {n} ASFF weights" if n else "")
        src = "its from= layer" if n else f"layer {ctx.index - 1}"
        raise CfgError(f"{block.where()}: [{block.type}] expects {need} input channels ({what}) but {src} gives "
                       f"{ins[own]}; set filters={need} in the conv before it")
    return ins[own]


def _head_shape(block: Block, ins: list, c: int, ctx: Ctx) -> Any:
    return ins[ctx.head_index] if _asff(block) else ins[0]


def _head_flow(block: Block, i: int, ins: list, ops: FlowOps) -> Any:
    for v in ins:
        ops.opaque(v, block)
    return ins[0]


def _build_yolo(block: Block, ins: list[int], ctx: Ctx) -> Any:
    return extra_layers.ASFFYOLOLayer(block, ctx.head_index) if _asff(block) else layers.YOLOLayer(block)


def _build_gaussian(block: Block, ins: list[int], ctx: Ctx) -> Any:
    return extra_layers.GaussianYOLOLayer(block)


def _build_region(block: Block, ins: list[int], ctx: Ctx) -> Any:
    return layers.RegionLayer(block)


_HEAD_KEYS = (Key("classes", min=1), Key("num", min=1), Key("mask", "ints", min=0), Key("scale_x_y", "float", min=0),
              Key("new_coords", min=0, max=1))
# [yolo]'s training keys, as Darknet's parse_yolo reads them (compress.detection.losses_darknet uses them)
_YOLO_LOSS_KEYS = (
    Key("iou_loss", "str", choices=("mse", "iou", "giou", "diou", "ciou")),
    Key("iou_thresh_kind", "str", choices=("iou", "giou", "diou", "ciou")),
    *(Key(k, "float", min=0) for k in ("iou_normalizer", "obj_normalizer", "cls_normalizer", "delta_normalizer",
                                       "ignore_thresh", "truth_thresh", "iou_thresh", "max_delta")),
    Key("label_smooth_eps", "float", min=0, max=1), Key("objectness_smooth", min=0), Key("focal_loss", min=0),
    Key("counters_per_class", "ints"), Key("max", min=1))
register(Section(
    "yolo", "YOLOv3/v4 head (mask=, anchors=, num=, scale_x_y=, new_coords=); reference dialect: from= (ASFF)",
    _build_yolo, keys=_HEAD_KEYS + _YOLO_LOSS_KEYS, refs=("from",), inputs=_head_inputs, channels=_head_channels,
    shape=_head_shape, flow=_head_flow, check=check_yolo_block, head=True, darknet_loss=True,
    dialects=("darknet", "reference"), pruning="input stays whole"))
register(Section(
    "gaussian_yolo", "Gaussian YOLOv3 head: box means and uncertainties; confidence x (1 - mean uncertainty)",
    _build_gaussian, keys=_HEAD_KEYS, inputs=_head_inputs, channels=_head_channels, shape=_head_shape,
    flow=_head_flow, check=check_yolo_block, head=True, header="Gaussian_yolo", pruning="input stays whole"))
register(Section(
    "region", "YOLOv2 head (inference): anchors in grid cells, softmax classes", _build_region,
    keys=(Key("classes", min=1), Key("num", min=1), Key("coords", min=4, max=4)), inputs=_head_inputs,
    channels=_head_channels, shape=_head_shape, flow=_head_flow, check=check_anchors, head=True,
    pruning="input stays whole"))
