"""Box geometry: format conversions, IoU variants and non-maximum suppression (pure torch)."""
from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = ["xywh2xyxy", "xyxy2xywh", "box_area", "box_iou", "bbox_iou", "nms", "batched_nms", "non_max_suppression"]

IoUKind = Literal["iou", "giou", "diou", "ciou"]


def xywh2xyxy(x: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre x, centre y, width, height -> x1, y1, x2, y2."""
    out = x.clone()
    out[..., 0] = x[..., 0] - x[..., 2] / 2
    out[..., 1] = x[..., 1] - x[..., 3] / 2
    out[..., 2] = x[..., 0] + x[..., 2] / 2
    out[..., 3] = x[..., 1] + x[..., 3] / 2
    return out


def xyxy2xywh(x: torch.Tensor) -> torch.Tensor:
    """(..., 4) x1, y1, x2, y2 -> centre x, centre y, width, height."""
    out = x.clone()
    out[..., 0] = (x[..., 0] + x[..., 2]) / 2
    out[..., 1] = (x[..., 1] + x[..., 3]) / 2
    out[..., 2] = x[..., 2] - x[..., 0]
    out[..., 3] = x[..., 3] - x[..., 1]
    return out


def box_area(b: torch.Tensor) -> torch.Tensor:
    """Area of (..., 4) xyxy boxes (0 for degenerate boxes)."""
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes: (N, 4) x (M, 4) -> (N, M)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (box_area(a)[:, None] + box_area(b)[None, :] - inter + eps)


def bbox_iou(a: torch.Tensor, b: torch.Tensor, kind: IoUKind = "ciou", eps: float = 1e-7) -> torch.Tensor:
    """Elementwise IoU / GIoU / DIoU / CIoU of broadcastable (..., 4) xywh boxes -> (...)."""
    a1, b1 = xywh2xyxy(a), xywh2xyxy(b)
    iw = (torch.minimum(a1[..., 2], b1[..., 2]) - torch.maximum(a1[..., 0], b1[..., 0])).clamp(min=0)
    ih = (torch.minimum(a1[..., 3], b1[..., 3]) - torch.maximum(a1[..., 1], b1[..., 1])).clamp(min=0)
    inter = iw * ih
    union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter + eps
    iou = inter / union
    if kind == "iou":
        return iou
    cw = torch.maximum(a1[..., 2], b1[..., 2]) - torch.minimum(a1[..., 0], b1[..., 0])
    ch = torch.maximum(a1[..., 3], b1[..., 3]) - torch.minimum(a1[..., 1], b1[..., 1])
    if kind == "giou":
        c_area = cw * ch + eps
        return iou - (c_area - union) / c_area
    c2 = cw ** 2 + ch ** 2 + eps
    rho2 = (a[..., 0] - b[..., 0]) ** 2 + (a[..., 1] - b[..., 1]) ** 2
    if kind == "diou":
        return iou - rho2 / c2
    if kind != "ciou":
        raise ValueError(f"bbox_iou kind must be iou|giou|diou|ciou, got {kind!r}")
    v = (4 / math.pi ** 2) * (torch.atan(a[..., 2] / (a[..., 3] + eps))
                              - torch.atan(b[..., 2] / (b[..., 3] + eps))) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + 1).clamp(min=eps)  # clamp: no 0/0 for identical boxes
    return iou - (rho2 / c2 + v * alpha)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float, classes: torch.Tensor | None = None,
        budget: int = 1 << 22) -> torch.Tensor:
    """Greedy NMS of xyxy boxes (per class when `classes` is given). Returns kept indices by decreasing score.

    Vectorised and exact. Candidate pairs come from a sweep: boxes sorted by (class, x1), each paired with the
    later boxes of its class that start left of its right edge (others cannot overlap), enumerated with tensor
    ops at most `budget` pairs at a time; their IoU is computed and the pairs above `iou` kept. Then
    "kept = not suppressed by a kept higher-scoring box" is iterated to its fixed point (Cluster-NMS, Zheng et
    al. 2021): the recurrence has one solution, the greedy one, reached in (longest suppression chain + 1)
    rounds. Classes are separated by the sort, not by offsetting coordinates: offsets would change the IoU's
    rounding and with it borderline decisions.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = scores.argsort(descending=True, stable=True)  # rank -> box
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    first, second = _overlapping_pairs(boxes.float(), classes, rank, iou, budget)
    return order[_greedy_fixed_point(first, second, len(order))]


def _pair_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """IoU of aligned (P, 4) xyxy pairs: the arithmetic of box_iou, so borderline decisions agree."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (box_area(a) + box_area(b) - inter + eps)


def _overlapping_pairs(b: torch.Tensor, c: torch.Tensor | None, rank: torch.Tensor, iou: float, budget: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Score-rank pairs (higher-scoring, lower-scoring) of same-class boxes whose IoU exceeds `iou`."""
    n, device = len(b), b.device
    x1, x2 = b[:, 0].double(), b[:, 2].double()
    lo = x1.min()
    span = float(torch.maximum(x1, x2).max() - lo) + 2  # keeps each class's sweep keys apart
    base = (c.double() if c is not None else torch.zeros_like(x1)) * span - lo
    sweep = (base + x1).argsort(stable=True)  # by class, then left edge
    keys = (base + x1)[sweep]
    # candidates of position p: positions after p whose x1 is left of p's x2 (+ a margin: extra candidates are
    # harmless, the IoU decides; a missed one would not be)
    end = torch.searchsorted(keys, (base + x2)[sweep] + 1e-3, right=True)
    later = (end - torch.arange(n, device=device) - 1).clamp(min=0)
    total = later.cumsum(0)
    firsts, seconds, start = [], [], 0
    while start < n:  # positions start..stop-1 hold at most `budget` pairs (at least one position)
        before = int(total[start] - later[start])
        stop = max(int(torch.searchsorted(total, before + budget, right=True)), start + 1)
        per_row = later[start:stop]
        p = torch.arange(start, stop, device=device).repeat_interleave(per_row)
        q = p + 1 + torch.arange(len(p), device=device) - (per_row.cumsum(0) - per_row).repeat_interleave(per_row)
        p, q = sweep[p], sweep[q]
        hit = _pair_iou(b[p], b[q]) > iou
        rp, rq = rank[p[hit]], rank[q[hit]]
        firsts.append(torch.minimum(rp, rq))
        seconds.append(torch.maximum(rp, rq))
        start = stop
    return torch.cat(firsts), torch.cat(seconds)


def _greedy_fixed_point(first: torch.Tensor, second: torch.Tensor, n: int) -> torch.Tensor:
    """Boolean keep mask solving keep[j] = not any(keep[i] for pairs (i, j))."""
    keep = torch.ones(n, dtype=torch.bool, device=first.device)
    while True:
        suppressed = torch.zeros_like(keep)
        suppressed[second[keep[first]]] = True
        new = ~suppressed
        if torch.equal(new, keep):
            return keep
        keep = new


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou: float) -> torch.Tensor:
    """NMS within each class (boxes of different classes never suppress each other), all classes at once.

    Returns kept indices by decreasing score.
    """
    return nms(boxes, scores, iou, classes)


def non_max_suppression(pred: torch.Tensor, conf_thres: float = 0.25, iou_thres: float = 0.45,
                        max_det: int = 300, max_nms: int = 10000) -> list[torch.Tensor]:
    """Eval-mode model output (N, B, 5+C) -> per image (n, 6) x1, y1, x2, y2, conf, cls.

    conf = objectness * class score; one box per (anchor, class) above `conf_thres` (multi-label).
    Classes are suppressed separately (`batched_nms`). Boxes stay in the model's input pixels.
    """
    out = []
    for p in pred.detach():
        p = p[p[:, 4] > conf_thres]
        scores = p[:, 5:] * p[:, 4:5]
        i, j = (scores > conf_thres).nonzero(as_tuple=True)
        conf = scores[i, j]
        if len(conf) > max_nms:
            top = conf.topk(max_nms).indices
            i, j, conf = i[top], j[top], conf[top]
        boxes = xywh2xyxy(p[i, :4])
        keep = batched_nms(boxes, conf, j, iou_thres)[:max_det]
        out.append(torch.cat((boxes[keep], conf[keep, None], j[keep, None].to(boxes.dtype)), 1))
    return out
