"""Distillation losses as pure functions of tensors: the reference project's strategies, with the bugs listed
in its notes (../shared/docs/reference-algorithms.md §10.12) fixed.

Shapes: raw head maps are (N, A, H, W, 5+C): logits, or probabilities for a `new_coords=1` head (scaled-YOLOv4,
YOLOv7: the conv before it applied the logistic). `head_logits` turns the latter into logits before any logit
term, so sigmoid(.) gives back the head's own probabilities and every KL compares probabilities; box terms decode
each head with its own formula (`decode_cell_boxes`). Features are (N, C, H, W). Positive cells come from the
student's `build_targets` as `HeadPositives`. Every KL term is `KL(p_t || p_s)` summed and scaled by T^2 / N
(Hinton et al.), as in the reference; box terms are sums over positives / N too, so every term is per image
(fit() multiplies the loss by the batch size, like its detection parts). Teacher tensors are expected to carry
no graph (computed under no_grad).

Strategies return their terms *unweighted* (`kd_soft`, `kd_box`, `kd_feat`); `DistillHook` weighs them (fixed
weights, or weights calibrated against the detection loss at the start of training).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from compress.detection.losses import decode_cell_boxes
from compress.distill.config import DistillConfig
from compress.distill.imitate import LstsqAdapter

__all__ = ["HeadPositives", "KDInputs", "STRATEGIES", "register_strategy", "soft_kl", "sigmoid_kl", "kd_logit_loss",
           "kd_sigmoid_loss", "decode_positive_boxes", "kd_box_teacher_bounded", "kd_box_mimic", "attention_map",
           "head_logits", "kd_attention_loss", "at_map", "kd_at_loss", "fine_grained_mask"]


class HeadPositives(NamedTuple):
    """Positive cells of one head: indices (n,), GT boxes (n, 4) xywh with xy relative to the cell and wh in
    grid units, and each positive's anchor size in grid units for the student and the teacher (n, 2)."""
    b: Tensor
    a: Tensor
    gy: Tensor
    gx: Tensor
    tbox: Tensor
    anchors_s: Tensor
    anchors_t: Tensor


@dataclass(frozen=True)
class KDInputs:
    """Everything a strategy reads: paired head maps, positives per head, paired features, input size."""
    s_heads: list[Tensor]
    t_heads: list[Tensor]
    positives: list[HeadPositives] | None
    features: list[tuple[Tensor, Tensor]]
    img_hw: tuple[int, int]
    scales: tuple[tuple[float, float], ...] = ()  # (student, teacher) scale_x_y per head
    new_coords: tuple[tuple[bool, bool], ...] = ()  # (student, teacher) per head: the map holds probabilities
    adapters: tuple[LstsqAdapter, ...] = ()  # one per feature pair, for feature="fitnet" (none: fit per batch)


def soft_kl(s_logits: Tensor, t_logits: Tensor, temperature: float, batch: int) -> Tensor:
    """sum KL(softmax(t/T) || softmax(s/T)) over rows of the last axis, times T^2 / batch."""
    log_ps = F.log_softmax(s_logits / temperature, dim=-1)
    log_pt = F.log_softmax(t_logits / temperature, dim=-1)
    return F.kl_div(log_ps, log_pt, reduction="sum", log_target=True) * temperature ** 2 / batch


def kd_logit_loss(s_heads: list[Tensor], t_heads: list[Tensor], temperature: float,
                  reference: bool = False) -> Tensor:
    """Hinton KD on [objectness, classes] per cell and anchor (box logits excluded); `reference=True`
    softmaxes the whole 5+C vector like the reference's KDstr 1."""
    first = 0 if reference else 4
    return sum(soft_kl(s[..., first:], t[..., first:], temperature, s.shape[0]) for s, t in zip(s_heads, t_heads))


