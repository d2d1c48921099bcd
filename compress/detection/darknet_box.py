"""Darknet's box arithmetic (AlexeyAB `src/box.c`), vectorised: the IoU family and `dx_box_iou`.

These are Darknet's formulas as written, not the textbook ones, because the official weights were trained with
them: `box_diou` subtracts (d/c)^0.6, `dx_box_iou` takes the w/h derivative as `p_dr - p_dl` without the 1/2
(twice the true derivative), its DIoU/CIoU centre term has the opposite sign to the true derivative of the
penalty, and its CIoU aspect term drops the 1/(w^2+h^2) factor. Boxes are `(..., 4)` tensors x, y, w, h
(centre and size, image-normalised). Everything is elementwise; callers pass float64 for headroom.
"""
from __future__ import annotations

import math

import torch

__all__ = ["box_iou", "box_iou_kind", "dx_box_iou"]

Tensor = torch.Tensor


def _edges(b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`to_tblr`: top, bottom, left, right."""
    x, y, w, h = b.unbind(-1)
    return y - h / 2, y + h / 2, x - w / 2, x + w / 2


def _hull(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """`box_c`: width and height of the smallest box holding both."""
    at, ab, al, ar = _edges(a)
    bt, bb, bl, br = _edges(b)
    return torch.maximum(ar, br) - torch.minimum(al, bl), torch.maximum(ab, bb) - torch.minimum(at, bt)


def _inter_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """`box_intersection` (0 when either overlap is negative) and `box_union`."""
    at, ab, al, ar = _edges(a)
    bt, bb, bl, br = _edges(b)
    ow = torch.minimum(ar, br) - torch.maximum(al, bl)
    oh = torch.minimum(ab, bb) - torch.maximum(at, bt)
    inter = torch.where((ow < 0) | (oh < 0), torch.zeros_like(ow), ow * oh)
    return inter, a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    inter, union = _inter_union(a, b)
    ok = (inter != 0) & (union != 0)
    return torch.where(ok, inter / torch.where(ok, union, torch.ones_like(union)), torch.zeros_like(inter))


def box_iou_kind(a: Tensor, b: Tensor, kind: str) -> Tensor:
    """`box_iou_kind`: iou, giou, diou (Darknet's: iou - (d/c)^0.6) or ciou, with box.c's c == 0 guards."""
    iou = box_iou(a, b)
    if kind == "iou":
        return iou
    cw, ch = _hull(a, b)
    if kind == "giou":
        c = cw * ch
        _, union = _inter_union(a, b)
        return torch.where(c == 0, iou, iou - (c - union) / torch.where(c == 0, torch.ones_like(c), c))
    c = cw * cw + ch * ch
    safe_c = torch.where(c == 0, torch.ones_like(c), c)
    d = ((a[..., 0] - b[..., 0]) ** 2 + (a[..., 1] - b[..., 1]) ** 2) / safe_c
    if kind == "diou":
        return torch.where(c == 0, iou, iou - d ** 0.6)
    ar = 4 / math.pi ** 2 * (torch.atan(b[..., 2] / b[..., 3]) - torch.atan(a[..., 2] / a[..., 3])) ** 2
    alpha = ar / (1 - iou + ar + 0.000001)
    return torch.where(c == 0, iou, iou - (d + alpha * ar))


def _iou_partials(pred: Tensor, truth: Tensor) -> dict[str, Tensor]:
    """The shared part of `dx_box_iou`: edges, I, U, the hull, and d(IoU)/d(t, b, l, r) with the min/max picks."""
    pt0, pb0, pl0, pr0 = _edges(pred)
    pt, pb = torch.minimum(pt0, pb0), torch.maximum(pt0, pb0)
    pl, pr = torch.minimum(pl0, pr0), torch.maximum(pl0, pr0)
    tt, tb, tl, tr = _edges(truth)
    zero = torch.zeros_like(pt)
    ih = torch.minimum(pb, tb) - torch.maximum(pt, tt)
    iw = torch.minimum(pr, tr) - torch.maximum(pl, tl)
    inter = iw * ih  # not clamped: box.c multiplies the raw overlaps here
    union = (pb - pt) * (pr - pl) + (tb - tt) * (tr - tl) - inter
    cw = torch.maximum(pr, tr) - torch.minimum(pl, tl)
    ch = torch.maximum(pb, tb) - torch.minimum(pt, tt)
    d_x = {"t": -(pr - pl), "b": pr - pl, "l": -(pb - pt), "r": pb - pt}
    d_i = {"t": torch.where(pt > tt, -iw, zero), "b": torch.where(pb < tb, iw, zero),
           "l": torch.where(pl > tl, -ih, zero), "r": torch.where(pr < tr, ih, zero)}
    d_u = {k: d_x[k] - d_i[k] for k in d_x}
    d_c = {"t": torch.where(pt < tt, -cw, zero), "b": torch.where(pb > tb, cw, zero),
           "l": torch.where(pl < tl, -ch, zero), "r": torch.where(pr > tr, ch, zero)}
    safe_u = torch.where(union > 0, union, torch.ones_like(union))
    p = {k: torch.where(union > 0, (union * d_i[k] - inter * d_u[k]) / (safe_u * safe_u), zero) for k in d_x}
    # "apply grad from prediction min/max for correct corner selection" (sequential in C: b and r keep theirs)
    p["t"] = torch.where(pt0 < pb0, p["t"], p["b"])
    p["l"] = torch.where(pl0 < pr0, p["l"], p["r"])
    return {"p": p, "d_u": d_u, "d_c": d_c, "inter": inter, "union": union, "iw": iw, "ih": ih,
            "gc": cw * ch, "edges": (pt, pb, pl, pr, tt, tb, tl, tr)}


def _distance_terms(pred: Tensor, truth: Tensor, edges: tuple) -> tuple[Tensor, ...]:
    """box.c's DIoU increments to (p_dx, p_dy, p_dw, p_dh), with C from pred's own x/y/w/h (Ct, Cb, Cl, Cr)."""
    pt, pb, pl, pr, tt, tb, tl, tr = edges
    px, py, pw, ph = pred.unbind(-1)
    tx, ty, tw, th = truth.unbind(-1)
    cw = torch.maximum(px + pw / 2, tx + tw / 2) - torch.minimum(px - pw / 2, tx - tw / 2)
    ch = torch.maximum(py + ph / 2, ty + th / 2) - torch.minimum(py - ph / 2, ty - th / 2)
    c = cw * cw + ch * ch
    s = (px - tx) ** 2 + (py - ty) ** 2
    one, zero = torch.ones_like(px), torch.zeros_like(px)
    dcw_dx = torch.where(pr > tr, one, zero) - torch.where(pl < tl, one, zero)
    dcw_dw = torch.where(pr > tr, 0.5 * one, zero) - torch.where(pl < tl, -0.5 * one, zero)
    dch_dy = torch.where(pb > tb, one, zero) - torch.where(pt < tt, one, zero)
    dch_dh = torch.where(pb > tb, 0.5 * one, zero) - torch.where(pt < tt, -0.5 * one, zero)
    c2 = torch.where(c > 0, c * c, one)
    dx = (2 * (tx - px) * c - (2 * cw * dcw_dx) * s) / c2
    dy = (2 * (ty - py) * c - (2 * ch * dch_dy) * s) / c2
    dw = (2 * cw * dcw_dw) * s / c2
    dh = (2 * ch * dch_dh) * s / c2
    return dx, dy, dw, dh, c > 0


def dx_box_iou(pred: Tensor, truth: Tensor, kind: str) -> Tensor:
    """`dx_box_iou(pred, truth, iou_loss)` -> (..., 4) = (p_dx, p_dy, p_dw, p_dh), Darknet's ascent direction."""
    q = _iou_partials(pred, truth)
    p, d_u, d_c, gc = q["p"], q["d_u"], q["d_c"], q["gc"]
    apart = (q["iw"] <= 0) | (q["ih"] <= 0)
    if kind == "giou":
        safe = torch.where(gc > 0, gc * gc, torch.ones_like(gc))
        term = {k: (gc * d_u[k] - q["union"] * d_c[k]) / safe for k in p}
        p = {k: torch.where(apart, term[k], torch.where(gc > 0, p[k] + term[k], p[k])) for k in p}
    dx, dy = p["l"] + p["r"], p["t"] + p["b"]
    dw, dh = p["r"] - p["l"], p["b"] - p["t"]  # box.c: "For dw and dh, we do not divided by 2."
    out = [dx, dy, dw, dh]
    if kind in ("diou", "ciou"):
        terms = list(_distance_terms(pred, truth, q["edges"]))
        c_pos = terms.pop()
        if kind == "ciou":
            diff = torch.atan(truth[..., 2] / truth[..., 3]) - torch.atan(pred[..., 2] / pred[..., 3])
            ar = 4 / math.pi ** 2 * diff * diff
            alpha = ar / (1 - q["inter"] / q["union"] + ar + 0.000001)
            terms[2] = terms[2] + alpha * (8 / math.pi ** 2 * diff * pred[..., 3])
            terms[3] = terms[3] + alpha * (-8 / math.pi ** 2 * diff * pred[..., 2])
        out = [torch.where(apart, t, torch.where(c_pos, o + t, o)) for o, t in zip(out, terms)]
    return torch.stack(out, -1)
