"""Detection data: Darknet `.data` specs, YOLO label files, letterbox, the dataset and its loader.

A `.data` file names `classes`, `train`, `valid` and `names`; `train`/`valid` are list files (one image
path per line) or image folders. Labels (`cls cx cy w h`, normalised) live beside each image or in the
sibling `labels/` tree (the last `images` path component replaced by `labels`, extension `.txt`).
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import DataError

__all__ = ["DataSpec", "load_data_spec", "DetectionDataset", "collate", "make_loader", "letterbox",
           "load_image", "label_path", "find_names", "read_names", "read_labels", "list_images", "IMG_EXTS", "PAD_VALUE"]

log = logging.getLogger(__name__)
IMG_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
PAD_VALUE = 114  # grey padding (114/255), as in Darknet-trained YOLO letterboxing
_TOL = 1e-3      # label coordinates this far outside [0, 1] are clipped, further out the row is dropped


@dataclass(frozen=True)
class DataSpec:
    """Image lists of a dataset and its class names."""
    train: list[Path]
    valid: list[Path]
    names: list[str]
    source: str = ""

    @property
    def nc(self) -> int:
        return len(self.names)


# ----------------------------------------------------------------------------- spec loading

def load_data_spec(path: str | os.PathLike) -> DataSpec:
    """Read a Darknet `.data` file, or take a folder of images (+ labels) as both train and valid."""
    path = Path(path)
    if path.is_dir():
        return _folder_spec(path)
    if not path.is_file():
        raise DataError(f"{path}: no such .data file or image folder; pass an existing --data")
    opts = _parse_data_file(path)
    bases = [path.parent, path.parent.parent]
    train = _image_list(opts.get("train"), bases, path, "train") if "train" in opts else []
    valid = _image_list(opts["valid"], bases, path, "valid") if "valid" in opts else train
    names = _names(opts, bases, path)
    if not train and not valid:
        raise DataError(f"{path}: neither 'train' nor 'valid' lists any image; fix the paths in the .data file")
    return DataSpec(train=train, valid=valid, names=names, source=str(path))


def _parse_data_file(path: Path) -> dict[str, str]:
    opts = {}
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if "=" not in line:
            raise DataError(f"{path}:{n}: expected 'key = value', got {line!r}; fix the .data file")
        key, value = (s.strip() for s in line.split("=", 1))
        opts[key] = value
    return opts


def _resolve(p: str, bases: Sequence[Path]) -> Path:
    """An absolute path, or the first base it exists under (else relative to the first base)."""
    q = Path(p).expanduser()
    if q.is_absolute():
        return q
    for base in bases:
        if (base / q).exists():
            return base / q
    return bases[0] / q


def _image_list(value: str, bases: Sequence[Path], data_file: Path, key: str) -> list[Path]:
    target = _resolve(value, bases)
    if target.is_dir():
        return list_images(target)
    if not target.is_file():
        raise DataError(f"{data_file}: {key} = {value} not found (tried relative to {bases[0]} and "
                        f"{bases[1]}); fix the path")
    lines = [s.strip() for s in target.read_text(errors="replace").splitlines()]
    list_bases = [target.parent, *bases]
    return [_resolve(s, list_bases) for s in lines if s and not s.startswith("#")]


def _names(opts: dict[str, str], bases: Sequence[Path], data_file: Path) -> list[str]:
    classes = int(opts["classes"]) if opts.get("classes", "").strip().isdigit() else None
    if "names" in opts:
        names_path = _resolve(opts["names"], bases)
        if not names_path.is_file():
            raise DataError(f"{data_file}: names = {opts['names']} not found; fix the path")
        names = read_names(names_path)
        if classes is not None and classes != len(names):
            raise DataError(f"{data_file}: classes = {classes} but {names_path} has {len(names)} names; "
                            "make them agree")
        return names
    if classes is None:
        raise DataError(f"{data_file}: needs 'classes = N' or 'names = file'; add one")
    return [str(i) for i in range(classes)]


def read_names(path: str | os.PathLike) -> list[str]:
    return [s.strip() for s in Path(path).read_text(errors="replace").splitlines() if s.strip()]


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under `folder` (recursively), sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMG_EXTS and p.is_file())


def find_names(folder: str | os.PathLike, levels: int = 4) -> Path | None:
    """The first `*.names` file in `folder` or up to `levels` folders above it."""
    folder = Path(folder)
    return next((f for d in [folder, *list(folder.parents)[:levels]] for f in sorted(d.glob("*.names"))), None)


def _folder_spec(folder: Path) -> DataSpec:
    images = list_images(folder)
    if not images:
        raise DataError(f"{folder}: no images ({', '.join(IMG_EXTS)}) found; pass a .data file or an image folder")
    names_file = find_names(folder)
    if names_file is not None:
        names = read_names(names_file)
    else:
        top = max((int(r[0]) for p in images for r in read_labels(label_path(p))[0]), default=-1)
        names = [str(i) for i in range(top + 1)] or ["0"]
    return DataSpec(train=images, valid=images, names=names, source=str(folder))


# ----------------------------------------------------------------------------- labels

def label_path(image: Path) -> Path:
    """Label file of an image: in the sibling labels/ tree if that file exists, else beside the image."""
    parts = list(image.with_suffix(".txt").parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            candidate = Path(*parts)
            if candidate.is_file():
                return candidate
            break
    return image.with_suffix(".txt")


def read_labels(path: Path, nc: int | None = None) -> tuple[np.ndarray, Counter]:
    """Rows (n, 5) cls, cx, cy, w, h of a YOLO label file; bad rows are dropped and counted by reason."""
    bad: Counter = Counter()
    if not path.is_file():
        return np.zeros((0, 5), np.float32), bad
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        reason, row = _check_row(line.split(), nc)
        if reason:
            bad[reason] += 1
        elif row is not None:
            rows.append(row)
    return (np.array(rows, np.float32).reshape(-1, 5)), bad


def _check_row(tokens: list[str], nc: int | None) -> tuple[str | None, list[float] | None]:
    if not tokens:
        return None, None
    try:
        values = [float(t) for t in tokens]
    except ValueError:
        return "malformed", None
    if len(values) != 5 or not values[0].is_integer() or not all(np.isfinite(values)):
        return "malformed", None
    cls, box = int(values[0]), np.array(values[1:])
    if cls < 0 or (nc is not None and cls >= nc):
        return "bad_class", None
    if (box < -_TOL).any() or (box > 1 + _TOL).any() or (box[2:] <= 0).any():
        return "out_of_range", None
    return None, [cls, *np.clip(box, 0.0, 1.0)]


# ----------------------------------------------------------------------------- images

def load_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def letterbox(img: np.ndarray, size: int, color: int = PAD_VALUE
              ) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Resize keeping the aspect ratio and pad to size x size.

    Returns (image, ratio, (pad_w, pad_h)): a point (x, y) of the original maps to
    (x * ratio + pad_w, y * ratio + pad_h) in the letterboxed image.
    """
    h0, w0 = img.shape[:2]
    r = min(size / h0, size / w0)
    nw, nh = max(1, round(w0 * r)), max(1, round(h0 * r))
    if (nw, nh) != (w0, h0):
        img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    pad_w, pad_h = (size - nw) // 2, (size - nh) // 2
    out = np.full((size, size, 3), color, np.uint8)
    out[pad_h:pad_h + nh, pad_w:pad_w + nw] = img
    return out, r, (pad_w, pad_h)