def sigmoid_kl(s_logits: Tensor, t_logits: Tensor, temperature: float, weight: Tensor | None = None) -> Tensor:
    """Sum over elements of the binary KL(Bern(sigmoid(t/T)) || Bern(sigmoid(s/T))) times T^2, each element
    optionally multiplied by `weight` (broadcast). Exactly 0 where s == t."""
    s, t = s_logits / temperature, t_logits / temperature
    pt = torch.sigmoid(t)
    kl = pt * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - pt) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    if weight is not None:
        kl = kl * weight
    return kl.sum() * temperature ** 2


def kd_sigmoid_loss(s_heads: list[Tensor], t_heads: list[Tensor], temperature: float,
                    confidence: bool = True) -> Tensor:
    """Per-element sigmoid KD, per image: objectness at every cell and anchor, plus each class; with
    `confidence` a cell's class terms are weighted by the teacher's objectness probability sigmoid(t_obj)."""
    total = s_heads[0].new_zeros(())
    for s, t in zip(s_heads, t_heads):
        w = torch.sigmoid(t[..., 4:5]) if confidence else None
        total = total + sigmoid_kl(s[..., 4], t[..., 4], temperature) + sigmoid_kl(s[..., 5:], t[..., 5:],
                                                                                   temperature, w)
    return total / s_heads[0].shape[0]


PROB_EPS = 1e-6  # probabilities are clamped to [eps, 1 - eps] before the logit (float32 saturates at 1 - 6e-8)


def head_logits(p: Tensor, new_coords: bool) -> Tensor:
    """A head map as logits: unchanged for a classic head; logit(p) for a new_coords head, whose map already holds
    sigmoid outputs (treating those as logits would compare sigmoid(p), squeezed into [0.5, 0.73])."""
    return torch.logit(p.clamp(PROB_EPS, 1 - PROB_EPS)) if new_coords else p


def _head_flags(x: "KDInputs") -> tuple[tuple[bool, bool], ...]:
    return x.new_coords or ((False, False),) * len(x.s_heads)


def _logit_term(x: "KDInputs", config: DistillConfig) -> Tensor:
    flags = _head_flags(x)
    s_heads = [head_logits(s, ns) for s, (ns, _) in zip(x.s_heads, flags)]
    t_heads = [head_logits(t, nt) for t, (_, nt) in zip(x.t_heads, flags)]
    if config.reference_kd1 or config.logits == "softmax":
        return kd_logit_loss(s_heads, t_heads, config.temperature, config.reference_kd1)
    return kd_sigmoid_loss(s_heads, t_heads, config.temperature, config.confidence)


def decode_positive_boxes(p: Tensor, pos: HeadPositives, anchors: Tensor, scale_x_y: float = 1.0,
                          new_coords: bool = False) -> Tensor:
    """Boxes (n, 4) at the positive cells in grid units, the model's formula (`YOLOLayer.decode`):
    (sigma(tx) * s - (s - 1) / 2, sigma(ty) * s - (s - 1) / 2, e^tw * aw, e^th * ah), or for a new_coords head
    (px * s - (s - 1) / 2, py * s - (s - 1) / 2, (2 pw)^2 * aw, (2 ph)^2 * ah)."""
    return decode_cell_boxes(p[pos.b, pos.a, pos.gy, pos.gx, :4], anchors, scale_x_y, new_coords)


def kd_box_teacher_bounded(box_s: Tensor, box_t: Tensor, gt: Tensor, margin: float = 0.0) -> tuple[Tensor, Tensor]:
    """Chen et al. 2017: sum of ||box_s - gt||^2 over positives where it exceeds ||box_t - gt||^2 - margin.

    Returns (loss, fraction of positives where the bound was active). With margin 0 the inequality is strict,
    so a student equal to its teacher gets exactly 0.
    """
    d_s = ((box_s - gt) ** 2).sum(1)
    d_t = ((box_t - gt) ** 2).sum(1).detach()
    active = (d_s + margin > d_t).to(d_s.dtype)
    frac = active.mean() if active.numel() else d_s.new_zeros(())
    return (d_s * active).sum(), frac.detach()


