"""`l.delta` of Darknet's `forward_yolo_layer` (AlexeyAB `src/yolo_layer.c`, `process_batch`), vectorised.

Darknet's two passes, with the order effects kept (its code is sequential; the comments name its functions):
1. Every cell: objectness pushed to 0 (`obj_normalizer * (0 - p)`), dropped (or, with `objectness_smooth`,
   raised to `best_iou - p`) when its box overlaps a truth by more than `ignore_thresh` and one class prob is
   > 0.25; with `truth_thresh` < 1 a cell overlapping a truth by more becomes positive for it (box, class reset).
2. Every truth, in order: its best anchor over all `anchors=` (centred IoU), if in this head's mask, and with
   `iou_thresh` < 1 every other mask anchor whose `iou_thresh_kind` overlap exceeds it, at the centre cell:
   box deltas add up; objectness is set (last truth's class multiplier wins; with `objectness_smooth` only a
   cell whose delta is still 0 is set, by the first); `delta_yolo_class` resets all classes at the first truth
   of a cell and, for a later truth (or after a `truth_thresh` reset), only sets its own class without
   `cls_normalizer`.
3. With `iou_thresh` < 1, every cell with a non-zero objectness delta divides its box delta by the number of
   its classes with a positive delta (`averages_yolo_deltas`).
The delta is then scaled by `delta_normalizer` (Darknet's GPU backward). Truths with a class outside the head's
classes are skipped, as Darknet skips them; only the first `max` truths of an image count.

Two differences, both at inputs Darknet itself mishandles: Darknet stops reading an image's truths at the first
with x == 0 (the end of its zero padding), where we read them all; a truth at x or y == 1.0 makes Darknet
write past the end of its row (cell index w), where we use the last cell.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compress.base.errors import CompressError
from compress.detection.darknet_box import box_iou, box_iou_kind, dx_box_iou

__all__ = ["DarknetHeadOptions", "IOU_KINDS", "IOU_LOSSES", "head_delta"]

Tensor = torch.Tensor
CLASS_MATCH_PROB = 0.25  # compare_yolo_class's threshold for the ignore rule
IOU_LOSSES = ("mse", "iou", "giou", "diou", "ciou")
IOU_KINDS = ("iou", "giou", "diou", "ciou")

@dataclass(frozen=True)
class DarknetHeadOptions:
    """The training keys of one `[yolo]` block (Darknet's defaults). `anchors`: all `num` pairs, in pixels."""
    where: str
    anchors: tuple[tuple[float, float], ...]
    mask: tuple[int, ...]
    classes: int = 20
    ignore_thresh: float = 0.5
    truth_thresh: float = 1.0
    iou_thresh: float = 1.0
    iou_thresh_kind: str = "iou"
    iou_normalizer: float = 0.75
    cls_normalizer: float = 1.0
    obj_normalizer: float = 1.0
    delta_normalizer: float = 1.0
    iou_loss: str = "mse"
    scale_x_y: float = 1.0
    new_coords: bool = False
    label_smooth_eps: float = 0.0
    objectness_smooth: bool = False
    max_delta: float = math.inf
    focal_loss: bool = False
    class_multipliers: tuple[float, ...] | None = None
    max_boxes: int = 200

    def __post_init__(self) -> None:
        if self.iou_loss not in IOU_LOSSES:
            raise CompressError(f"{self.where}: [yolo] iou_loss={self.iou_loss} is not one of "
                                f"{', '.join(IOU_LOSSES)} (Darknet reads them case-sensitively and trains any "
                                "other value as iou); fix the cfg")
        if self.iou_thresh_kind not in IOU_KINDS:
            raise CompressError(f"{self.where}: [yolo] iou_thresh_kind={self.iou_thresh_kind} is not one of "
                                f"{', '.join(IOU_KINDS)}; fix the cfg")
        for name in ("iou_normalizer", "cls_normalizer", "obj_normalizer", "ignore_thresh", "truth_thresh",
                     "iou_thresh", "label_smooth_eps", "max_delta"):
            if getattr(self, name) < 0:
                raise CompressError(f"{self.where}: [yolo] {name}={getattr(self, name)} must be >= 0")
        bad = [m for m in self.mask if not 0 <= m < len(self.anchors)]
        if bad:
            raise CompressError(f"{self.where}: [yolo] mask {bad} has no anchor (anchors= lists "
                                f"{len(self.anchors)}); fix mask= or anchors=")
        if self.class_multipliers is not None and len(self.class_multipliers) != self.classes:
            raise CompressError(f"{self.where}: [yolo] counters_per_class lists {len(self.class_multipliers)} "
                                f"values for classes={self.classes}; list one count per class")




def head_delta(p: Tensor, targets: Tensor, o: DarknetHeadOptions, img_hw: tuple[int, int]) -> Tensor:
    """Darknet's delta for one head map `p` (N, A, H, W, 5 + C) and targets (M, 6) [image, class, x, y, w, h]."""
    n, na, h, w, _ = p.shape
    net = (img_hw[1], img_hw[0])
    out = _activate(p, o)
    truths = _usable_truths(targets, o, n)
    delta = torch.zeros_like(p)
    cm = torch.tensor(o.class_multipliers or [1.0] * o.classes, device=p.device)
    pred = _decode(p, out, o, net)
    best_iou, best_t = _best_overlaps(pred, truths, n)
    thresh_cells = _first_pass(delta, out, best_iou, best_t, truths, o, cm)
    events = _anchor_events(truths, o, net, (h, w))
    _second_pass(delta, out, truths, events, thresh_cells, o, cm)
    box_cells, box_truth, box_anchor = _box_pairs(thresh_cells, best_t, events, o)
    if len(box_cells[0]):
        mult = o.iou_normalizer * cm[truths[box_truth, 1].long()]
        contrib = _box_deltas(p, out, box_cells, truths[box_truth, 2:6], box_anchor, mult, o, net)
        flat = delta.view(-1, delta.shape[-1])
        b, a, j, i = box_cells
        flat[:, :4].index_put_((((b * na + a) * h + j) * w + i,), contrib, accumulate=True)
    if o.iou_thresh < 1.0:
        _average_box_deltas(delta)
    return delta * o.delta_normalizer


def _activate(p: Tensor, o: DarknetHeadOptions) -> Tensor:
    """`l.output` of forward_yolo_layer: logistic on x, y, obj, classes (not with new_coords), x/y scaled."""
    out = p.clone() if o.new_coords else torch.cat((torch.sigmoid(p[..., :2]), p[..., 2:4],
                                                    torch.sigmoid(p[..., 4:])), -1)
    s = o.scale_x_y
    out[..., :2] = out[..., :2] * s - 0.5 * (s - 1)
    return out


def _usable_truths(targets: Tensor, o: DarknetHeadOptions, n: int) -> Tensor:
    """Targets of classes this head knows, at most `max` per image (first ones), in their given order."""
    keep = (targets[:, 1] >= 0) & (targets[:, 1] < o.classes) & (targets[:, 0] < n)
    targets = targets[keep]
    if len(targets) > o.max_boxes:
        rank = torch.zeros(len(targets), dtype=torch.long, device=targets.device)
        for b in targets[:, 0].unique():
            idx = (targets[:, 0] == b).nonzero().flatten()
            rank[idx] = torch.arange(len(idx), device=targets.device)
        targets = targets[rank < o.max_boxes]
    return targets


def _decode(p: Tensor, out: Tensor, o: DarknetHeadOptions, net: tuple[int, int]) -> Tensor:
    """`get_yolo_box` for every cell: (N, A, H, W, 4) image-normalised x, y, w, h."""
    n, na, h, w, _ = p.shape
    gy, gx = torch.meshgrid(torch.arange(h, device=p.device), torch.arange(w, device=p.device), indexing="ij")
    anchors = torch.tensor([o.anchors[m] for m in o.mask], device=p.device).view(1, na, 1, 1, 2)
    wh = 4 * p[..., 2:4] * p[..., 2:4] if o.new_coords else torch.exp(p[..., 2:4])
    wh = wh * anchors / torch.tensor(net, device=p.device, dtype=p.dtype)
    return torch.stack(((gx + out[..., 0]) / w, (gy + out[..., 1]) / h, wh[..., 0], wh[..., 1]), -1)


def _best_overlaps(pred: Tensor, truths: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Per cell: the best IoU with a truth of its image and that truth's row in `truths` (the first on ties)."""
    best_iou = torch.zeros(pred.shape[:4], device=pred.device)
    best_t = torch.zeros(pred.shape[:4], dtype=torch.long, device=pred.device)
    for b in truths[:, 0].unique().long().tolist():
        idx = (truths[:, 0] == b).nonzero().flatten()
        iou = box_iou(pred[b].unsqueeze(-2), truths[idx, 2:6])  # (A, H, W, T)
        value, arg = iou.max(-1)
        best_iou[b], best_t[b] = value, idx[arg]
    return best_iou, best_t


def _class_reset(out_cls: Tensor, c: Tensor, o: DarknetHeadOptions, cm: Tensor) -> Tensor:
    """`delta_yolo_class` on a cell whose true-class delta is 0: every class's delta, (K, C)."""
    onehot = torch.nn.functional.one_hot(c, o.classes).to(out_cls.dtype)
    if o.focal_loss:  # alpha 0.5, gamma 2 (yolo_layer.c: focal branch; no smoothing, no multipliers)
        pt = out_cls.gather(1, c[:, None]) + 0.000000000000001
        grad = -(1 - pt) * (2 * pt * torch.log(pt) + pt - 1)
        return (onehot - out_cls) * (0.5 * grad)
    y = onehot * (1 - o.label_smooth_eps) + 0.5 * o.label_smooth_eps if o.label_smooth_eps else onehot
    d = y - out_cls
    if o.class_multipliers is not None:  # cls_normalizer only here, and only for the true class
        d = d * (1 + onehot * (cm[c][:, None] * o.cls_normalizer - 1))
    return d


def _class_set(out_c: Tensor, c: Tensor, o: DarknetHeadOptions, cm: Tensor) -> Tensor:
    """`delta_yolo_class` when the true class's delta is already non-zero: only that class, no cls_normalizer."""
    y = 1 - o.label_smooth_eps + 0.5 * o.label_smooth_eps if o.label_smooth_eps else 1.0
    d = y - out_c
    return d * cm[c] if o.class_multipliers is not None else d


def _first_pass(delta: Tensor, out: Tensor, best_iou: Tensor, best_t: Tensor, truths: Tensor,
                o: DarknetHeadOptions, cm: Tensor) -> tuple[Tensor, ...]:
    """Objectness of every cell (ignore rule) and the truth_thresh positives; returns those cells."""
    obj = out[..., 4]
    best_match = best_iou * (out[..., 5:] > CLASS_MATCH_PROB).any(-1)
    d_obj = o.obj_normalizer * (0 - obj)
    ignored = best_match > o.ignore_thresh
    if o.objectness_smooth:
        d_obj = torch.where(ignored, torch.maximum(d_obj, o.obj_normalizer * (best_match - obj)), d_obj)
    else:
        d_obj = torch.where(ignored, torch.zeros_like(d_obj), d_obj)
    delta[..., 4] = d_obj
    cells = (best_iou > o.truth_thresh).nonzero(as_tuple=True)
    if not len(cells[0]):
        return cells
    iou2 = best_iou[cells] ** 2
    delta[cells + (4,)] = o.obj_normalizer * ((iou2 if o.objectness_smooth else 1.0) - obj[cells])
    c = truths[best_t[cells], 1].long()
    d_cls = _class_reset(out[cells][:, 5:], c, o, cm)
    if o.objectness_smooth:
        rows = torch.arange(len(c), device=c.device)
        d_cls[rows, c] = cm[c] * (iou2 - out[cells][rows, 5 + c])
    delta[..., 5:][cells] = d_cls
    return cells


def _anchor_events(truths: Tensor, o: DarknetHeadOptions, net: tuple[int, int],
                   hw: tuple[int, int]) -> dict[str, Tensor]:
    """Second pass's (truth, mask anchor) pairs in Darknet's order: truth by truth, its best anchor first, then
    the mask's other anchors above iou_thresh by anchor index. Keys: t, b, a (mask index), n (anchor), j, i, order."""
    dev = truths.device
    total = len(o.anchors)
    anchors = torch.tensor(o.anchors, device=dev) / torch.tensor(net, device=dev, dtype=torch.float32)
    zeros = torch.zeros(len(truths), total, 2, device=dev)
    shift = torch.cat((zeros, truths[:, None, 4:6].expand(-1, total, -1)), -1)
    anchor_boxes = torch.cat((zeros, anchors[None].expand(len(truths), -1, -1)), -1)
    best = box_iou(anchor_boxes, shift).max(-1).indices  # first of equal maxima, as the strict > in C
    pos = torch.full((total,), -1, dtype=torch.long, device=dev)
    for k in reversed(range(len(o.mask))):  # int_index: the first mask entry naming the anchor
        pos[o.mask[k]] = k
    pairs = [(torch.arange(len(truths), device=dev), best, torch.zeros_like(best))]
    if o.iou_thresh < 1.0:
        over = box_iou_kind(anchor_boxes, shift, o.iou_thresh_kind) > o.iou_thresh
        over &= (pos >= 0)[None] & (torch.arange(total, device=dev)[None] != best[:, None])
        t, nn_ = over.nonzero(as_tuple=True)
        pairs.append((t, nn_, nn_ + 1))
    t, anchor, rank = (torch.cat(x) for x in zip(*pairs))
    keep = pos[anchor] >= 0
    t, anchor, rank = t[keep], anchor[keep], rank[keep]
    h, w = hw
    # (int)(truth.x * l.w); Darknet does not clamp (x == 1 writes past the row), we keep the last cell
    i = (truths[t, 2] * w).long().clamp(0, w - 1)
    j = (truths[t, 3] * h).long().clamp(0, h - 1)
    return {"t": t, "b": truths[t, 0].long(), "a": pos[anchor], "n": anchor, "j": j, "i": i,
            "order": t * (total + 1) + rank}


def _second_pass(delta: Tensor, out: Tensor, truths: Tensor, ev: dict[str, Tensor], thresh_cells: tuple,
                 o: DarknetHeadOptions, cm: Tensor) -> None:
    """Objectness and class deltas of the truths' cells, with Darknet's first/last-writer rules."""
    if not len(ev["t"]):
        return
    n, na, h, w, ch = delta.shape
    cell = ((ev["b"] * na + ev["a"]) * h + ev["j"]) * w + ev["i"]
    order = torch.argsort(cell * (ev["order"].max() + 1) + ev["order"])
    cell, t = cell[order], ev["t"][order]
    c = truths[t, 1].long()
    first = torch.ones_like(cell, dtype=torch.bool)
    first[1:] = cell[1:] != cell[:-1]
    last = torch.ones_like(first)
    last[:-1] = cell[1:] != cell[:-1]
    flat, flat_out = delta.view(-1, ch), out.reshape(-1, ch)
    if o.objectness_smooth:  # only a cell whose objectness delta is still exactly 0, by its first truth
        sel = first & (flat[cell, 4] == 0)
    else:                    # every truth overwrites: the last one's class multiplier stays
        sel = last
    flat[cell[sel], 4] = cm[c[sel]] * o.obj_normalizer * (1 - flat_out[cell[sel], 4])
    had_reset = torch.zeros(n * na * h * w, dtype=torch.bool, device=delta.device)
    if len(thresh_cells[0]):
        tb, ta, tj, ti = thresh_cells
        had_reset[((tb * na + ta) * h + tj) * w + ti] = True
    reset = first & ~had_reset[cell]
    flat[cell[reset], 5:] = _class_reset(flat_out[cell[reset], 5:], c[reset], o, cm)
    rest = ~reset
    flat[cell[rest], 5 + c[rest]] = _class_set(flat_out[cell[rest], 5 + c[rest]], c[rest], o, cm)


def _box_pairs(thresh_cells: tuple, best_t: Tensor, ev: dict[str, Tensor],
               o: DarknetHeadOptions) -> tuple[tuple[Tensor, ...], Tensor, Tensor]:
    """Every (cell, truth, anchor) whose box delta Darknet accumulates: truth_thresh cells, then the events."""
    mask = torch.tensor(o.mask, device=best_t.device)
    b, a, j, i = thresh_cells
    cells = tuple(torch.cat((x, ev[k])) for x, k in zip((b, a, j, i), ("b", "a", "j", "i")))
    return cells, torch.cat((best_t[thresh_cells], ev["t"])), torch.cat((mask[a], ev["n"]))


def _box_deltas(p: Tensor, out: Tensor, cells: tuple, truth: Tensor, anchor: Tensor, mult: Tensor,
                o: DarknetHeadOptions, net: tuple[int, int]) -> Tensor:
    """`delta_yolo_box` for K (cell, truth, anchor) triples -> (K, 4) to add to the cell's x, y, w, h deltas."""
    n, na, h, w, _ = p.shape
    raw, act = p[cells][:, :4], out[cells][:, :2]
    b, a, j, i = cells
    anc = torch.tensor(o.anchors, device=p.device)[anchor]
    net_t = torch.tensor(net, device=p.device, dtype=p.dtype)
    if o.iou_loss == "mse":  # no max_delta clip, no nan fix on this branch
        txy = truth[:, :2] * torch.tensor([w, h], device=p.device, dtype=p.dtype) - torch.stack((i, j), 1)
        if o.new_coords:
            twh = torch.sqrt(truth[:, 2:4] * net_t / (4 * anc))
        else:
            twh = torch.log(truth[:, 2:4] * net_t / anc)
        scale = (2 - truth[:, 2] * truth[:, 3])[:, None]
        return torch.cat((scale * (txy - act) * mult[:, None], scale * (twh - raw[:, 2:4]) * mult[:, None]), 1)
    wh = 4 * raw[:, 2:4] * raw[:, 2:4] if o.new_coords else torch.exp(raw[:, 2:4])
    wh = wh * anc / net_t
    wh = torch.where(wh == 0, torch.ones_like(wh), wh)  # "avoid nan in dx_box_iou"
    pred = torch.cat(((torch.stack((i, j), 1) + act) / torch.tensor([w, h], device=p.device, dtype=p.dtype), wh), 1)
    d = dx_box_iou(pred, truth, o.iou_loss)
    if not o.new_coords:  # "apply gradient of e^delta_t ONLY for w,h"
        d = torch.cat((d[:, :2], d[:, 2:4] * torch.exp(raw[:, 2:4])), 1)
    d = d * mult[:, None]
    d = torch.where(torch.isfinite(d), d, torch.zeros_like(d))  # fix_nan_inf
    if math.isfinite(o.max_delta):
        d = d.clamp(-o.max_delta, o.max_delta)
    return d


def _average_box_deltas(delta: Tensor) -> None:
    """`averages_yolo_deltas` on every cell with a non-zero objectness delta."""
    count = (delta[..., 5:] > 0).sum(-1)
    sel = (delta[..., 4] != 0) & (count > 0)
    delta[..., :4][sel] = delta[..., :4][sel] / count[sel][:, None].to(delta.dtype)