# ----------------------------------------------------------------------------- dataset

@dataclass
class LabelReport:
    """What validation found while indexing a dataset."""
    images: int = 0
    boxes: int = 0
    background: int = 0
    missing_images: int = 0
    unreadable_images: int = 0
    bad_rows: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        rows = ", ".join(f"{k}={v}" for k, v in sorted(self.bad_rows.items())) or "none"
        return (f"{self.images} images, {self.boxes} boxes, {self.background} background; skipped: "
                f"{self.missing_images} missing images, {self.unreadable_images} unreadable images, "
                f"label rows dropped: {rows}")

    @property
    def problems(self) -> int:
        return self.missing_images + self.unreadable_images + sum(self.bad_rows.values())


class DetectionDataset(Dataset):
    """Images + YOLO labels. Item: (img float32 (3,S,S) in [0,1], labels (n,5) cls,cx,cy,w,h normalised to
    the letterboxed image, path, (orig_h, orig_w), (ratio, (pad_w, pad_h))).

    Bad entries (missing/unreadable images, bad label rows) are skipped, counted in `.report`, and
    summarised in one warning. With `augment`, `aug` (an `augment.AugmentConfig`) drives the pipeline;
    the randomness depends only on (seed, epoch, index), and `epoch` is advanced by `DetectionLoader`.
    """

    def __init__(self, images: Sequence[str | os.PathLike], img_size: int = 416, augment: bool = False,
                 num_classes: int | None = None, aug: "object | None" = None, seed: int = 0,
                 source: str = "") -> None:
        if img_size <= 0:
            raise DataError(f"img_size must be positive, got {img_size}")
        self.img_size, self.augment, self.seed, self.epoch = img_size, augment, seed, 0
        self.num_classes = num_classes
        if augment and aug is None:
            from .augment import AugmentConfig
            aug = AugmentConfig()
        self.aug = aug
        self.report = LabelReport()
        self.images, self.labels, self.shapes = self._index([Path(p) for p in images])
        level = logging.WARNING if self.report.problems else logging.INFO
        log.log(level, "%s: %s", source or "dataset", self.report.summary())
        if not self.images:
            raise DataError(f"{source or 'dataset'}: no usable images ({self.report.summary()}); check the paths")

    def _index(self, paths: list[Path]) -> tuple[list[Path], list[np.ndarray], list[tuple[int, int]]]:
        images, labels, shapes, rep = [], [], [], self.report
        for p in paths:
            if not p.is_file():
                rep.missing_images += 1
                continue
            try:
                with Image.open(p) as im:
                    w, h = im.size
            except Exception:  # PIL raises several types for corrupt/unknown files
                rep.unreadable_images += 1
                continue
            rows, bad = read_labels(label_path(p), self.num_classes)
            rep.bad_rows.update(bad)
            rep.images += 1
            rep.boxes += len(rows)
            rep.background += len(rows) == 0
            images.append(p)
            labels.append(rows)
            shapes.append((h, w))
        return images, labels, shapes

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int):
        path, (h0, w0) = self.images[index], self.shapes[index]
        if self.augment:
            from .augment import augment_item
            rng = np.random.default_rng([self.seed, self.epoch, index])
            img, labels = augment_item(self, index, rng)
            ratio, pad = 1.0, (0, 0)
        else:
            img, labels, ratio, pad = self.letterboxed(index)
        tensor = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255)
        return tensor, torch.from_numpy(labels), str(path), (h0, w0), (ratio, pad)

    def letterboxed(self, index: int) -> tuple[np.ndarray, np.ndarray, float, tuple[int, int]]:
        """Letterboxed image and its labels normalised to the letterboxed image."""
        img, r, (pw, ph) = letterbox(self.load(index), self.img_size)
        labels = self.labels[index].copy()
        h0, w0 = self.shapes[index]
        s = self.img_size
        labels[:, 1] = (labels[:, 1] * w0 * r + pw) / s
        labels[:, 2] = (labels[:, 2] * h0 * r + ph) / s
        labels[:, 3] = labels[:, 3] * w0 * r / s
        labels[:, 4] = labels[:, 4] * h0 * r / s
        return img, labels, r, (pw, ph)

    def load(self, index: int) -> np.ndarray:
        try:
            return load_image(self.images[index])
        except Exception as exc:
            raise DataError(f"{self.images[index]}: cannot decode image ({exc.__class__.__name__}); "
                            "remove it from the list") from None