def kd_box_mimic(box_s: Tensor, box_t: Tensor) -> Tensor:
    """sum ||box_s - box_t||^2 over positives (the student regresses onto the teacher's boxes)."""
    return ((box_s - box_t.detach()) ** 2).sum()


def attention_map(f: Tensor, reduce: str = "mean") -> Tensor:
    """(N, C, H, W) -> (N, H*W): |F| reduced over channels. "mean" (ours) keeps the map's scale independent of
    the channel count, so pruned or narrower students are comparable; "sum" is the reference's map."""
    att = f.abs()
    return (att.sum(1) if reduce == "sum" else att.mean(1)).flatten(1)


def kd_attention_loss(f_s: Tensor, f_t: Tensor, temperature: float, mask: Tensor | None = None,
                      reduce: str = "mean") -> Tensor:
    """KL between the softmax(att/T) spatial distributions of paired features, times T^2 / N. `mask`
    (N, H, W) multiplies both maps before the softmax (masked cells stay in it as zeros, as in the reference);
    `reduce`: the channel reduction of `attention_map`."""
    if f_s.shape[-2:] != f_t.shape[-2:]:
        raise ValueError(f"paired features differ in size: student {tuple(f_s.shape)} vs teacher {tuple(f_t.shape)}")
    att_s, att_t = attention_map(f_s, reduce), attention_map(f_t, reduce)
    if mask is not None:
        m = mask.flatten(1).to(att_s.dtype)
        att_s, att_t = att_s * m, att_t * m
    return soft_kl(att_s, att_t, temperature, f_s.shape[0])


def at_map(f: Tensor, mask: Tensor | None = None) -> Tensor:
    """(N, C, H, W) -> (N, H*W) spatial attention mean_c F^2 (optionally masked), L2-normalised per image, so the
    map's scale is independent of channel count and activation size (Zagoruyko & Komodakis 2017)."""
    att = f.pow(2).mean(1).flatten(1)
    if mask is not None:
        att = att * mask.flatten(1).to(att.dtype)
    return F.normalize(att, dim=1, eps=1e-12)


def kd_at_loss(f_s: Tensor, f_t: Tensor, mask: Tensor | None = None) -> Tensor:
    """sum over images of ||at_s - at_t||^2 / N (each in [0, 2] for non-negative unit maps)."""
    if f_s.shape[-2:] != f_t.shape[-2:]:
        raise ValueError(f"paired features differ in size: student {tuple(f_s.shape)} vs teacher {tuple(f_t.shape)}")
    return (at_map(f_s, mask) - at_map(f_t, mask)).pow(2).sum() / f_s.shape[0]


def _feature_term(x: KDInputs, i: int, config: DistillConfig, mask: Tensor | None = None) -> Tensor:
    fs, ft = x.features[i]
    if config.feature == "softmax":
        return kd_attention_loss(fs, ft, config.temperature, mask, config.attention)
    if config.feature == "fitnet":  # without adapters (no history): fitted on this batch alone
        if x.adapters and len(x.adapters) != len(x.features):
            raise ValueError("feature='fitnet' needs one LstsqAdapter per feature pair (KDInputs.adapters)")
        adapter = x.adapters[i] if x.adapters else LstsqAdapter(momentum=0.0)
        return adapter.loss(fs, ft, mask)
    return kd_at_loss(fs, ft, mask)


def fine_grained_mask(positives: list[HeadPositives], head_hw: list[tuple[int, int]], feat_hw: tuple[int, int],
                      batch: int, device: torch.device | str = "cpu") -> Tensor:
    """(N, Hf, Wf) 0/1 mask of the feature cells covered by any head's positive cells.

    Each positive cell (gy, gx) of a head of size (H, W) spans rows [gy*Hf/H, (gy+1)*Hf/H) and columns
    [gx*Wf/W, (gx+1)*Wf/W) of the feature map; the whole covered block is set (not a diagonal). Works for
    non-square inputs and any head order because only the map sizes are used (stride = img / size).
    """
    hf, wf = feat_hw
    mask = torch.zeros(batch, hf, wf, device=device)
    for pos, (h, w) in zip(positives, head_hw):
        if pos.b.numel() == 0:
            continue
        y0, y1 = _span(pos.gy, h, hf)
        x0, x1 = _span(pos.gx, w, wf)
        for dy in range(int((y1 - y0).max())):
            for dx in range(int((x1 - x0).max())):
                ys, xs = y0 + dy, x0 + dx
                ok = (ys < y1) & (xs < x1)
                mask[pos.b[ok], ys[ok], xs[ok]] = 1.0
    return mask


