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

__all__ = ["DetectConfig", "detect", "draw_detections", "detect_to_dir", "source_images", "check_names"]

log = logging.getLogger(__name__)


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


def _colour(cls: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((cls * 0.618034) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(img: Image.Image, dets: np.ndarray, names: Sequence[str]) -> Image.Image:
    """A copy of `img` with a box and a 'name conf' tag per detection."""
    img = img.convert("RGB").copy()
    draw = ImageDraw.Draw(img)
    width = max(1, round(max(img.size) / 300))
    for x1, y1, x2, y2, conf, cls in dets.tolist():
        c = int(cls)
        colour = _colour(c)
        text = f"{names[c] if c < len(names) else c} {conf:.2f}"
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        tx1, ty1, tx2, ty2 = draw.textbbox((x1, y1), text)
        ty = y1 - (ty2 - ty1) - 2 if y1 - (ty2 - ty1) - 2 >= 0 else y1
        draw.rectangle([x1, ty, x1 + (tx2 - tx1) + 2, ty + (ty2 - ty1) + 2], fill=colour)
        draw.text((x1 + 1, ty), text, fill=(0, 0, 0))
    return img


def detect_to_dir(model: Predictor, source: str | os.PathLike, out_dir: str | os.PathLike,
                  names: Sequence[str], config: DetectConfig = DetectConfig(),
                  device: str | torch.device = "cpu") -> list[dict]:
    """Detect on `source`, write annotated images and `detections.json` to `out_dir`; returns the records."""
    out = Path(out_dir)
    check_names(names, getattr(model, "num_classes", None))
    results = detect(model, source_images(source), config, device)
    records = []
    for path, dets in results:
        with Image.open(path) as im:
            drawn = draw_detections(im, dets, names)
        buf = io.BytesIO()
        fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
        drawn.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        write_bytes_atomic(out / (path.stem + (".png" if fmt == "PNG" else ".jpg")), buf.getvalue())
        records.append({"image": str(path), "detections": [
            {"class": int(c), "name": names[int(c)] if int(c) < len(names) else str(int(c)),
             "conf": round(float(s), 5), "box_xyxy": [round(float(v), 2) for v in (x1, y1, x2, y2)]}
            for x1, y1, x2, y2, s, c in dets.tolist()]})
    write_text_atomic(out / "detections.json", json.dumps(records, indent=1) + "\n")
    log.info("detect: %d images, %d boxes -> %s", len(records), sum(len(r["detections"]) for r in records), out)
    return records
