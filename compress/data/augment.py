"""Training augmentation (OpenCV): mosaic, random scale/translate, horizontal flip, HSV jitter.

Each source image reaches the S x S output through ONE resampling: its geometry (letterbox or plain
resize; or its mosaic tile placement), the random scale/translate and the flip are composed into a single
matrix, decided before decoding (a strong shrink decodes a JPEG at 1/2..1/8 of its size), rounded to whole
pixels and applied as one `cv2.resize` of the visible crop into the rectangle it covers (twice as fast per
pixel as `warpAffine`, and nothing is computed for padding or for tiles outside the output). Boxes go
through the matrix actually applied (no rotation or shear, so axis-aligned boxes stay exact). HSV jitter
uses lookup tables, on the covered rectangles only (padding has a known colour). Every function takes an
explicit `numpy.random.Generator`, so a (seed, epoch, index) triple fixes the result. Sources are BGR uint8
(OpenCV), the output is RGB planes (3, S, S) uint8 written tile by tile (no interleaved canvas, no final
copy); boxes travel as pixel `(n, 5)` = cls, x1, y1, x2, y2.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Protocol

import cv2
import numpy as np

from compress.base.errors import DataError
from compress.data.imageio import PAD_VALUE, geometry, reduce_factor, split_into

__all__ = ["AugmentConfig", "Source", "augment_item", "hsv_jitter", "flip_lr", "draw", "transform_labels",
           "finish_labels"]


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


class Source(Protocol):
    """What augmentation reads from a dataset (`compress.data.dataset.DetectionDataset` is one). A protocol, so
    this module stays below the dataset that calls it."""
    img_size: int
    letterbox: bool
    aug: AugmentConfig
    shapes: list[tuple[int, int]]
    labels: list[np.ndarray]

    def __len__(self) -> int: ...

    def load_bgr(self, index: int, reduce: int = 1, scratch: bool = False) -> np.ndarray: ...


_LEVELS = np.arange(256, dtype=np.float32)


def hsv_luts(rng: np.random.Generator, h: float, s: float, v: float) -> tuple[np.ndarray, ...]:
    """Lookup tables of random hue/saturation/value gains in OpenCV's HSV (hue 0..179)."""
    gains = rng.uniform(-1, 1, 3) * np.array([h, s, v]) + 1
    x = _LEVELS  # 0..255 as float32
    return (((x * gains[0]) % 180).astype(np.uint8), np.clip(x * gains[1], 0, 255).astype(np.uint8),
            np.clip(x * gains[2], 0, 255).astype(np.uint8))


def apply_hsv(img: np.ndarray, luts: tuple[np.ndarray, ...], back: int = cv2.COLOR_HSV2BGR) -> np.ndarray:
    """BGR `img` through the `hsv_luts` tables; `back` converts the result (to BGR, or RGB)."""
    planes = cv2.split(cv2.cvtColor(img, cv2.COLOR_BGR2HSV))
    for plane, table in zip(planes, luts):  # per plane: OpenCV's 3-table LUT is 1.5x slower than split +
        cv2.LUT(plane, table, dst=plane)     # three 1-table LUTs + merge (measured at 416)
    return cv2.cvtColor(cv2.merge(planes), back)


def hsv_jitter(img: np.ndarray, rng: np.random.Generator, h: float, s: float, v: float) -> np.ndarray:
    """Random hue/saturation/value gains, applied with lookup tables in OpenCV's HSV."""
    return apply_hsv(img, hsv_luts(rng, h, s, v))