def _span(g: Tensor, n: int, nf: int) -> tuple[Tensor, Tensor]:
    """Cells [lo, hi) of a size-nf axis covered by cell g of a size-n axis (exact integer arithmetic)."""
    g = g.long()
    lo = (g * nf) // n
    hi = -((-(g + 1) * nf) // n)  # ceil((g + 1) * nf / n)
    return lo.clamp(0, nf - 1), hi.clamp(1, nf)


# ---------------------------------------------------------------- strategies (registry, one function each)
StrategyFn = Callable[[KDInputs, DistillConfig], dict[str, Tensor]]
STRATEGIES: dict[int, StrategyFn] = {}


def register_strategy(k: int) -> Callable[[StrategyFn], StrategyFn]:
    def deco(fn: StrategyFn) -> StrategyFn:
        STRATEGIES[k] = fn
        return fn
    return deco


@register_strategy(1)
def strategy_logits(x: KDInputs, config: DistillConfig) -> dict[str, Tensor]:
    return {"kd_soft": _logit_term(x, config)}


def _boxes(x: KDInputs) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(student boxes, teacher boxes, GT boxes) at the positives of each head."""
    if x.positives is None:
        raise ValueError("box distillation needs the positive cells of build_targets")
    scales = x.scales or ((1.0, 1.0),) * len(x.s_heads)
    return [(decode_positive_boxes(s, pos, pos.anchors_s, ss, ns), decode_positive_boxes(t, pos, pos.anchors_t, ts, nt),
             pos.tbox) for s, t, pos, (ss, ts), (ns, nt) in zip(x.s_heads, x.t_heads, x.positives, scales,
                                                                 _head_flags(x))]


@register_strategy(2)
def strategy_teacher_bounded(x: KDInputs, config: DistillConfig) -> dict[str, Tensor]:
    parts = [kd_box_teacher_bounded(bs, bt, gt, config.box_margin) for bs, bt, gt in _boxes(x)]
    box = sum(p[0] for p in parts) / x.s_heads[0].shape[0]
    frac = torch.stack([p[1] for p in parts]).mean()
    return {"kd_soft": _logit_term(x, config), "kd_box": box, "kd_bounded_frac": frac.detach()}


@register_strategy(3)
def strategy_mimic(x: KDInputs, config: DistillConfig) -> dict[str, Tensor]:
    box = sum(kd_box_mimic(bs, bt) for bs, bt, _ in _boxes(x)) / x.s_heads[0].shape[0]
    return {"kd_soft": _logit_term(x, config), "kd_box": box}


@register_strategy(4)
def strategy_attention(x: KDInputs, config: DistillConfig) -> dict[str, Tensor]:
    feat = sum(_feature_term(x, i, config) for i in range(len(x.features)))
    return {**strategy_mimic(x, config), "kd_feat": feat}


@register_strategy(5)
def strategy_masked_attention(x: KDInputs, config: DistillConfig) -> dict[str, Tensor]:
    head_hw = [tuple(s.shape[2:4]) for s in x.s_heads]
    feat = x.s_heads[0].new_zeros(())
    for i, (fs, _) in enumerate(x.features):
        mask = fine_grained_mask(x.positives or [], head_hw, tuple(fs.shape[-2:]), fs.shape[0], fs.device)
        feat = feat + _feature_term(x, i, config, mask)
    return {**strategy_mimic(x, config), "kd_feat": feat}
