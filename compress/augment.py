"""Training augmentation (OpenCV): mosaic, random scale/translate, horizontal flip, HSV jitter.

Each source image reaches the S x S output through ONE affine warp: its geometry (letterbox or plain
resize; or its mosaic tile placement), the random scale/translate and the flip are composed into a single
matrix, so a pixel is resampled once. Boxes go through the same matrix (no rotation or shear, so
axis-aligned boxes stay exact). HSV jitter uses lookup tables. Every function takes an explicit
`numpy.random.Generator`, so a (seed, epoch, index) triple fixes the result. Images are BGR uint8;
boxes travel as pixel `(n, 5)` = cls, x1, y1, x2, y2.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from .errors import DataError
from .imageio import PAD_VALUE, geometry, reduce_factor

if TYPE_CHECKING:
    from .data import DetectionDataset

__all__ = ["AugmentConfig", "augment_item", "hsv_jitter", "flip_lr", "to_pixel_xyxy", "to_norm_xywh",
           "warp", "transform_boxes"]


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation hyper-parameters (the names of Ultralytics' hyp files where they exist)."""
    hsv_h: float = 0.015     # hue gain range (fraction)
    hsv_s: float = 0.7       # saturation gain range
    hsv_v: float = 0.4       # value gain range
    fliplr: float = 0.5      # probability of a horizontal flip
    translate: float = 0.1   # +- fraction of the image size
    scale: float = 0.5       # scale gain in [1 - scale, 1 + scale]
    mosaic: float = 0.0      # probability of a 4-image mosaic
    min_box_px: float = 2.0  # boxes narrower/shorter than this after the warp are dropped
    min_box_area: float = 0.2  # ... and boxes keeping less than this share of their area in the image

    def __post_init__(self) -> None:
        for name in ("hsv_h", "hsv_s", "hsv_v", "fliplr", "translate", "mosaic", "min_box_area"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DataError(f"augmentation {name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.scale < 1.0:
            raise DataError(f"augmentation scale must be in [0, 1), got {self.scale}")
        if self.min_box_px < 0:
            raise DataError(f"augmentation min_box_px must be >= 0, got {self.min_box_px}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "hyp") -> "AugmentConfig":
        """The augmentation keys of a hyp mapping (others are ignored: they belong to the loss/optimizer)."""
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: float(v) for k, v in values.items() if k in known})
        except (TypeError, ValueError) as exc:
            raise DataError(f"{source}: augmentation values must be numbers ({exc})") from None


def to_pixel_xyxy(labels: np.ndarray, w: float, h: float, ratio: float | tuple[float, float] = 1.0,
                  pad: tuple[float, float] = (0, 0)) -> np.ndarray:
    """Normalised (n,5) cls,cx,cy,w,h of a w x h image -> pixel cls,x1,y1,x2,y2 after scaling by ratio + pad."""
    rw, rh = ratio if isinstance(ratio, tuple) else (ratio, ratio)
    out = labels.astype(np.float64)
    out[:, 1] = (labels[:, 1] - labels[:, 3] / 2) * w * rw + pad[0]
    out[:, 2] = (labels[:, 2] - labels[:, 4] / 2) * h * rh + pad[1]
    out[:, 3] = (labels[:, 1] + labels[:, 3] / 2) * w * rw + pad[0]
    out[:, 4] = (labels[:, 2] + labels[:, 4] / 2) * h * rh + pad[1]
    return out


def to_norm_xywh(boxes: np.ndarray, size: int) -> np.ndarray:
    out = boxes.astype(np.float64)
    out[:, 1] = (boxes[:, 1] + boxes[:, 3]) / 2 / size
    out[:, 2] = (boxes[:, 2] + boxes[:, 4]) / 2 / size
    out[:, 3] = (boxes[:, 3] - boxes[:, 1]) / size
    out[:, 4] = (boxes[:, 4] - boxes[:, 2]) / size
    return out.astype(np.float32)


def hsv_jitter(img: np.ndarray, rng: np.random.Generator, h: float, s: float, v: float) -> np.ndarray:
    """Random hue/saturation/value gains, applied with lookup tables in OpenCV's HSV (hue 0..179)."""
    gains = rng.uniform(-1, 1, 3) * np.array([h, s, v]) + 1
    hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=np.float32)
    lut_h = ((x * gains[0]) % 180).astype(np.uint8)
    lut_s = np.clip(x * gains[1], 0, 255).astype(np.uint8)
    lut_v = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def flip_lr(img: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = img.shape[1]
    boxes = boxes.copy()
    boxes[:, [1, 3]] = w - boxes[:, [3, 1]]
    return np.ascontiguousarray(img[:, ::-1]), boxes


def _affine(sx: float, sy: float, tx: float, ty: float) -> np.ndarray:
    """3x3 matrix of x' = sx * x + tx, y' = sy * y + ty (continuous coordinates: pixel i spans [i, i+1])."""
    return np.array([[sx, 0.0, tx], [0.0, sy, ty], [0.0, 0.0, 1.0]])


def transform_boxes(boxes: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Pixel cls,x1,y1,x2,y2 boxes through a scale/translate/flip matrix (corners re-ordered after a flip)."""
    out = boxes.astype(np.float64)
    xs = boxes[:, [1, 3]] * m[0, 0] + m[0, 2]
    ys = boxes[:, [2, 4]] * m[1, 1] + m[1, 2]
    out[:, 1], out[:, 3] = xs.min(1), xs.max(1)
    out[:, 2], out[:, 4] = ys.min(1), ys.max(1)
    return out


def warp(src: np.ndarray, m: np.ndarray, size: int, dst: np.ndarray | None = None) -> np.ndarray:
    """Resample `src` into a size x size image through the continuous-coordinate matrix `m` (one pass).

    With `dst`, only the pixels that `src` covers are written (mosaic tiles)."""
    shift = np.array([[1.0, 0, 0.5], [0, 1.0, 0.5], [0, 0, 1.0]])   # pixel index -> continuous
    m_idx = (np.linalg.inv(shift) @ m @ shift)[:2]
    if dst is None:
        return cv2.warpAffine(src, m_idx, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=(PAD_VALUE,) * 3)
    cv2.warpAffine(src, m_idx, (size, size), dst=dst, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_TRANSPARENT)
    return dst


def _random_affine(rng: np.random.Generator, size: int, centre: float, cfg: AugmentConfig) -> np.ndarray:
    """Scale about (centre, centre) of the input by U(1-scale, 1+scale), move it near the output's centre,
    and flip with probability fliplr."""
    s = rng.uniform(1 - cfg.scale, 1 + cfg.scale)
    tx, ty = rng.uniform(0.5 - cfg.translate, 0.5 + cfg.translate, 2) * size
    m = _affine(s, s, tx - s * centre, ty - s * centre)
    if rng.random() < cfg.fliplr:
        m = _affine(-1.0, 1.0, size, 0.0) @ m
    return m


def _source(ds: "DetectionDataset", i: int, m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image as loaded, loaded -> original-pixel matrix, original-pixel boxes) of dataset item i, which `m`
    draws into the output: a strong shrink decodes a JPEG at 1/2..1/8 of its size (much faster)."""
    img = ds.load_bgr(i, reduce_factor(min(abs(m[0, 0]), abs(m[1, 1]))))
    h0, w0 = ds.shapes[i]
    to_orig = _affine(w0 / img.shape[1], h0 / img.shape[0], 0.0, 0.0)
    return img, to_orig, to_pixel_xyxy(ds.labels[i], w0, h0)


def _single(ds: "DetectionDataset", index: int, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray]:
    s = ds.img_size
    (rw, rh), (pw, ph), _ = geometry(*ds.shapes[index], s, ds.letterbox)
    m = _random_affine(rng, s, s / 2, ds.aug) @ _affine(rw, rh, pw, ph)
    img, to_orig, boxes = _source(ds, index, m)
    return warp(img, m @ to_orig, s), transform_boxes(boxes, m)


def _mosaic(ds: "DetectionDataset", index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Four images (index + 3 random) tiled around a random centre of a virtual 2S x 2S canvas (long side
    S each, aspect kept), then the random affine of that canvas; each tile is warped once, straight into
    the output."""
    s = ds.img_size
    xc, yc = (int(v) for v in rng.uniform(0.5 * s, 1.5 * s, 2))
    picks = [index, *rng.integers(0, len(ds), 3)]
    aff = _random_affine(rng, s, s, ds.aug)
    out = np.full((s, s, 3), PAD_VALUE, np.uint8)
    all_boxes = []
    for k, i in enumerate(picks):
        h0, w0 = ds.shapes[int(i)]
        r = s / max(h0, w0)
        w, h = max(1, round(w0 * r)), max(1, round(h0 * r))
        x1 = xc - w if k in (0, 2) else xc
        y1 = yc - h if k in (0, 1) else yc
        m = aff @ _affine(w / w0, h / h0, x1, y1)
        img, to_orig, boxes = _source(ds, int(i), m)
        warp(img, m @ to_orig, s, dst=out)
        all_boxes.append(transform_boxes(boxes, m))
    return out, np.concatenate(all_boxes, 0)


def _filter_boxes(boxes: np.ndarray, size: int, cfg: AugmentConfig) -> np.ndarray:
    """Clip to the image; drop boxes that became tiny or lost most of their area outside it."""
    area0 = (boxes[:, 3] - boxes[:, 1]) * (boxes[:, 4] - boxes[:, 2])
    b = boxes.copy()
    b[:, 1:] = b[:, 1:].clip(0, size)
    bw, bh = b[:, 3] - b[:, 1], b[:, 4] - b[:, 2]
    keep = (bw > cfg.min_box_px) & (bh > cfg.min_box_px) & (bw * bh > cfg.min_box_area * area0)
    return b[keep]


def augment_item(ds: "DetectionDataset", index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One training sample: (BGR uint8 image S x S x 3, labels (n,5) cls,cx,cy,w,h normalised)."""
    cfg, s = ds.aug, ds.img_size
    img, boxes = _mosaic(ds, index, rng) if rng.random() < cfg.mosaic else _single(ds, index, rng)
    if cfg.hsv_h or cfg.hsv_s or cfg.hsv_v:
        img = hsv_jitter(img, rng, cfg.hsv_h, cfg.hsv_s, cfg.hsv_v)
    return img, to_norm_xywh(_filter_boxes(boxes, s, cfg), s)
