"""Training augmentation: mosaic, random affine (scale/translate), HSV jitter, horizontal flip.

Every function takes an explicit `numpy.random.Generator`, so a (seed, epoch, index) triple fixes the
result. Boxes travel as pixel xyxy arrays `(n, 5)` = cls, x1, y1, x2, y2 between the steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .errors import DataError

if TYPE_CHECKING:
    from .data import DetectionDataset

__all__ = ["AugmentConfig", "augment_item", "hsv_jitter", "flip_lr", "random_affine", "mosaic4",
           "to_pixel_xyxy", "to_norm_xywh"]


@dataclass(frozen=True)
class AugmentConfig:
    hsv_h: float = 0.015     # hue gain range (fraction)
    hsv_s: float = 0.7       # saturation gain range
    hsv_v: float = 0.4       # value gain range
    fliplr: float = 0.5      # probability of a horizontal flip
    translate: float = 0.1   # +- fraction of the image size
    scale: float = 0.5       # scale gain in [1 - scale, 1 + scale]
    mosaic: float = 0.0      # probability of a 4-image mosaic
    min_box_px: float = 2.0  # boxes narrower/shorter than this after the affine are dropped

    def __post_init__(self) -> None:
        for name in ("hsv_h", "hsv_s", "hsv_v", "fliplr", "translate", "mosaic"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DataError(f"AugmentConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.scale < 1.0:
            raise DataError(f"AugmentConfig.scale must be in [0, 1), got {self.scale}")


def to_pixel_xyxy(labels: np.ndarray, w: float, h: float, ratio: float = 1.0,
                  pad: tuple[float, float] = (0, 0)) -> np.ndarray:
    """Normalised (n,5) cls,cx,cy,w,h of a w x h image -> pixel cls,x1,y1,x2,y2 after scaling by ratio + pad."""
    out = labels.copy()
    out[:, 1] = (labels[:, 1] - labels[:, 3] / 2) * w * ratio + pad[0]
    out[:, 2] = (labels[:, 2] - labels[:, 4] / 2) * h * ratio + pad[1]
    out[:, 3] = (labels[:, 1] + labels[:, 3] / 2) * w * ratio + pad[0]
    out[:, 4] = (labels[:, 2] + labels[:, 4] / 2) * h * ratio + pad[1]
    return out


def to_norm_xywh(boxes: np.ndarray, size: int) -> np.ndarray:
    out = boxes.copy()
    out[:, 1] = (boxes[:, 1] + boxes[:, 3]) / 2 / size
    out[:, 2] = (boxes[:, 2] + boxes[:, 4]) / 2 / size
    out[:, 3] = (boxes[:, 3] - boxes[:, 1]) / size
    out[:, 4] = (boxes[:, 4] - boxes[:, 2]) / size
    return out.astype(np.float32)


def hsv_jitter(img: np.ndarray, rng: np.random.Generator, h: float, s: float, v: float) -> np.ndarray:
    """Random hue/saturation/value gains, applied with lookup tables in PIL's HSV space."""
    gains = rng.uniform(-1, 1, 3) * np.array([h, s, v]) + 1
    hsv = np.asarray(Image.fromarray(img).convert("HSV"))
    x = np.arange(256, dtype=np.float32)
    luts = [((x * gains[0]) % 256).astype(np.uint8), np.clip(x * gains[1], 0, 255).astype(np.uint8),
            np.clip(x * gains[2], 0, 255).astype(np.uint8)]
    out = np.stack([luts[c][hsv[..., c]] for c in range(3)], -1)
    return np.asarray(Image.fromarray(out, "HSV").convert("RGB"))