def collate(batch):
    """-> (imgs (N,3,S,S), targets (M,6) = [batch_index, cls, cx, cy, w, h], paths, shapes).

    shapes[i] = ((orig_h, orig_w), (ratio, (pad_w, pad_h))).
    """
    imgs, labels, paths, hw, lb = zip(*batch)
    targets = [torch.cat((torch.full((len(lab), 1), float(i)), lab.float()), 1) for i, lab in enumerate(labels)]
    targets = torch.cat(targets, 0) if targets else torch.zeros((0, 6))
    return torch.stack(imgs, 0), targets, list(paths), [(a, b) for a, b in zip(hw, lb)]


class DetectionLoader(DataLoader):
    """A DataLoader that advances the dataset's epoch (augmentation randomness) on every pass."""

    def __iter__(self):
        ds = self.dataset
        if isinstance(ds, DetectionDataset):
            ds.set_epoch(getattr(self, "_passes", 0))
            self._passes = getattr(self, "_passes", 0) + 1
        return super().__iter__()


def default_workers() -> int:
    return min(2, os.cpu_count() or 1)


def make_loader(spec_or_images: DataSpec | Sequence[str | os.PathLike] | DetectionDataset, img_size: int,
                batch_size: int = 8, augment: bool = False, workers: int | None = None,
                shuffle: bool = False, sampler: Sampler | None = None, split: str | None = None,
                aug: object | None = None, seed: int = 0) -> DetectionLoader:
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
        ds = DetectionDataset(spec_or_images, img_size, augment, nc, aug, seed, source)
    workers = default_workers() if workers is None else workers
    gen = torch.Generator().manual_seed(seed)
    return DetectionLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                           num_workers=workers, collate_fn=collate, generator=gen,
                           persistent_workers=False, drop_last=False)
