"""Darknet's `[yolo]` training loss (AlexeyAB `src/yolo_layer.c`, `forward_yolo_layer`), key for key.

Darknet does not differentiate a loss: it writes `l.delta` (minus the gradient on the head's input) by hand,
with rules no smooth loss reproduces (overwrites in truth order, a max() for `objectness_smooth`, deltas that
skip the sigmoid's derivative, `box.c`'s own IoU derivatives). So this module computes that delta `D` per head
exactly as `forward_yolo_layer` does (`compress.detection.darknet_deltas`), and the loss is the linear surrogate
`-sum(D * p)`, whose gradient with respect to the head map `p` is `-D`. Its reported value is Darknet's own
cost, `sum(D^2)` (split into box, obj, cls). `tests/test_losses_darknet.py` checks `-grad == l.delta` against a
harness built from Darknet's C source (`tests/darknet_harness/harness.c`) for every key below.

Keys (read from each `[yolo]` block; Darknet's defaults): iou_loss [mse] (mse, iou, giou, diou, ciou),
iou_normalizer [0.75], obj_normalizer [1], cls_normalizer [1] (Darknet applies it only with
counters_per_class, to the true class), counters_per_class, delta_normalizer [1] (as Darknet's GPU backward;
its CPU backward ignores it), label_smooth_eps [0] (target y(1-eps) + eps/2), scale_x_y [1], ignore_thresh [0.5],
truth_thresh [1], iou_thresh [1] with iou_thresh_kind [iou] (and the box-delta averaging over a cell's classes),
objectness_smooth [0], max_delta [inf] (clips IoU-loss box deltas and the class multipliers), focal_loss [0],
new_coords [0], max [200] (truths per image). Keys of Darknet's data loader (jitter, random, resize) and of
inference (NMS, tracking, printing) do not change the delta; `map=` and `embedding_layer=` do and are refused.

Sums run over cells and images; parts are per image (sum / batch) and `total = batch * sum(parts)`, the
convention of `compress.detection.losses`. Darknet updates with `learning_rate / batch` times the batch's summed
delta, so its `learning_rate` at `[net] batch=B` corresponds to `lr0 = learning_rate / B` here.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import nn

from compress.base.errors import CompressError
from compress.darknet.block import Block
from compress.darknet.geometry import yolo_anchors, yolo_mask
from compress.detection.darknet_deltas import DarknetHeadOptions, head_delta
from compress.detection.loss_registry import register_loss

__all__ = ["DarknetHeadOptions", "DarknetLoss", "head_options", "LOSS_KEYS", "REFUSED_KEYS"]

log = logging.getLogger(__name__)

# read by this loss (besides the layout keys classes, num, mask, anchors)
LOSS_KEYS = ("iou_loss", "iou_normalizer", "obj_normalizer", "cls_normalizer", "delta_normalizer",
             "counters_per_class", "label_smooth_eps", "scale_x_y", "ignore_thresh", "truth_thresh", "iou_thresh",
             "iou_thresh_kind", "objectness_smooth", "max_delta", "focal_loss", "new_coords", "max")
_LAYOUT_KEYS = ("classes", "num", "mask", "anchors", "from")
# Darknet reads these but they do not touch l.delta: its data loader's augmentation (ours comes from --hyp),
# NMS and tracking at inference, and what it prints
_NOT_LOSS_KEYS = ("jitter", "random", "resize", "beta_nms", "nms_kind", "show_details", "track_history_size",
                  "sim_thresh", "dets_for_track", "dets_for_show", "track_ciou_norm")
REFUSED_KEYS = {"map": "remaps truth classes through a label-map file",
                "embedding_layer": "trains a tracking embedding for a [contrastive] layer"}


def _check_keys(block: Block) -> None:
    """Refuse the keys that change Darknet's training and that we do not implement; warn once on unknown ones."""
    keys = [k for k, _ in block.options]
    # a key set twice: Block.get reads its first line, as Darknet's option_find does (cfg parsing warns once)
    for key in keys:
        if key in REFUSED_KEYS:
            raise CompressError(f"{block.where(key)}: [yolo] {key}= {REFUSED_KEYS[key]} in Darknet's training, "
                                "which the darknet loss does not implement; remove the key or train with --loss v5")
    unknown = sorted(set(keys) - set(LOSS_KEYS) - set(_LAYOUT_KEYS) - set(_NOT_LOSS_KEYS))
    if unknown:
        log.warning("%s: [yolo] keys unknown to Darknet's loss, not used: %s", block.where(), ", ".join(unknown))