def flip_lr(img: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = img.shape[1]
    boxes = boxes.copy()
    boxes[:, [1, 3]] = w - boxes[:, [3, 1]]
    return np.ascontiguousarray(img[:, ::-1]), boxes


def random_affine(img: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, size: int,
                  translate: float, scale: float, min_box_px: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Scale about the input's centre, move that centre near the output's centre, crop/pad to size x size.

    A 2S mosaic canvas thus yields its middle S x S region at scale 1."""
    h, w = img.shape[:2]
    s = rng.uniform(1 - scale, 1 + scale)
    tx = rng.uniform(0.5 - translate, 0.5 + translate) * size
    ty = rng.uniform(0.5 - translate, 0.5 + translate) * size
    # output = s * (input - centre) + t
    cx, cy = w / 2, h / 2
    ox, oy = tx - s * cx, ty - s * cy
    inv = (1 / s, 0, -ox / s, 0, 1 / s, -oy / s)  # PIL maps output -> input
    from .data import PAD_VALUE
    out = Image.fromarray(img).transform((size, size), Image.AFFINE, inv, Image.BILINEAR,
                                         fillcolor=(PAD_VALUE,) * 3)
    b = boxes.copy()
    b[:, [1, 3]] = b[:, [1, 3]] * s + ox
    b[:, [2, 4]] = b[:, [2, 4]] * s + oy
    area0 = (b[:, 3] - b[:, 1]) * (b[:, 4] - b[:, 2])
    b[:, 1:] = b[:, 1:].clip(0, size)
    bw, bh = b[:, 3] - b[:, 1], b[:, 4] - b[:, 2]
    keep = (bw > min_box_px) & (bh > min_box_px) & (bw * bh > 0.2 * area0)
    return np.asarray(out), b[keep]


def _paste(canvas: np.ndarray, img: np.ndarray, x1: int, y1: int) -> None:
    """Copy img onto canvas with its top-left at (x1, y1), clipped to the canvas."""
    h, w = img.shape[:2]
    ch, cw = canvas.shape[:2]
    a, b = max(0, x1), max(0, y1)
    c, d = min(cw, x1 + w), min(ch, y1 + h)
    if c > a and d > b:
        canvas[b:d, a:c] = img[b - y1:d - y1, a - x1:c - x1]


def mosaic4(ds: "DetectionDataset", index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Four images (index + 3 random) tiled around a random centre of a 2S x 2S canvas."""
    from .data import PAD_VALUE
    s = ds.img_size
    xc, yc = (int(v) for v in rng.uniform(0.5 * s, 1.5 * s, 2))
    canvas = np.full((2 * s, 2 * s, 3), PAD_VALUE, np.uint8)
    picks = [index, *rng.integers(0, len(ds), 3)]
    all_boxes = []
    for k, i in enumerate(picks):
        img0 = ds.load(int(i))
        h0, w0 = img0.shape[:2]
        r = s / max(h0, w0)
        img = np.asarray(Image.fromarray(img0).resize((max(1, round(w0 * r)), max(1, round(h0 * r))),
                                                      Image.BILINEAR))
        h, w = img.shape[:2]
        x1 = xc - w if k in (0, 2) else xc
        y1 = yc - h if k in (0, 1) else yc
        _paste(canvas, img, x1, y1)
        all_boxes.append(to_pixel_xyxy(ds.labels[int(i)], w0, h0, r, (x1, y1)))
    boxes = np.concatenate(all_boxes, 0)
    boxes[:, 1:] = boxes[:, 1:].clip(0, 2 * s)
    return canvas, boxes


def augment_item(ds: "DetectionDataset", index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One training sample: (uint8 image S x S x 3, labels (n,5) cls,cx,cy,w,h normalised)."""
    from .data import letterbox
    cfg, s = ds.aug, ds.img_size
    if rng.random() < cfg.mosaic:
        img, boxes = mosaic4(ds, index, rng)
    else:
        img, r, pad = letterbox(ds.load(index), s)
        h0, w0 = ds.shapes[index]
        boxes = to_pixel_xyxy(ds.labels[index], w0, h0, r, pad)
    img, boxes = random_affine(img, boxes, rng, s, cfg.translate, cfg.scale, min_box_px=cfg.min_box_px)
    if cfg.hsv_h or cfg.hsv_s or cfg.hsv_v:
        img = hsv_jitter(img, rng, cfg.hsv_h, cfg.hsv_s, cfg.hsv_v)
    if rng.random() < cfg.fliplr:
        img, boxes = flip_lr(img, boxes)
    return img, to_norm_xywh(boxes, s)
