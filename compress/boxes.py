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

    Vectorised and exact. Boxes are sorted by class, then score; the pairs (i, j) of one class with i before j
    are enumerated with tensor ops (at most `budget` pairs at a time) and those with IoU > `iou` kept; then
    "kept = not suppressed by a kept earlier box" is iterated to its fixed point (Cluster-NMS, Zheng et al.
    2021): the recurrence has one solution, the greedy one, reached in (longest suppression chain + 1) rounds.
    Classes are separated by the sort (the class-offset trick without offsets: adding offsets to coordinates
    would change the IoU's rounding, and with it borderline decisions); only same-class pairs are computed.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = scores.argsort(descending=True, stable=True)
    if classes is not None:
        order = order[classes[order].argsort(stable=True)]  # class blocks, by score within a block
    b = boxes[order].float()
    first, second = _overlapping_pairs(b, None if classes is None else classes[order], iou, budget)
    kept = order[_greedy_fixed_point(first, second, len(b))]
    return kept if classes is None else kept[scores[kept].argsort(descending=True, stable=True)]


def _pair_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """IoU of aligned (P, 4) xyxy pairs: the arithmetic of box_iou, so borderline decisions agree."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (box_area(a) + box_area(b) - inter + eps)


def _overlapping_pairs(b: torch.Tensor, c: torch.Tensor | None, iou: float, budget: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs (i < j, same class block) of sorted boxes whose IoU exceeds `iou`."""
    n, device = len(b), b.device
    if n * n <= budget:  # the usual case: one dense overlap matrix, fewer and larger tensor ops
        over = (box_iou(b, b) > iou).triu_(diagonal=1)
        if c is not None:
            over &= c[:, None] == c[None, :]
        return over.nonzero(as_tuple=True)
    if c is None:
        block_end = torch.full((n,), n, device=device)
    else:
        counts = torch.unique_consecutive(c, return_counts=True)[1]
        block_end = counts.cumsum(0).repeat_interleave(counts)
    later = block_end - torch.arange(n, device=device) - 1  # same-class boxes after each box
    total = later.cumsum(0)
    firsts, seconds, start = [], [], 0
    while start < n:  # rows start..stop-1 hold at most `budget` pairs (at least one row)
        before = int(total[start] - later[start])
        stop = max(int(torch.searchsorted(total, before + budget, right=True)), start + 1)
        per_row = later[start:stop]
        first = torch.arange(start, stop, device=device).repeat_interleave(per_row)
        offset = (per_row.cumsum(0) - per_row).repeat_interleave(per_row)
        second = first + 1 + torch.arange(len(first), device=device) - offset
        hit = _pair_iou(b[first], b[second]) > iou
        firsts.append(first[hit])
        seconds.append(second[hit])
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