def _class_multipliers(block: Block, classes: int, max_delta: float) -> tuple[float, ...] | None:
    """`get_classes_multipliers`: max(count) / count per class (counts below 1 read as 1), capped at max_delta."""
    if not block.has("counters_per_class"):
        return None
    counts = [max(c, 1) for c in block.get_ints("counters_per_class")]
    if len(counts) != classes:
        raise CompressError(f"{block.where('counters_per_class')}: [yolo] counters_per_class lists {len(counts)} "
                            f"values for classes={classes}; list one count per class")
    top = max(counts)
    return tuple(min(top / c, max_delta) for c in counts)


def _options(block: Block) -> DarknetHeadOptions:
    _check_keys(block)
    d = DarknetHeadOptions
    floats = {k: block.get_float(k, getattr(d, k)) for k in
              ("ignore_thresh", "truth_thresh", "iou_thresh", "iou_normalizer", "cls_normalizer", "obj_normalizer",
               "delta_normalizer", "label_smooth_eps", "scale_x_y", "max_delta")}
    classes = block.get_int("classes", 20)
    return DarknetHeadOptions(
        where=block.where(), anchors=tuple(yolo_anchors(block)), mask=tuple(yolo_mask(block)), classes=classes,
        iou_loss=(block.get("iou_loss") or "mse").strip(),
        iou_thresh_kind=(block.get("iou_thresh_kind") or "iou").strip(),
        new_coords=block.get_int("new_coords", 0) != 0, objectness_smooth=block.get_int("objectness_smooth", 0) != 0,
        focal_loss=block.get_int("focal_loss", 0) != 0, max_boxes=block.get_int("max", 200),
        class_multipliers=_class_multipliers(block, classes, floats["max_delta"]), **floats)


def head_options(model: nn.Module) -> list[DarknetHeadOptions]:
    """Read the training keys of every `[yolo]` head of a DarknetModel, in `model.heads` order."""
    out = []
    for i in model.graph.heads:
        block = model.cfg.blocks[i]
        if not model.graph.sections[i].darknet_loss:
            raise CompressError(f"{block.where()}: [{block.type}] heads cannot be trained with the darknet loss "
                                "(it implements [yolo]); use --loss v5 or a cfg with [yolo] heads")
        out.append(_options(block))
    return out


class DarknetLoss:
    """`loss(heads, targets, img_hw) -> (total, {"box", "obj", "cls"})`, the interface of `YoloLoss`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = getattr(model, "module", model)
        self.opts = head_options(self.model)

    def deltas(self, heads: Sequence[torch.Tensor], targets: torch.Tensor,
               img_hw: tuple[int, int]) -> list[torch.Tensor]:
        """Darknet's `l.delta` per head, in the head map's layout (N, A, H, W, 5 + C)."""
        targets = targets.to(heads[0].device, torch.float32)
        return [head_delta(p.detach().float(), targets, o, img_hw) for p, o in zip(heads, self.opts)]

    def __call__(self, heads: Sequence[torch.Tensor], targets: torch.Tensor,
                 img_hw: tuple[int, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = heads[0].shape[0]
        parts = {k: torch.zeros((), device=heads[0].device) for k in ("box", "obj", "cls")}
        for p, d in zip(heads, self.deltas(heads, targets, img_hw)):
            for name, sl in (("box", slice(0, 4)), ("obj", slice(4, 5)), ("cls", slice(5, None))):
                surrogate = -(d[..., sl] * p[..., sl].float()).sum()  # gradient: -D
                cost = (d[..., sl] ** 2).sum()                         # value: Darknet's cost
                parts[name] = parts[name] + cost + surrogate - surrogate.detach()
        parts = {k: v / n for k, v in parts.items()}
        total = sum(parts.values()) * n
        return total, {k: v.detach() for k, v in parts.items()}


@register_loss("darknet")
def _darknet(model: nn.Module, config: object) -> DarknetLoss:
    return DarknetLoss(model)
