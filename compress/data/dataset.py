"""Detection data: the dataset, its collate function and loader (specs and labels: `dataspec`; decoding and
geometry: `imageio`; caches: `imcache`; augmentation: `augment`).
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from compress.data.dataspec import (IMG_EXTS, DataSpec, find_names, label_path, list_images, load_data_spec, read_labels,
                       read_names)
from compress.base.errors import DataError
from compress.data.imageio import PAD_VALUE, decode_bgr, fit_image, letterbox, load_image, rgb_planes, tune_allocator
from compress.data.imcache import ImageCache, index_images
from compress.data.augment import AugmentConfig, augment_item

__all__ = ["DataSpec", "load_data_spec", "DetectionDataset", "collate", "make_loader", "to_input", "letterbox",
           "load_image", "label_path", "find_names", "read_names", "read_labels", "list_images", "IMG_EXTS",
           "PAD_VALUE", "LabelReport", "EpochSampler"]

log = logging.getLogger(__name__)
_INV255 = 1 / 255  # applied in float32 (the op's dtype): float32(1/255)


@dataclass
class LabelReport:
    """What validation found while indexing a dataset."""
    images: int = 0
    boxes: int = 0
    background: int = 0
    missing_images: int = 0
    unreadable_images: int = 0
    bad_rows: Counter = field(default_factory=Counter)
    bad_images: Counter = field(default_factory=Counter)  # reason -> count (truncated, unreadable, ...)

    def summary(self) -> str:
        rows = ", ".join(f"{k}={v}" for k, v in sorted(self.bad_rows.items())) or "none"
        why = ", ".join(f"{k}={v}" for k, v in sorted(self.bad_images.items()))
        return (f"{self.images} images, {self.boxes} boxes, {self.background} background; skipped: "
                f"{self.missing_images} missing images, {self.unreadable_images} unreadable images"
                f"{f' ({why})' if why else ''}, label rows dropped: {rows}")

    @property
    def problems(self) -> int:
        return self.missing_images + self.unreadable_images + sum(self.bad_rows.values())


class DetectionDataset(Dataset):
    """Images + YOLO labels. Item: (img uint8 (3,S,S) RGB, labels (n,5) cls,cx,cy,w,h normalised to the
    network input, path, (orig_h, orig_w), ((ratio_w, ratio_h), (pad_w, pad_h))). Images stay uint8 until
    `to_input` makes the float network input on the device (a quarter of the bytes through worker IPC).

    `letterbox` picks the input geometry (True: aspect kept + grey padding; False: plain resize, Darknet's
    default). Images are checked once when indexed (missing, truncated, undecodable ones are skipped and
    counted in `.report`, summarised in one warning). `cache` ('ram' | 'disk' | None) keeps decoded,
    downscaled images. With `augment`, `aug` (an `augment.AugmentConfig`) drives the pipeline; the
    randomness depends only on (seed, epoch, index), and `epoch` is advanced by `DetectionLoader`.
    """

    def __init__(self, images: Sequence[str | os.PathLike], img_size: int = 416, augment: bool = False,
                 num_classes: int | None = None, aug: AugmentConfig | None = None, seed: int = 0,
                 source: str = "", letterbox: bool = True, cache: str | None = None,
                 cache_dir: str | os.PathLike | None = None, ram_budget: int | None = None) -> None:
        if img_size <= 0:
            raise DataError(f"img_size must be positive, got {img_size}")
        self.img_size, self.augment, self.seed, self.epoch = img_size, augment, seed, 0
        self.num_classes, self.letterbox = num_classes, bool(letterbox)
        if augment and aug is None:
            aug = AugmentConfig()
        self.aug = aug
        self.report = LabelReport()
        cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.images, self.labels, self.shapes = self._index([Path(p) for p in images], cache_dir)
        level = logging.WARNING if self.report.problems else logging.INFO
        log.log(level, "%s: %s", source or "dataset", self.report.summary())
        if not self.images:
            raise DataError(f"{source or 'dataset'}: no usable images ({self.report.summary()}); check the paths")
        self.cache = ImageCache(cache, self.images, self.shapes, img_size, cache_dir, ram_budget) if cache else None

    def _index(self, paths: list[Path], cache_dir: Path | None
               ) -> tuple[list[Path], list[np.ndarray], list[tuple[int, int]]]:
        images, labels, shapes, rep = [], [], [], self.report
        for p, info in zip(paths, index_images(paths, cache_dir)):
            if isinstance(info, str):
                if info == "missing":
                    rep.missing_images += 1
                else:
                    rep.unreadable_images += 1
                    rep.bad_images[info.split(" ")[0]] += 1
                    log.debug("%s: skipped (%s)", p, info)
                continue
            rows, bad = read_labels(label_path(p), self.num_classes)
            rep.bad_rows.update(bad)
            rep.images += 1
            rep.boxes += len(rows)
            rep.background += len(rows) == 0
            images.append(p)
            labels.append(rows)
            shapes.append(info)
        return images, labels, shapes

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int | tuple[int, int]):
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)  # (epoch, i): EpochSampler
        tune_allocator()
        path, (h0, w0) = self.images[index], self.shapes[index]
        if self.augment:
            rng = np.random.default_rng([self.seed, epoch, index])
            chw, labels = augment_item(self, index, rng)
            geom = ((1.0, 1.0), (0, 0))
        else:
            img, labels, ratio, pad = self.fitted(index)
            chw, geom = rgb_planes(img), (ratio, pad)
        return torch.from_numpy(chw), torch.from_numpy(labels), str(path), (h0, w0), geom

    def fitted(self, index: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float], tuple[int, int]]:
        """(BGR network input, labels normalised to it, (ratio_w, ratio_h), (pad_w, pad_h)) in this
        dataset's geometry."""
        h0, w0 = self.shapes[index]
        img, (rw, rh), (pw, ph) = fit_image(self.load_bgr(index), self.img_size, self.letterbox, (h0, w0))
        labels = self.labels[index].copy()
        s = self.img_size
        labels[:, 1] = (labels[:, 1] * w0 * rw + pw) / s
        labels[:, 2] = (labels[:, 2] * h0 * rh + ph) / s
        labels[:, 3] = labels[:, 3] * w0 * rw / s
        labels[:, 4] = labels[:, 4] * h0 * rh / s
        return img, labels, (rw, rh), (pw, ph)

    def letterboxed(self, index: int) -> tuple[np.ndarray, np.ndarray, float, tuple[int, int]]:
        """RGB letterboxed image and its labels normalised to it (whatever this dataset's geometry)."""
        saved, self.letterbox = self.letterbox, True
        try:
            img, labels, (r, _), pad = self.fitted(index)
        finally:
            self.letterbox = saved
        return np.ascontiguousarray(img[..., ::-1]), labels, r, pad

    def load_bgr(self, index: int, reduce: int = 1, scratch: bool = False) -> np.ndarray:
        """Decoded BGR image (possibly a downscaled cached copy, or decoded at 1/`reduce` of the size;
        `shapes[index]` is the original size). `scratch`: see `decode_bgr` (valid until the next such call).

        An image that passed the index check but fails to decode now (changed on disk) becomes grey and
        is logged, rather than killing a DataLoader worker."""
        if self.cache is not None:
            img = self.cache.get(index)
        else:
            img = decode_bgr(self.images[index], reduce, scratch)
        if img is None:
            log.warning("%s: cannot decode image (changed since indexing?); using a blank image",
                        self.images[index])
            h, w = self.shapes[index]
            img = np.full((h, w, 3), PAD_VALUE, np.uint8)
        return img

    def load(self, index: int) -> np.ndarray:
        """RGB uint8 image at its original size."""
        img = self.load_bgr(index)
        h0, w0 = self.shapes[index]
        if img.shape[:2] != (h0, w0):
            img = cv2.resize(img, (w0, h0), interpolation=cv2.INTER_LINEAR)
        return np.ascontiguousarray(img[..., ::-1])


