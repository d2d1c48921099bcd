"""A small deterministic synthetic detection dataset: coloured circles, squares and triangles on noise.

Same arguments -> byte-identical files. Layout (Darknet style, relative paths):
`images/{train,valid}/*.png`, `labels/{train,valid}/*.txt`, `train.txt`, `valid.txt`, `synth.names`,
`synth.data`.
"""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from compress.base.errors import DataError
from compress.base.fileio import write_bytes_atomic, write_text_atomic

__all__ = ["synthesize", "SYNTH_NAMES", "draw_scene"]

log = logging.getLogger(__name__)
SYNTH_NAMES = ("circle", "square", "triangle")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour gradient plus blocky texture and pixel noise, kept mid-grey-ish."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(70, 170, 3)
    grad = rng.uniform(-40, 40, (2, 3))
    img = base + xx[..., None] * grad[0] + yy[..., None] * grad[1]
    cells = rng.normal(0, 12, (8, 8, 3)).repeat(size // 8 + 1, 0).repeat(size // 8 + 1, 1)[:size, :size]
    img = img + cells + rng.normal(0, 8, (size, size, 3))
    return np.clip(img, 0, 255)


def _shape_box(rng: np.random.Generator, size: int, placed: list[np.ndarray]) -> np.ndarray:
    """An x1,y1,x2,y2 box inside the image that overlaps earlier boxes by IoU < 0.3 (some overlap)."""
    lo, hi = max(6, size * 10 // 128), max(8, size * 60 // 128)
    for _ in range(50):
        side = rng.uniform(lo, hi)
        x1, y1 = rng.uniform(0, size - side, 2)
        box = np.array([x1, y1, x1 + side, y1 + side])
        if all(_iou(box, b) < 0.3 for b in placed):
            return box
    return box


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated colour: one channel high, one low, one random."""
    c = rng.permutation([rng.integers(200, 256), rng.integers(0, 60), rng.integers(0, 256)])
    return tuple(int(v) for v in c)


def draw_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One image (uint8 size x size x 3) and its objects [(class, x1y1x2y2 pixel box)]."""
    img = Image.fromarray(_background(rng, size).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    objects: list[tuple[int, np.ndarray]] = []
    for _ in range(int(rng.integers(1, 5))):
        cls = int(rng.integers(0, 3))
        x1, y1, x2, y2 = box = _shape_box(rng, size, [b for _, b in objects])
        colour = _colour(rng)
        if cls == 0:
            draw.ellipse([x1, y1, x2, y2], fill=colour)
        elif cls == 1:
            draw.rectangle([x1, y1, x2, y2], fill=colour)
        else:
            draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=colour)
        objects.append((cls, box))
    return np.asarray(img), objects


def _label_text(objects: list[tuple[int, np.ndarray]], size: int) -> str:
    lines = []
    for cls, (x1, y1, x2, y2) in objects:
        x1, y1, x2, y2 = (min(max(v, 0.0), size) for v in (x1, y1, x2, y2))
        lines.append(f"{cls} {(x1 + x2) / 2 / size:.6f} {(y1 + y2) / 2 / size:.6f} "
                     f"{(x2 - x1) / size:.6f} {(y2 - y1) / size:.6f}")
    return "\n".join(lines) + ("\n" if lines else "")


def _write_split(out: Path, split: str, n: int, size: int, rng: np.random.Generator) -> None:
    rel = []
    for i in range(n):
        img, objects = draw_scene(rng, size)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        name = f"{split}_{i:05d}"
        write_bytes_atomic(out / "images" / split / f"{name}.png", buf.getvalue())
        write_text_atomic(out / "labels" / split / f"{name}.txt", _label_text(objects, size))
        rel.append(f"images/{split}/{name}.png")
    write_text_atomic(out / f"{split}.txt", "\n".join(rel) + "\n")


def synthesize(out_dir: str | os.PathLike, n_train: int = 192, n_valid: int = 48, img_size: int = 128,
               seed: int = 0) -> Path:
    """Write the dataset under `out_dir`; returns the path of its `synth.data`."""
    if n_train < 1 or n_valid < 1:
        raise DataError(f"synthesize needs n_train >= 1 and n_valid >= 1, got {n_train}, {n_valid}")
    if img_size < 32:
        raise DataError(f"synthesize needs img_size >= 32, got {img_size}")
    out = Path(out_dir)
    train_rng, valid_rng = (np.random.default_rng([seed, k]) for k in (0, 1))
    _write_split(out, "train", n_train, img_size, train_rng)
    _write_split(out, "valid", n_valid, img_size, valid_rng)
    write_text_atomic(out / "synth.names", "\n".join(SYNTH_NAMES) + "\n")
    data = out / "synth.data"
    write_text_atomic(data, "classes = 3\ntrain = train.txt\nvalid = valid.txt\nnames = synth.names\n")
    log.info("synthetic dataset: %d train + %d valid images of %dpx -> %s", n_train, n_valid, img_size, out)
    return data
