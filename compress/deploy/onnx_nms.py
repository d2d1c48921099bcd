"""End-to-end detection graphs: the eval-mode model followed by ONNX `NonMaxSuppression`.

Outputs (batch-first, fixed `max_det` slots per image, best first, like TensorRT's EfficientNMS):
  boxes (N, max_det, 4) x1, y1, x2, y2 in input pixels; scores (N, max_det) objectness * class score;
  classes (N, max_det) int64; num_dets (N,) int64. Slots past num_dets have score 0.
The selection is the one `compress.detection.boxes.non_max_suppression` makes: one candidate per (box, class) with
score > score_thres (multi-label), classes suppressed separately, then the best `max_det` per image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.detection.boxes import batched_nms, xywh2xyxy
from compress.base.errors import ExportError

__all__ = ["NmsConfig", "EndToEnd", "NMS_OUTPUTS"]

NMS_OUTPUTS = ("boxes", "scores", "classes", "num_dets")


@dataclass(frozen=True)
class NmsConfig:
    iou_thres: float = 0.45
    score_thres: float = 0.25
    max_det: int = 100

    def __post_init__(self) -> None:
        for name in ("iou_thres", "score_thres"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ExportError(f"--{name.replace('_', '-')}={getattr(self, name)} must be in [0, 1]")
        if self.max_det < 1:
            raise ExportError(f"--max-det={self.max_det} must be >= 1")


class _NonMaxSuppression(torch.autograd.Function):
    """ONNX NonMaxSuppression: (N, B, 4) xyxy boxes, (N, C, B) scores -> (K, 3) [batch, class, box] indices.

    The torch forward computes the same selection (so the wrapper also runs eagerly); the export emits the op.
    """

    @staticmethod
    def forward(ctx, boxes: torch.Tensor, scores: torch.Tensor, max_per_class: int, iou: float,  # type: ignore
                thres: float) -> torch.Tensor:
        rows = []
        for b in range(scores.shape[0]):
            c, i = (scores[b] > thres).nonzero(as_tuple=True)
            keep = batched_nms(boxes[b, i], scores[b, c, i], c, iou)
            kept_c, kept_i = c[keep], i[keep]
            for cls in kept_c.unique():
                sel = kept_i[kept_c == cls][:max_per_class]
                rows.append(torch.stack((torch.full_like(sel, b), torch.full_like(sel, int(cls)), sel), 1))
        return torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.long)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_class: int, iou: float, thres: float):  # type: ignore[no-untyped-def]
        const = lambda v, dt: g.op("Constant", value_t=torch.tensor([v], dtype=dt))  # noqa: E731
        return g.op("NonMaxSuppression", boxes, scores, const(max_per_class, torch.long),
                    const(iou, torch.float32), const(thres, torch.float32), center_point_box_i=0)


class EndToEnd(nn.Module):
    """`model` (eval-mode output (N, B, 5+C)) followed by NMS; see the module docstring for the outputs."""

    def __init__(self, model: nn.Module, config: NmsConfig) -> None:
        super().__init__()
        self.model, self.config = model, config

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        p = self.model(x)
        boxes = xywh2xyxy(p[..., :4])
        scores = (p[..., 5:] * p[..., 4:5]).transpose(1, 2).contiguous()        # (N, C, B)
        n, c, nb = scores.shape
        cfg = self.config
        sel = _NonMaxSuppression.apply(boxes, scores, cfg.max_det, cfg.iou_thres, cfg.score_thres)
        bi, ci, ii = sel[:, 0], sel[:, 1], sel[:, 2]
        dense = torch.zeros_like(scores).view(n, c * nb)
        dense = dense.index_put((bi, ci * nb + ii), scores[bi, ci, ii])
        top, flat = dense.topk(min(cfg.max_det, c * nb), dim=1)
        box_idx = flat % nb
        classes = torch.div(flat, nb, rounding_mode="floor")
        out_boxes = boxes.gather(1, box_idx.unsqueeze(-1).expand(-1, -1, 4))
        num = (top > 0).sum(1)
        return out_boxes * (top > 0).unsqueeze(-1).to(out_boxes.dtype), top, classes, num