def to_input(imgs: torch.Tensor, device: str | torch.device | None = None) -> torch.Tensor:
    """The network input of a batch (or item) of dataset images: uint8 RGB -> float32 in [0, 1] on `device`.

    The ONE place images are normalised (trainer, evaluate/detect, quantization calibration, benchmarks): the
    transfer carries uint8 and the conversion runs on the device. `x * float32(1/255)`: bit-identical to the
    worker-side conversion of earlier versions (within float32 eps of x / 255). Float input is taken as already
    normalised and only moved."""
    x = imgs if device is None else imgs.to(device, non_blocking=True)
    return x.float().mul_(_INV255) if x.dtype == torch.uint8 else x


def collate(batch):
    """-> (imgs uint8 (N,3,S,S) (`to_input` normalises them), targets (M,6) = [batch_index, cls, cx, cy, w, h],
    paths, shapes).

    shapes[i] = ((orig_h, orig_w), ((ratio_w, ratio_h), (pad_w, pad_h))).
    """
    imgs, labels, paths, hw, lb = zip(*batch)
    targets = [torch.cat((torch.full((len(lab), 1), float(i)), lab.float()), 1) for i, lab in enumerate(labels)]
    targets = torch.cat(targets, 0) if targets else torch.zeros((0, 6))
    return torch.stack(imgs, 0), targets, list(paths), [(a, b) for a, b in zip(hw, lb)]


