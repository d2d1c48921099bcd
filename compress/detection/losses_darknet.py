"""Darknet's `[yolo]` training loss (AlexeyAB `src/yolo_layer.c`, `forward_yolo_layer`), as a torch loss.

Darknet writes deltas (= minus the gradient) by hand; each term below is the torch loss whose gradient with
respect to the head's raw output is that delta, so the cfg's keys keep their meaning. Per head, with the
keys read from its `[yolo]` block (Darknet's defaults in brackets):

* Positives. For every truth the best anchor over *all* `anchors=` of the cfg (IoU of centred w x h boxes,
  anchors / network size); if that anchor is in this head's `mask`, the cell holding the centre is positive.
  With `iou_thresh` [1.0] < 1, every other anchor of the mask whose IoU with the truth exceeds it is positive
  too. With `truth_thresh` [1.0] < 1, a cell whose predicted box overlaps a truth by more than it is positive
  for that truth.
* Ignore. A negative cell is left out of the objectness term when its predicted box overlaps some truth by
  more than `ignore_thresh` [0.5] and one of its class probabilities exceeds 0.25 (`compare_yolo_class`).
* Box, `iou_loss` [mse]: mse -> x, y: `s * BCE(t_xy, (t + (s-1)/2) / s)` (Darknet skips the sigmoid's
  derivative, which makes its delta `tx - x` the gradient of this BCE; `s = scale_x_y`), w, h:
  `0.5 (t_wh - log(w / anchor))^2`, both times `iou_normalizer` [0.75] * (2 - w*h).
  iou/giou/diou/ciou -> `iou_normalizer * (1 - IoU(pred, truth))` in image-normalised units, with Darknet's
  gradient path (d/dt_xy taken as d/dx, d/dt_wh as d/dw * exp(t_wh)); autograd replaces its hand-written
  `dx_box_iou`. Box terms of several truths at one cell add up (Darknet accumulates them).
* Objectness: `obj_normalizer` [1] * BCE(t_o, 1 at positives, 0 at the other non-ignored cells).
* Classes: `cls_normalizer` [1] * BCE(t_c, multi-hot classes of the cell's truths), `label_smooth_eps` [0].
* `new_coords=1` (scaled-YOLOv4 / YOLOv7): the conv before the head already applied the logistic, so the map
  holds probabilities; x, y = s*p - (s-1)/2, w = (2p)^2 * anchor. Darknet's deltas then flow back through
  that logistic, i.e. they are gradients of squared errors on p: `0.5 (x - tx)^2 / s`, `0.5 (p_w - tw)^2`
  with tw = sqrt(w / anchor) / 2, and `0.5 (p - target)^2` for objectness and classes.

Sums run over cells and images; parts are per image (sum / batch) and `total = batch * sum(parts)`, the
convention of `compress.detection.losses`. Darknet updates with `learning_rate / batch` times the batch's summed
delta, so its `learning_rate` at `[net] batch=B` corresponds to `lr0 = learning_rate / B` here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compress.darknet.geometry import yolo_anchors
from compress.detection.boxes import bbox_iou, box_iou, xywh2xyxy
from compress.base.errors import CompressError
from compress.detection.loss_registry import register_loss

__all__ = ["DarknetHeadOptions", "DarknetLoss", "head_options"]

IOU_LOSSES = ("mse", "iou", "giou", "diou", "ciou")
CLASS_MATCH_PROB = 0.25  # compare_yolo_class's threshold for the ignore rule


@dataclass(frozen=True)
class DarknetHeadOptions:
    """The training keys of one `[yolo]` block (Darknet's defaults)."""
    where: str
    anchors: tuple[tuple[float, float], ...]
    mask: tuple[int, ...]
    ignore_thresh: float = 0.5
    truth_thresh: float = 1.0
    iou_thresh: float = 1.0
    iou_normalizer: float = 0.75
    cls_normalizer: float = 1.0
    obj_normalizer: float = 1.0
    iou_loss: str = "mse"
    scale_x_y: float = 1.0
    new_coords: bool = False
    label_smooth_eps: float = 0.0

    def __post_init__(self) -> None:
        if self.iou_loss not in IOU_LOSSES:
            raise CompressError(f"{self.where}: [yolo] iou_loss={self.iou_loss} is not one of "
                                f"{', '.join(IOU_LOSSES)}; fix the cfg")
        for name in ("iou_normalizer", "cls_normalizer", "obj_normalizer", "ignore_thresh", "truth_thresh",
                     "iou_thresh", "label_smooth_eps"):
            if getattr(self, name) < 0:
                raise CompressError(f"{self.where}: [yolo] {name}={getattr(self, name)} must be >= 0")
        bad = [m for m in self.mask if not 0 <= m < len(self.anchors)]
        if bad:
            raise CompressError(f"{self.where}: [yolo] mask {bad} has no anchor (anchors= lists "
                                f"{len(self.anchors)}); fix mask= or anchors=")


def head_options(model: nn.Module) -> list[DarknetHeadOptions]:
    """Read the training keys of every `[yolo]` head of a DarknetModel, in `model.heads` order."""
    out = []
    for i, layer in zip(model.graph.heads, model.heads):
        block = model.cfg.blocks[i]
        if not model.graph.sections[i].darknet_loss:
            raise CompressError(f"{block.where()}: [{block.type}] heads (YOLOv2) cannot be trained with the "
                                "darknet loss; use a cfg with [yolo] heads")
        kw = {k: block.get_float(k, getattr(DarknetHeadOptions, k)) for k in
              ("ignore_thresh", "truth_thresh", "iou_thresh", "iou_normalizer", "cls_normalizer", "obj_normalizer",
               "label_smooth_eps")}
        out.append(DarknetHeadOptions(
            where=block.where(), anchors=tuple(yolo_anchors(block)),   # Darknet's biases: 0.5 past anchors=
            mask=tuple(layer.mask), iou_loss=(block.get("iou_loss") or "mse").strip().lower(),
            scale_x_y=layer.scale_x_y, new_coords=layer.new_coords, **kw))
    return out


@dataclass
class _Positives:
    """Positive (cell, truth) pairs of one head: image, anchor (mask index), row, column, truth index."""
    b: torch.Tensor
    a: torch.Tensor
    j: torch.Tensor
    i: torch.Tensor
    t: torch.Tensor


class DarknetLoss:
    """`loss(heads, targets, img_hw) -> (total, {"box", "obj", "cls"})`, the interface of `YoloLoss`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = getattr(model, "module", model)
        self.opts = head_options(self.model)
        self.nc = self.model.num_classes

    def __call__(self, heads: Sequence[torch.Tensor], targets: torch.Tensor,
                 img_hw: tuple[int, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = heads[0].shape[0]
        targets = targets.to(heads[0].device, torch.float32)
        sums = [torch.zeros((), device=heads[0].device) for _ in range(3)]
        for p, o in zip(heads, self.opts):
            for k, v in enumerate(self._head(p.float(), targets, o, img_hw)):
                sums[k] = sums[k] + v
        parts = {name: s / n for name, s in zip(("box", "obj", "cls"), sums)}
        total = sum(parts.values()) * n
        return total, {k: v.detach() for k, v in parts.items()}

    def _head(self, p: torch.Tensor, targets: torch.Tensor, o: DarknetHeadOptions,
              img_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, na, h, w, _ = p.shape
        anchors = torch.tensor(o.anchors, device=p.device, dtype=torch.float32)
        net = torch.tensor([img_hw[1], img_hw[0]], device=p.device, dtype=torch.float32)
        mask_anchors = anchors[list(o.mask)] / net  # (A, 2) normalised to the image
        with torch.no_grad():
            pred = self._decode(p.detach(), mask_anchors, o)  # (N, A, H, W, 4) normalised xywh
            best_match, best_iou, best_t = self._overlaps(p.detach(), pred, targets, o)
        pos = self._positives(targets, anchors / net, o, (h, w))
        extra = (best_iou > o.truth_thresh).nonzero(as_tuple=True)
        if len(extra[0]):  # truth_thresh < 1: well-overlapping predictions become positives too
            pos = _Positives(*(torch.cat((x, y)) for x, y in
                               zip((pos.b, pos.a, pos.j, pos.i, pos.t), (*extra, best_t[extra]))))
        box = self._box_loss(p, targets, pos, mask_anchors, o, (h, w))
        obj_t = torch.zeros(p.shape[:4], device=p.device)
        obj_t[pos.b, pos.a, pos.j, pos.i] = 1.0
        weight = ((best_match <= o.ignore_thresh) | (obj_t > 0)).float()
        obj = o.obj_normalizer * self._prob_loss(p[..., 4], obj_t, weight, o.new_coords)
        return box, obj, o.cls_normalizer * self._class_loss(p, targets, pos, o)

    @staticmethod
    def _decode(p: torch.Tensor, anchors: torch.Tensor, o: DarknetHeadOptions) -> torch.Tensor:
        """Predicted boxes (xywh normalised to the image), as `get_yolo_box`."""
        n, na, h, w, _ = p.shape
        s = o.scale_x_y
        gy, gx = torch.meshgrid(torch.arange(h, device=p.device), torch.arange(w, device=p.device), indexing="ij")
        xy = (p[..., :2] if o.new_coords else torch.sigmoid(p[..., :2])) * s - (s - 1) / 2
        wh = (2 * p[..., 2:4]) ** 2 if o.new_coords else torch.exp(p[..., 2:4].clamp(max=8.0))
        x = (xy[..., 0] + gx) / w
        y = (xy[..., 1] + gy) / h
        wh = wh * anchors.view(1, na, 1, 1, 2)
        return torch.stack((x, y, wh[..., 0], wh[..., 1]), -1)

    def _overlaps(self, p: torch.Tensor, pred: torch.Tensor, targets: torch.Tensor,
                  o: DarknetHeadOptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per cell: best IoU with a truth of its image among cells with a class prob > 0.25 (ignore rule),
        best IoU over all truths, and the index (into targets) of that best truth."""
        shape = p.shape[:4]
        best_match = torch.zeros(shape, device=p.device)
        best_iou = torch.zeros(shape, device=p.device)
        best_t = torch.zeros(shape, dtype=torch.long, device=p.device)
        probs = p[..., 5:] if o.new_coords else torch.sigmoid(p[..., 5:])
        class_ok = (probs > CLASS_MATCH_PROB).any(-1)
        for b in targets[:, 0].unique().long().tolist():
            idx = (targets[:, 0] == b).nonzero().flatten()
            iou = box_iou(xywh2xyxy(pred[b].reshape(-1, 4)), xywh2xyxy(targets[idx, 2:6]))  # (AHW, T)
            value, arg = iou.max(1)
            best_iou[b] = value.view(shape[1:])
            best_t[b] = idx[arg].view(shape[1:])
            best_match[b] = value.view(shape[1:]) * class_ok[b]
        return best_match, best_iou, best_t

    @staticmethod
    def _positives(targets: torch.Tensor, anchors: torch.Tensor, o: DarknetHeadOptions,
                   hw: tuple[int, int]) -> _Positives:
        """Best anchor over all anchors (+ the mask's anchors above iou_thresh), at the centre cell."""
        h, w = hw
        wh = targets[:, 4:6]
        inter = torch.minimum(wh[:, None], anchors[None]).prod(-1)  # (M, T) centred boxes
        iou = inter / (wh.prod(-1)[:, None] + anchors.prod(-1)[None] - inter + 1e-12)
        best = iou.argmax(1)
        mask = torch.tensor(o.mask, device=targets.device)
        is_best = mask[None, :] == best[:, None]  # (M, A)
        extra = (iou[:, mask] > o.iou_thresh) & ~is_best if o.iou_thresh < 1.0 else torch.zeros_like(is_best)
        t, a = (is_best | extra).nonzero(as_tuple=True)
        i = (targets[t, 2] * w).long().clamp(0, w - 1)
        j = (targets[t, 3] * h).long().clamp(0, h - 1)
        return _Positives(targets[t, 0].long(), a, j, i, t)

    @staticmethod
    def _box_loss(p: torch.Tensor, targets: torch.Tensor, pos: _Positives, anchors: torch.Tensor,
                  o: DarknetHeadOptions, hw: tuple[int, int]) -> torch.Tensor:
        if not len(pos.b):
            return p.sum() * 0.0
        h, w = hw
        ps = p[pos.b, pos.a, pos.j, pos.i, :4]
        truth = targets[pos.t, 2:6]
        anc = anchors[pos.a]
        s = o.scale_x_y
        cell = torch.stack((pos.i, pos.j), 1).float()
        if o.iou_loss == "mse":
            txy = truth[:, :2] * torch.tensor([w, h], device=p.device) - cell
            scale = o.iou_normalizer * (2 - truth[:, 2] * truth[:, 3])
            if o.new_coords:
                xy = ps[:, :2] * s - (s - 1) / 2
                lxy = 0.5 * (xy - txy) ** 2 / s
                lwh = 0.5 * (ps[:, 2:4] - torch.sqrt(truth[:, 2:4] / anc) / 2) ** 2
            else:
                y = ((txy + (s - 1) / 2) / s).clamp(1e-6, 1 - 1e-6)
                lxy = s * (F.binary_cross_entropy_with_logits(ps[:, :2], y, reduction="none")
                           - F.binary_cross_entropy_with_logits(torch.logit(y), y, reduction="none"))
                lwh = 0.5 * (ps[:, 2:4] - torch.log(truth[:, 2:4] / anc)) ** 2
            return ((lxy + lwh).sum(1) * scale).sum()
        if o.new_coords:
            xy = ps[:, :2] * s - (s - 1) / 2
            wh = (2 * ps[:, 2:4]) ** 2 * anc
            dxy, dwh = ps[:, :2], ps[:, 2:4]  # Darknet sends d/dx, d/dw to p unchanged
        else:
            xy = torch.sigmoid(ps[:, :2]) * s - (s - 1) / 2
            dwh = torch.exp(ps[:, 2:4].clamp(max=8.0))
            wh = dwh * anc
            dxy = ps[:, :2]
        grid = torch.tensor([w, h], device=p.device)
        box_xy = ((xy + cell) / grid).detach() + dxy - dxy.detach()
        box_wh = wh.detach() + dwh - dwh.detach()
        iou = bbox_iou(torch.cat((box_xy, box_wh), 1), truth, kind=o.iou_loss)
        return o.iou_normalizer * (1.0 - iou).sum()

    @staticmethod
    def _prob_loss(logits_or_p: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                   new_coords: bool) -> torch.Tensor:
        if new_coords:
            return (0.5 * (logits_or_p - target) ** 2 * weight).sum()
        return F.binary_cross_entropy_with_logits(logits_or_p, target, weight=weight, reduction="sum")

    def _class_loss(self, p: torch.Tensor, targets: torch.Tensor, pos: _Positives,
                    o: DarknetHeadOptions) -> torch.Tensor:
        if not len(pos.b):
            return p.sum() * 0.0
        n, na, h, w, _ = p.shape
        cell = ((pos.b * na + pos.a) * h + pos.j) * w + pos.i
        cells, inverse = torch.unique(cell, return_inverse=True)
        onehot = torch.zeros(len(cells), self.nc, device=p.device)
        onehot[inverse, targets[pos.t, 1].long()] = 1.0  # several truths in one cell: multi-hot (Darknet)
        eps = o.label_smooth_eps
        target = onehot * (1 - eps) + (1 - onehot) * eps / self.nc
        flat = p.reshape(-1, p.shape[-1])[cells, 5:]
        return self._prob_loss(flat, target, torch.ones_like(target), o.new_coords)


@register_loss("darknet")
def _darknet(model: nn.Module, config: object) -> DarknetLoss:
    return DarknetLoss(model)
