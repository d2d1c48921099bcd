"""Run a detector on images and draw the labelled boxes (Pillow)."""
from __future__ import annotations

import colorsys
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from compress.data.dataset import IMG_EXTS, DetectionDataset, list_images, make_loader
from compress.base.errors import DataError
from compress.detection.evaluate import EvalConfig, Predictor, input_letterbox, predict
from compress.base.fileio import write_bytes_atomic, write_text_atomic

__all__ = ["DetectConfig", "detect", "draw_detections", "detect_to_dir", "detect_to_file", "source_images",
           "check_names", "place_labels", "IMAGE_FORMATS", "is_image_file"]

log = logging.getLogger(__name__)
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}   # an --out file's format, by its name


@dataclass(frozen=True)
class DetectConfig:
    img_size: int = 416
    conf_thres: float = 0.25
    iou_thres: float = 0.45
    max_det: int = 300
    batch_size: int = 4
    workers: int = 0
    progress: bool = True
    letterbox: bool | None = None   # input geometry; None: the model's (cfg letter_box), else plain resize

    def __post_init__(self) -> None:
        self.as_eval()  # detect's rules are EvalConfig's (size, thresholds) for the shared fields

    def as_eval(self) -> EvalConfig:
        return EvalConfig(img_size=self.img_size, batch_size=self.batch_size, conf_thres=self.conf_thres,
                          iou_thres=self.iou_thres, max_det=self.max_det, workers=self.workers,
                          progress=self.progress, letterbox=self.letterbox)


def source_images(source: str | os.PathLike) -> list[Path]:
    """One image file, or the images of a folder."""
    p = Path(source)
    if p.is_dir():
        images = list_images(p)
    elif p.is_file() and p.suffix.lower() in IMG_EXTS:
        images = [p]
    else:
        raise DataError(f"{source}: not an image ({', '.join(IMG_EXTS)}) or a folder; pass --source IMG|DIR")
    if not images:
        raise DataError(f"{source}: folder holds no images; pass --source IMG|DIR")
    return images


def detect(model: Predictor, images: Sequence[str | os.PathLike], config: DetectConfig = DetectConfig(),
           device: str | torch.device = "cpu") -> list[tuple[Path, np.ndarray]]:
    """[(image path, (n, 6) x1,y1,x2,y2,conf,cls in original pixels)]."""
    ds = DetectionDataset(list(images), config.img_size, source="detect",
                          letterbox=input_letterbox(model, config.letterbox))
    loader = make_loader(ds, config.img_size, config.batch_size, workers=config.workers)
    module = model if isinstance(model, torch.nn.Module) else None
    was_training = bool(module is not None and module.training)
    if module is not None:
        module.eval()
    try:
        preds, _ = predict(model, loader, config.as_eval(), device)
    finally:
        if module is not None:
            module.train(was_training)
    return list(zip(ds.images, preds))


def check_names(names: Sequence[str], num_classes: int | None, source: str = "--names") -> None:
    """Refuse a names list shorter than the model's classes (boxes would be labelled with bare numbers)."""
    if num_classes is not None and len(names) < num_classes:
        raise DataError(f"{source} has {len(names)} names but the model predicts {num_classes} classes; "
                        f"pass a names file with {num_classes} lines (one per class), or omit --names to "
                        "label boxes with class ids")


def is_image_file(out: str | os.PathLike) -> bool:
    """`--out` names one image file (its suffix picks PNG or JPEG), not a folder."""
    return Path(out).suffix.lower() in IMAGE_FORMATS