class EpochSampler(Sampler):
    """Wraps a sampler and yields (epoch, index), so the augmentation of persistent DataLoader workers
    (whose dataset copies never see `set_epoch`) follows the epoch. `epoch` is the wrapped sampler's
    (e.g. a DistributedSampler after `set_epoch`) unless set here."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler, self._epoch = sampler, None

    @property
    def epoch(self) -> int:
        return self._epoch if self._epoch is not None else int(getattr(self.sampler, "epoch", 0))

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, int(i)) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class DetectionLoader(DataLoader):
    """A DataLoader that advances the augmentation epoch on every pass (through its EpochSampler, so
    persistent workers see it too)."""

    def __iter__(self):
        passes = getattr(self, "_passes", 0)
        if isinstance(self.sampler, EpochSampler):
            self.sampler.set_epoch(passes)
        if isinstance(self.dataset, DetectionDataset):
            self.dataset.set_epoch(passes)
        self._passes = passes + 1
        return super().__iter__()


def default_workers() -> int:
    return min(2, os.cpu_count() or 1)


def make_loader(spec_or_images: DataSpec | Sequence[str | os.PathLike] | DetectionDataset, img_size: int,
                batch_size: int = 8, augment: bool = False, workers: int | None = None,
                shuffle: bool = False, sampler: Sampler | None = None, split: str | None = None,
                aug: object | None = None, seed: int = 0, letterbox: bool = True, cache: str | None = None,
                cache_dir: str | os.PathLike | None = None) -> DetectionLoader:
    """A loader over a DataSpec (its `split`: default 'train' when augmenting, else 'valid'), a list of
    image paths, or a ready dataset. Batches come from `collate`.
    """
    if isinstance(spec_or_images, DetectionDataset):
        ds = spec_or_images
    else:
        nc, source = None, "images"
        if isinstance(spec_or_images, DataSpec):
            split = split or ("train" if augment else "valid")
            if split not in ("train", "valid"):
                raise DataError(f"split must be 'train' or 'valid', got {split!r}")
            nc, source = spec_or_images.nc, f"{spec_or_images.source} [{split}]"
            spec_or_images = getattr(spec_or_images, split)
        ds = DetectionDataset(spec_or_images, img_size, augment, nc, aug, seed, source, letterbox=letterbox,
                              cache=cache, cache_dir=cache_dir)
    workers = default_workers() if workers is None else workers
    gen = torch.Generator().manual_seed(seed)
    if sampler is None:
        sampler = RandomSampler(ds, generator=gen) if shuffle else SequentialSampler(ds)
    return DetectionLoader(ds, batch_size=batch_size, sampler=EpochSampler(sampler), num_workers=workers,
                           collate_fn=collate, persistent_workers=workers > 0, drop_last=False)
