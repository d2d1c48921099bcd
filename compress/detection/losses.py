"""YOLO detection loss (ultralytics-v5 style matching, Darknet decoding) and the target builder.

Notation, per [yolo] head with grid (H, W), stride (sx, sy) = (img_w / W, img_h / H) and anchors
`a_k` = `head.anchors[k] / (sx, sy)` in grid units:

* Targets (M, 6) = [b, cls, cx, cy, w, h] normalised to the image. In grid units `g = (cx*W, cy*H, w*W, h*H)`.
* Anchor matching (wh-ratio, YOLOv5 style): target t matches anchor k when
  `max(r, 1/r) < anchor_t` for both wh components, `r = g_wh / a_k`. A target may match several anchors
  and several heads; a target that matches none has no positive (it still counts as background).
* The positive cell is the cell holding the centre: `(gx, gy) = floor(g_xy)`; the box target is
  `tbox = (g_xy - (gx, gy), g_wh)` (centre offset in the cell, size in grid units).
* The predicted box uses the model's decoding (`YOLOLayer.decode`):
  `xy = sigmoid(t_xy) * s - (s - 1) / 2` with `s = scale_x_y`, `wh = exp(t_wh) * a_k`; for `new_coords=1`
  heads (the map already holds probabilities p): `xy = p_xy * s - (s - 1) / 2`, `wh = (2 p_wh)^2 * a_k`, and
  the BCE terms take `logit(p)` (their gradient at the conv's input is then the usual `p - target`).
* Box term: `L_box = mean(1 - CIoU(pred, tbox))` (or GIoU), over the positives of a head.
* Objectness: `L_obj = BCEWithLogits(t_o, tobj)`, mean over all A*H*W cells, where `tobj = clamp(IoU, 0)`
  (detached) at positive cells and 0 elsewhere; heads are weighted by `balance`, ordered by stride (fine
  first), never by head index.
* Classes: `L_cls = BCEWithLogits(t_c, onehot(cls))`, mean over positives and classes (skipped if nc == 1).
* Gains: `box * 3/nl`, `obj * (img/640)^2 * 3/nl`, `cls * nc/80 * 3/nl` (nl = number of heads), and
  `total = batch_size * (L_box + L_obj + L_cls)` so gradients sum over images (SGD lr 0.01 tuned for it).

Losses are a registry: `LOSSES[name](model, train_config) -> loss`, `build_loss(name, model, config)`;
"v5" is this module's `YoloLoss`, "darknet" is `compress.detection.losses_darknet.DarknetLoss` (the `[yolo]` keys).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, NamedTuple, Sequence

import torch
from torch import nn

from compress.detection.boxes import bbox_iou
from compress.base.errors import CfgError, CompressError
from compress.detection import losses_darknet  # noqa: F401  (registers "darknet", so build_loss sees every loss)
from compress.detection.loss_registry import LOSSES, register_loss

__all__ = ["LossConfig", "YoloLoss", "decode_cell_boxes", "HeadTargets", "build_targets", "head_strides",
           "init_head_biases", "LOSSES", "register_loss", "build_loss"]

log = logging.getLogger(__name__)

DEFAULT_BALANCE = (4.0, 1.0, 0.4, 0.06, 0.02)


def build_loss(name: str, model: nn.Module, config: Any = None) -> Callable:
    """The registered loss `name` for `model`; `config` (a TrainConfig or None) carries the v5 gains."""
    if name not in LOSSES:
        raise CompressError(f"loss {name!r} is not one of {sorted(LOSSES)}; pick one of those (--loss)")
    _check_trainable_anchors(model)
    return LOSSES[name](model, config)


def _check_trainable_anchors(model: nn.Module) -> None:
    """An anchor of width or height 0 in a head's mask makes every loss term 0 (training "succeeds" and learns
    nothing); Darknet and inference accept it (zero-size boxes), training refuses it naming the cfg line."""
    graph, cfg = getattr(model, "graph", None), getattr(model, "cfg", None)
    for k, head in enumerate(getattr(model, "heads", []) if graph is not None else []):
        anchors = getattr(head, "anchors", None)
        if isinstance(anchors, torch.Tensor) and not bool((anchors > 0).all()):
            block = cfg.blocks[graph.heads[k]]
            raise CfgError(f"{block.where('anchors')}: [{block.type}] mask uses an anchor of size 0 "
                           f"({anchors.tolist()}); it trains with zero losses; set positive anchors (e.g. from "
                           "`yolo-compress anchors`)")


@dataclass(frozen=True)
class LossConfig:
    """Loss hyper-parameters. `balance` = objectness weight per head from the finest stride to the
    coarsest (default 4.0, 1.0, 0.4, ...)."""
    box: float = 0.05
    obj: float = 1.0
    cls: float = 0.5
    anchor_t: float = 4.0
    iou_kind: Literal["ciou", "giou"] = "ciou"
    balance: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("box", "obj", "cls"):
            if getattr(self, name) < 0:
                raise CompressError(f"LossConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.anchor_t <= 1:
            raise CompressError(f"LossConfig.anchor_t must be > 1, got {self.anchor_t}")
        if self.iou_kind not in ("ciou", "giou"):
            raise CompressError(f"LossConfig.iou_kind must be 'ciou' or 'giou', got {self.iou_kind!r}")


class HeadTargets(NamedTuple):
    """Positive cells of one head: image index, anchor index, grid row/column, box target (x offset in
    the cell, y offset, w, h in grid units), class index, the matched anchor (w, h) in grid units."""
    b: torch.Tensor
    a: torch.Tensor
    gy: torch.Tensor
    gx: torch.Tensor
    tbox: torch.Tensor
    tcls: torch.Tensor
    anchors: torch.Tensor


def head_strides(heads: Sequence[torch.Tensor], img_hw: tuple[int, int]) -> list[tuple[float, float]]:
    """(sx, sy) per raw head map (N, A, H, W, 5+C)."""
    return [(img_hw[1] / p.shape[3], img_hw[0] / p.shape[2]) for p in heads]


def build_targets(heads: Sequence[torch.Tensor], targets: torch.Tensor, model: nn.Module,
                  img_hw: tuple[int, int], anchor_t: float = 4.0) -> list[HeadTargets]:
    """Match targets (M, 6) [b, cls, cx, cy, w, h] to anchors of every head (see module docstring).

    Returns one `HeadTargets` per head, in the order of `model.heads` (= the order of `heads`).
    """
    layers = _unwrap(model).heads
    out = []
    for layer, p, (sx, sy) in zip(layers, heads, head_strides(heads, img_hw)):
        _, na, h, w, _ = p.shape
        anchors = layer.anchors.to(p.device, torch.float32) / torch.tensor([sx, sy], device=p.device)
        t = targets.to(p.device, torch.float32)
        gxywh = t[:, 2:6] * torch.tensor([w, h, w, h], device=p.device, dtype=torch.float32)
        r = gxywh[None, :, 2:4] / anchors[:, None]  # (A, M, 2)
        match = torch.max(r, 1 / r).max(2).values < anchor_t  # (A, M)
        a, m = match.nonzero(as_tuple=True)
        g = gxywh[m]
        gij = g[:, :2].long()
        gx, gy = gij[:, 0].clamp(0, w - 1), gij[:, 1].clamp(0, h - 1)
        tbox = torch.cat((g[:, :2] - gij, g[:, 2:4]), 1)
        out.append(HeadTargets(t[m, 0].long(), a, gy, gx, tbox, t[m, 1].long(), anchors[a]))
    return out


MAX_LOG_WH = 8.0  # clamp t_wh before exp(): e^8 anchors is far beyond any image, and exp() cannot overflow


def decode_cell_boxes(ps: torch.Tensor, anchors: torch.Tensor, s: float = 1.0,
                      new_coords: bool = False) -> torch.Tensor:
    """The model's box formula (`YOLOLayer.decode`) for (n, >=4) raw predictions at known cells, in grid units
    relative to the cell: (sigmoid(t_xy) * s - (s - 1) / 2, exp(t_wh) * anchors), or for new_coords heads
    (p_xy * s - (s - 1) / 2, (2 p_wh)^2 * anchors). Shared by the detection loss and the distillation box terms."""
    if new_coords:
        return torch.cat((ps[:, :2] * s - (s - 1) / 2, (2 * ps[:, 2:4]) ** 2 * anchors), 1)
    xy = torch.sigmoid(ps[:, :2]) * s - (s - 1) / 2
    wh = torch.exp(ps[:, 2:4].clamp(max=MAX_LOG_WH)) * anchors
    return torch.cat((xy, wh), 1)


class YoloLoss:
    """`loss(heads, targets, img_hw) -> (total, parts)`; parts = {"box", "obj", "cls"} (detached, after gains,
    before the batch-size factor). new_coords=1 heads train on logit(p) (see the module docstring)."""

    def __init__(self, model: nn.Module, hyp: LossConfig = LossConfig()) -> None:
        model = _unwrap(model)
        self.model, self.hyp = model, hyp
        self.nc = model.num_classes
        self.bce = nn.BCEWithLogitsLoss()

    def __call__(self, heads: Sequence[torch.Tensor], targets: torch.Tensor,
                 img_hw: tuple[int, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hyp, nl = self.hyp, len(heads)
        device = heads[0].device
        balance = self._balance(heads, img_hw)
        lbox, lobj, lcls = (torch.zeros((), device=device) for _ in range(3))
        matched = build_targets(heads, targets, self.model, img_hw, hyp.anchor_t)
        for layer, p, tg, bal in zip(self.model.heads, heads, matched, balance):
            p = _as_logits(p.float(), layer.new_coords)
            tobj = torch.zeros(p.shape[:4], device=device)
            if len(tg.b):
                ps = p[tg.b, tg.a, tg.gy, tg.gx]
                box = decode_cell_boxes(_box_input(ps, layer.new_coords), tg.anchors, layer.scale_x_y,
                                        layer.new_coords)
                iou = bbox_iou(box, tg.tbox, kind=hyp.iou_kind)
                lbox = lbox + (1.0 - iou).mean()
                tobj[tg.b, tg.a, tg.gy, tg.gx] = iou.detach().clamp(0).to(tobj.dtype)
                if self.nc > 1:
                    tc = torch.zeros_like(ps[:, 5:])
                    tc[torch.arange(len(tg.tcls), device=device), tg.tcls] = 1.0
                    lcls = lcls + self.bce(ps[:, 5:], tc)
            lobj = lobj + self.bce(p[..., 4], tobj) * bal
        img = max(img_hw)
        lbox = lbox * hyp.box * 3 / nl
        lobj = lobj * hyp.obj * (img / 640) ** 2 * 3 / nl
        lcls = lcls * hyp.cls * self.nc / 80 * 3 / nl
        bs = heads[0].shape[0]
        parts = {"box": lbox.detach(), "obj": lobj.detach(), "cls": lcls.detach()}
        return (lbox + lobj + lcls) * bs, parts


    def _balance(self, heads: Sequence[torch.Tensor], img_hw: tuple[int, int]) -> list[float]:
        """Objectness weight per head, assigned by stride (finest first), returned in head order."""
        table = self.hyp.balance or DEFAULT_BALANCE
        if len(table) < len(heads):
            raise CompressError(f"LossConfig.balance has {len(table)} entries but the model has {len(heads)} "
                                "heads; give one weight per head")
        strides = [sx * sy for sx, sy in head_strides(heads, img_hw)]
        order = sorted(range(len(heads)), key=lambda i: strides[i])
        weights = [0.0] * len(heads)
        for rank, i in enumerate(order):
            weights[i] = table[rank]
        return weights


def init_head_biases(model: nn.Module, img_size: int | None = None, start: int = 0) -> None:
    """Prior-initialise the conv biases feeding each [yolo] head (for training from scratch, YOLOv5 style):
    objectness ~ 8 objects per 640x640 image, class scores ~ 0.6 / nc. Only convs with index >= `start`
    (those not loaded from weights, e.g. after a `cutoff`) are touched."""
    model = _unwrap(model)
    img = img_size or model.cfg.width
    shapes = model.graph.shapes(img, img)
    for i, layer in zip(model.graph.heads, model.heads):
        src = model.graph.inputs[i][0]
        conv = getattr(model.layers[src], "conv", None)
        if src < start or conv is None or conv.bias is None:
            continue
        stride = img / shapes[i][2]
        with torch.no_grad():
            b = conv.bias.view(layer.num_anchors, -1)
            b[:, 4] = math.log(8 / (640 / stride) ** 2)
            b[:, 5:] = math.log(0.6 / max(layer.classes - 0.99, 0.01))


def _as_logits(p: torch.Tensor, new_coords: bool) -> torch.Tensor:
    """new_coords maps hold probabilities: turn them into logits for the BCE terms (box terms undo it)."""
    return torch.logit(p.clamp(1e-6, 1 - 1e-6)) if new_coords else p


def _box_input(ps: torch.Tensor, new_coords: bool) -> torch.Tensor:
    return torch.sigmoid(ps) if new_coords else ps


@register_loss("v5")
def _v5(model: nn.Module, config: Any = None) -> YoloLoss:
    if config is None:
        return YoloLoss(model)
    return YoloLoss(model, LossConfig(box=config.box, obj=config.obj, cls=config.cls, anchor_t=config.anchor_t,
                                      iou_kind=config.iou_kind))


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)