def _colour(cls: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((cls * 0.618034) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def place_labels(boxes: Sequence[Sequence[float]], sizes: Sequence[tuple[int, int]],
                 img_wh: tuple[int, int]) -> list[tuple[int, int]]:
    """Top-left corner of each label (width, height in `sizes`) so that no two labels overlap (issue #26:
    tags of overlapping boxes ran together, "perperson"). Boxes are taken in the given order (detections come
    highest score first); each label tries above its box's top-left corner, then inside it at the top, then
    below the box, then inside at the bottom, and failing all of those the first free spot below the top one
    (in a crowd that can be past the image's bottom edge, where the tag is cut off rather than overlapping)."""
    placed: list[tuple[int, int, int, int]] = []
    out = []
    W, H = img_wh
    for (x1, y1, x2, y2), (w, h) in zip(boxes, sizes):
        x = int(min(max(0.0, x1), max(0, W - w)))
        tries = [y1 - h, y1, y2, y2 - h]
        spot = next((y for y in (int(t) for t in tries) if 0 <= y <= H - h and _free((x, y, w, h), placed)), None)
        if spot is None:  # every spot near the box is taken: from the top candidate, jump below what blocks it
            spot = int(min(max(0.0, y1 - h), max(0, H - h)))
            while blockers := [p for p in placed if not _free((x, spot, w, h), [p])]:
                spot = max(py + ph for _, py, _, ph in blockers)   # strictly lower each time: ends
        placed.append((x, spot, w, h))
        out.append((x, spot))
    return out


def _free(rect: tuple[int, int, int, int], placed: list[tuple[int, int, int, int]]) -> bool:
    x, y, w, h = rect
    return all(x + w <= px or px + pw <= x or y + h <= py or py + ph <= y for px, py, pw, ph in placed)


def draw_detections(img: Image.Image, dets: np.ndarray, names: Sequence[str]) -> Image.Image:
    """A copy of `img` with a box per detection and a 'name conf' tag on a filled background; tags never
    overlap one another (`place_labels`)."""
    img = img.convert("RGB").copy()
    draw = ImageDraw.Draw(img)
    width = max(1, round(max(img.size) / 300))
    rows = dets.tolist()
    texts = [f"{names[int(c)] if int(c) < len(names) else int(c)} {conf:.2f}" for *_, conf, c in rows]
    sizes = []
    for text in texts:
        tx1, ty1, tx2, ty2 = draw.textbbox((0, 0), text)
        sizes.append((tx2 - tx1 + 3, ty2 + 3))   # text + 1 px margin each side, its full height from y=0
    spots = place_labels([r[:4] for r in rows], sizes, img.size)
    for x1, y1, x2, y2, _, cls in rows:
        draw.rectangle([x1, y1, x2, y2], outline=_colour(int(cls)), width=width)
    for (*_, cls), text, (w, h), (tx, ty) in zip(rows, texts, sizes, spots):  # tags over every box outline
        draw.rectangle([tx, ty, tx + w - 1, ty + h - 1], fill=_colour(int(cls)))
        draw.text((tx + 1, ty + 1), text, fill=(0, 0, 0))
    return img


def _records(results: list[tuple[Path, np.ndarray]], names: Sequence[str]) -> list[dict]:
    return [{"image": str(path), "detections": [
        {"class": int(c), "name": names[int(c)] if int(c) < len(names) else str(int(c)),
         "conf": round(float(s), 5), "box_xyxy": [round(float(v), 2) for v in (x1, y1, x2, y2)]}
        for x1, y1, x2, y2, s, c in dets.tolist()]} for path, dets in results]


def _write_drawn(path: Path, dets: np.ndarray, names: Sequence[str], out: Path) -> None:
    """The image at `path` with its detections drawn, written to `out` in the format its suffix names."""
    with Image.open(path) as im:
        drawn = draw_detections(im, dets, names)
    fmt = IMAGE_FORMATS[out.suffix.lower()]
    buf = io.BytesIO()
    drawn.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    write_bytes_atomic(out, buf.getvalue())


def detect_to_dir(model: Predictor, source: str | os.PathLike, out_dir: str | os.PathLike,
                  names: Sequence[str], config: DetectConfig = DetectConfig(),
                  device: str | torch.device = "cpu") -> list[dict]:
    """Detect on `source`, write annotated images (PNG for PNG inputs, else JPEG) and `detections.json` to
    `out_dir`; returns the records."""
    out = Path(out_dir)
    check_names(names, getattr(model, "num_classes", None))
    results = detect(model, source_images(source), config, device)
    for path, dets in results:
        _write_drawn(path, dets, names, out / (path.stem + (".png" if path.suffix.lower() == ".png" else ".jpg")))
    records = _records(results, names)
    write_text_atomic(out / "detections.json", json.dumps(records, indent=1) + "\n")
    log.info("detect: %d images, %d boxes -> %s", len(records), sum(len(r["detections"]) for r in records), out)
    return records


def detect_to_file(model: Predictor, source: str | os.PathLike, out_file: str | os.PathLike,
                   names: Sequence[str], config: DetectConfig = DetectConfig(),
                   device: str | torch.device = "cpu") -> list[dict]:
    """Detect on one image and write it drawn to `out_file`, PNG or JPEG by its name (.png, .jpg, .jpeg)."""
    out = Path(out_file)
    if out.suffix.lower() not in IMAGE_FORMATS:
        raise DataError(f"--out {out_file}: name a folder, or an image file ending in "
                        f"{', '.join(IMAGE_FORMATS)}")
    images = source_images(source)
    if len(images) != 1:
        raise DataError(f"--out {out_file} is one image file but --source {source} holds {len(images)} images; "
                        "pass a folder as --out")
    check_names(names, getattr(model, "num_classes", None))
    results = detect(model, images, config, device)
    _write_drawn(results[0][0], results[0][1], names, out)
    return _records(results, names)
