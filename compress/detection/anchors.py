"""Anchor boxes from a dataset's labels: k-means on box width/height with a 1 - IoU distance."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from compress.data.dataset import DataSpec, DetectionDataset, load_data_spec
from compress.base.checks import SEED, check_img_size, check_range
from compress.base.errors import DataError

__all__ = ["AnchorConfig", "AnchorResult", "wh_iou", "kmeans_anchors", "label_wh", "compute_anchors",
           "format_anchors"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnchorConfig:
    n: int = 9
    img_size: int = 416
    iters: int = 300
    seed: int = 0
    min_px: float = 2.0   # boxes smaller than this (either side, after scaling) are ignored
    split: str = "train"

    def __post_init__(self) -> None:
        if self.n < 1 or self.iters < 1:
            raise DataError(f"anchors: n and iters must be >= 1 (got {self.n}, {self.iters})")
        check_img_size(self.img_size, error=DataError)
        check_range("--seed", self.seed, *SEED, error=DataError)
        if self.split not in ("train", "valid"):
            raise DataError(f"anchors: split must be 'train' or 'valid', got {self.split!r}")


@dataclass(frozen=True)
class AnchorResult:
    anchors: np.ndarray   # (n, 2) w, h in pixels at img_size, sorted by area
    mean_iou: float       # mean over boxes of the best anchor IoU
    boxes: int

    def cfg_line(self) -> str:
        return "anchors = " + format_anchors(self.anchors)

    def to_dict(self) -> dict:
        return {"anchors": self.anchors.round(2).tolist(), "anchors_cfg": format_anchors(self.anchors),
                "mean_iou": self.mean_iou, "boxes": self.boxes}


def wh_iou(wh: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """IoU of (N, 2) and (K, 2) width/height pairs with aligned centres -> (N, K)."""
    inter = np.minimum(wh[:, None, 0], anchors[None, :, 0]) * np.minimum(wh[:, None, 1], anchors[None, :, 1])
    return inter / (wh[:, None].prod(-1) + anchors[None].prod(-1) - inter)


def _init(wh: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding with the 1 - IoU distance."""
    centres = [wh[rng.integers(len(wh))]]
    for _ in range(1, n):
        d = 1 - wh_iou(wh, np.array(centres)).max(1)
        p = d ** 2 / (d ** 2).sum() if d.sum() > 0 else None
        centres.append(wh[rng.choice(len(wh), p=p)])
    return np.array(centres, dtype=np.float64)


def kmeans_anchors(wh: np.ndarray, n: int, iters: int = 300, seed: int = 0) -> np.ndarray:
    """Cluster (N, 2) widths/heights into n anchors (sorted by area); deterministic for a seed."""
    wh = np.asarray(wh, dtype=np.float64)
    if len(wh) == 0:
        raise DataError("anchors: no label boxes to cluster; check that the images have label files "
                        "(labels/<image>.txt with `class x y w h` lines)")
    if len(wh) < n:
        raise DataError(f"anchors: {len(wh)} boxes cannot make {n} anchors; use a smaller --n or more data")
    rng = np.random.default_rng(seed)
    centres = _init(wh, n, rng)
    assign = None
    for _ in range(iters):
        new = wh_iou(wh, centres).argmax(1)
        if assign is not None and (new == assign).all():
            break
        assign = new
        for k in range(n):
            members = wh[assign == k]
            centres[k] = members.mean(0) if len(members) else wh[rng.integers(len(wh))]
    return centres[np.argsort(centres.prod(1), kind="stable")]


def label_wh(ds: DetectionDataset, img_size: int) -> np.ndarray:
    """Label box sizes in pixels after scaling each image so its long side is img_size."""
    out = []
    for lab, (h, w) in zip(ds.labels, ds.shapes):
        r = img_size / max(h, w)
        out.append(np.stack([lab[:, 3] * w * r, lab[:, 4] * h * r], 1))
    return np.concatenate(out, 0) if out else np.zeros((0, 2))


def format_anchors(anchors: np.ndarray) -> str:
    """Darknet cfg syntax: '10,14,  23,27, ...'."""
    return ",  ".join(f"{int(round(w))},{int(round(h))}" for w, h in anchors)


def compute_anchors(data: DataSpec | str | os.PathLike | Sequence, config: AnchorConfig = AnchorConfig()
                    ) -> AnchorResult:
    """k-means anchors of a dataset's labels (the `split` of a DataSpec / .data, or an image list/folder)."""
    if isinstance(data, (str, os.PathLike)):
        data = load_data_spec(data)
    images, nc = (getattr(data, config.split), data.nc) if isinstance(data, DataSpec) else (list(data), None)
    ds = DetectionDataset(images, config.img_size, num_classes=nc, source="anchors")
    wh = label_wh(ds, config.img_size)
    total = len(wh)
    wh = wh[(wh >= config.min_px).all(1)]
    if len(wh) == 0:
        raise _no_boxes(data, len(images), total, config)
    anchors = kmeans_anchors(wh, config.n, config.iters, config.seed)
    mean_iou = float(wh_iou(wh, anchors).max(1).mean())
    log.info("anchors from %d boxes: mean best IoU %.4f", len(wh), mean_iou)
    return AnchorResult(anchors=anchors, mean_iou=mean_iou, boxes=len(wh))


def _no_boxes(data: object, images: int, total: int, config: AnchorConfig) -> DataError:
    """Say why there is nothing to cluster: no labels at all, or every box under min_px."""
    where = f"the {images} {config.split} images" + (f" of {data.source}" if getattr(data, "source", "") else "")
    why = (f"all {total} boxes are under {config.min_px:g} px at --img-size {config.img_size}; use a larger "
           "--img-size" if total else "no image has a label file (labels/<image>.txt with `class x y w h` lines "
           "beside images/) or every label file is empty; check the dataset")
    return DataError(f"anchors: {where} have no boxes to cluster: {why}")