def flip_lr(img: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = img.shape[1]
    boxes = boxes.copy()
    boxes[:, [1, 3]] = w - boxes[:, [3, 1]]
    return np.ascontiguousarray(img[:, ::-1]), boxes


def _affine(sx: float, sy: float, tx: float, ty: float) -> np.ndarray:
    """3x3 matrix of x' = sx * x + tx, y' = sy * y + ty (continuous coordinates: pixel i spans [i, i+1])."""
    return np.array([[sx, 0.0, tx], [0.0, sy, ty], [0.0, 0.0, 1.0]])


def transform_labels(labels: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Normalised (n,5) cls,cx,cy,w,h through the scale/translate/flip matrix `m` (normalised coordinates ->
    output pixels) -> pixel (n,5) cls,x1,y1,x2,y2 (float64). No rotation or shear: boxes stay exact."""
    scale, shift = m[(0, 1), (0, 1)], m[:2, 2]
    centre, half = labels[:, 1:3] * scale + shift, np.abs(labels[:, 3:5] * (scale / 2))
    return np.hstack([labels[:, :1], centre - half, centre + half])


def _span(a: float, b: float, n: int, size: int) -> tuple[int, int, int, int] | None:
    """Whole-pixel spans of one axis drawn at x' = a * x + b (a > 0): the source pixels [c0, c1) of an n-pixel
    axis and the output pixels [o0, o1) of [0, size) they fill; None when less than half a pixel shows."""
    o0, o1 = round(max(0.0, b)), round(min(float(size), a * n + b))
    if o1 <= o0:
        return None
    c0 = min(max(round((o0 - b) / a), 0), n - 1)
    return c0, max(min(round((o1 - b) / a), n), c0 + 1), o0, o1


def draw(src: np.ndarray, m: np.ndarray, out: np.ndarray, luts: tuple[np.ndarray, ...] | None = None
         ) -> np.ndarray | None:
    """Resample BGR `src` into the RGB planes `out` (3, S, S; in place) through the continuous-coordinate
    scale/translate/flip matrix `m` (pixel i spans [i, i+1]); `luts` (`hsv_luts`) colour the drawn pixels.
    Returns the matrix actually applied (`m` rounded so that whole source pixels map onto whole output
    pixels: points move by at most half an output or half a source pixel), or None when `src` does not
    show."""
    size, flip = out.shape[1], m[0, 0] < 0
    if flip:
        m = _affine(-1.0, 1.0, size, 0.0) @ m   # draw unflipped, mirror the tile
    sx = _span(m[0, 0], m[0, 2], src.shape[1], size)
    sy = _span(m[1, 1], m[1, 2], src.shape[0], size)
    if sx is None or sy is None:
        return None
    (cx0, cx1, ox0, ox1), (cy0, cy1, oy0, oy1) = sx, sy
    tile = cv2.resize(src[cy0:cy1, cx0:cx1], (ox1 - ox0, oy1 - oy0), interpolation=cv2.INTER_LINEAR)
    planes = (0, 1, 2) if luts is not None else (2, 1, 0)  # the tile's channels -> RGB planes
    if luts is not None:
        tile = apply_hsv(tile, luts, cv2.COLOR_HSV2RGB)
    ax, ay = (ox1 - ox0) / (cx1 - cx0), (oy1 - oy0) / (cy1 - cy0)
    applied = _affine(ax, ay, ox0 - ax * cx0, oy0 - ay * cy0)
    if flip:
        tile, (ox0, ox1) = cv2.flip(tile, 1), (size - ox1, size - ox0)
        applied = _affine(-1.0, 1.0, size, 0.0) @ applied
    split_into(tile, [out[c, oy0:oy1, ox0:ox1] for c in planes])
    return applied


def _random_affine(rng: np.random.Generator, size: int, centre: float, cfg: AugmentConfig) -> np.ndarray:
    """Scale about (centre, centre) of the input by U(1-scale, 1+scale), move it near the output's centre,
    and flip with probability fliplr."""
    s = rng.uniform(1 - cfg.scale, 1 + cfg.scale)
    tx, ty = rng.uniform(0.5 - cfg.translate, 0.5 + cfg.translate, 2) * size
    m = _affine(s, s, tx - s * centre, ty - s * centre)
    if rng.random() < cfg.fliplr:
        m = _affine(-1.0, 1.0, size, 0.0) @ m
    return m


def _draw_source(ds: Source, i: int, m: np.ndarray, out: np.ndarray,
                 luts: tuple[np.ndarray, ...] | None) -> np.ndarray | None:
    """Draw dataset image i into `out` through `m` (original pixels -> output); its boxes in output pixels,
    or None when it does not show (then it is not even decoded). The scale is known before decoding: a
    strong shrink decodes a JPEG at 1/2..1/8 of its size (11-25% less decode time on COCO128)."""
    h0, w0 = ds.shapes[i]
    if not _visible(m, h0, w0, out.shape[1]):
        return None
    img = ds.load_bgr(i, reduce_factor(max(abs(m[0, 0]), abs(m[1, 1]))), scratch=True)  # drawn before the next
    (h, w), to_orig = img.shape[:2], _affine(w0 / img.shape[1], h0 / img.shape[0], 0.0, 0.0)
    applied = draw(img, m @ to_orig, out, luts)
    if applied is None:
        return None
    return transform_labels(ds.labels[i], applied @ _affine(w, h, 0.0, 0.0))


def _visible(m: np.ndarray, h0: int, w0: int, size: int) -> bool:
    xs, ys = sorted((m[0, 2], m[0, 0] * w0 + m[0, 2])), sorted((m[1, 2], m[1, 1] * h0 + m[1, 2]))
    return xs[1] > 0.5 and xs[0] < size - 0.5 and ys[1] > 0.5 and ys[0] < size - 0.5


def _canvas(ds: Source, luts: tuple[np.ndarray, ...] | None) -> np.ndarray:
    """The (3, S, S) output filled with the padding colour (after HSV: grey has hue 0 and saturation 0, so
    only the value table changes it)."""
    pad = PAD_VALUE if luts is None else int(luts[2][PAD_VALUE])
    return np.full((3, ds.img_size, ds.img_size), pad, np.uint8)


Plan = list[tuple[int, np.ndarray]]  # (dataset index, original pixels -> output matrix) per source image


def _single(ds: Source, index: int, rng: np.random.Generator) -> Plan:
    s = ds.img_size
    (rw, rh), (pw, ph), _ = geometry(*ds.shapes[index], s, ds.letterbox)
    return [(index, _random_affine(rng, s, s / 2, ds.aug) @ _affine(rw, rh, pw, ph))]


def _mosaic(ds: Source, index: int, rng: np.random.Generator) -> Plan:
    """Four images (index + 3 random) tiled around a random centre of a virtual 2S x 2S canvas (long side
    S each, aspect kept), then the random affine of that canvas."""
    s = ds.img_size
    xc, yc = (int(v) for v in rng.uniform(0.5 * s, 1.5 * s, 2))
    picks = [index, *rng.integers(0, len(ds), 3)]
    aff = _random_affine(rng, s, s, ds.aug)
    plan = []
    for k, i in enumerate(picks):
        h0, w0 = ds.shapes[int(i)]
        r = s / max(h0, w0)
        w, h = max(1, round(w0 * r)), max(1, round(h0 * r))
        x1 = xc - w if k in (0, 2) else xc
        y1 = yc - h if k in (0, 1) else yc
        plan.append((int(i), aff @ _affine(w / w0, h / h0, x1, y1)))
    return plan


def finish_labels(boxes: np.ndarray, size: int, cfg: AugmentConfig) -> np.ndarray:
    """Pixel cls,x1,y1,x2,y2 boxes of the S x S output clipped to it, without those that became tiny or lost
    most of their area outside it -> normalised cls,cx,cy,w,h float32 labels."""
    area0 = (boxes[:, 3] - boxes[:, 1]) * (boxes[:, 4] - boxes[:, 2])
    xyxy = boxes[:, 1:].clip(0, size)
    wh = xyxy[:, 2:] - xyxy[:, :2]
    keep = (wh > cfg.min_box_px).all(1) & (wh[:, 0] * wh[:, 1] > cfg.min_box_area * area0)
    centre = (xyxy[keep, :2] + xyxy[keep, 2:]) / (2 * size)
    return np.hstack([boxes[keep, :1], centre, wh[keep] / size]).astype(np.float32)


def augment_item(ds: Source, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One training sample: (RGB uint8 planes (3, S, S), labels (n,5) cls,cx,cy,w,h normalised).

    The geometry of every source is drawn first (so decoding knows its scale), then the HSV gains; each
    source is then drawn once, straight into the output (mosaic tiles outside it are never decoded)."""
    cfg, s = ds.aug, ds.img_size
    plan = (_mosaic if rng.random() < cfg.mosaic else _single)(ds, index, rng)
    luts = hsv_luts(rng, cfg.hsv_h, cfg.hsv_s, cfg.hsv_v) if cfg.hsv_h or cfg.hsv_s or cfg.hsv_v else None
    out = _canvas(ds, luts)
    boxes = [b for i, m in plan if (b := _draw_source(ds, i, m, out, luts)) is not None]
    return out, finish_labels(np.concatenate(boxes) if boxes else np.zeros((0, 5)), s, cfg)
