"""Dataset specs and YOLO labels: Darknet `.data` files, Ultralytics `data.yaml` files, image folders.

A `.data` file names `classes`, `train`, `valid` and `names`; `train`/`valid` are list files (one image
path per line) or image folders. A `data.yaml` (Ultralytics) names `path`, `train`, `val` and `names`
(a list or an id -> name map). Labels (`cls cx cy w h`, normalised) live beside each image or in the
sibling `labels/` tree (the last `images` path component replaced by `labels`, extension `.txt`).
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from compress.base.errors import DataError
from compress.base.fileio import require_regular
from compress.base.yamlio import load_yaml, read_yaml_text

__all__ = ["DataSpec", "load_data_spec", "label_path", "find_names", "read_names", "read_labels", "list_images",
           "IMG_EXTS"]

log = logging.getLogger(__name__)
IMG_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_TOL = 1e-3      # label coordinates this far outside [0, 1] are clipped, further out the row is dropped
_YAML_EXTS = (".yaml", ".yml")


@dataclass(frozen=True)
class DataSpec:
    """Image lists of a dataset and its class names."""
    train: list[Path]
    valid: list[Path]
    names: list[str]
    source: str = ""
    names_from_labels: bool = False   # no names file: ids 0..max label id (a model may predict more classes)

    @property
    def nc(self) -> int:
        return len(self.names)

    @property
    def train_is_valid(self) -> bool:
        """Training would be scored on its own images."""
        return bool(self.train) and self.train == self.valid

    def __str__(self) -> str:
        return self.source


# ----------------------------------------------------------------------------- spec loading

def load_data_spec(path: "str | os.PathLike | DataSpec", val: str | os.PathLike | None = None,
                   training: bool = False) -> DataSpec:
    """Read a Darknet `.data`, an Ultralytics `data.yaml`, or take a folder of images (+ labels).

    `val` (an image folder or list file) replaces the valid split. With `training`, a spec whose train
    and valid splits are the same images logs a warning (scores would be measured on training images).
    A DataSpec passes through (with `val` applied).
    """
    spec = path if isinstance(path, DataSpec) else _load(Path(path))
    if val is not None:
        valid = _image_list(str(val), [Path.cwd()], Path(val), "--val")
        if not valid:
            raise DataError(f"--val {val}: no images found; pass an image folder or a list file")
        spec = replace(spec, valid=valid, source=f"{spec.source} (valid: {val})")
    if training and spec.train_is_valid:
        log.warning("%s: train and valid are the same %d images, so validation scores training images; "
                    "pass --val DIR (or a .data/data.yaml with a separate valid split) to hold images out",
                    spec.source, len(spec.train))
    return spec


def _load(path: Path) -> DataSpec:
    if path.is_dir():
        return _folder_spec(path)
    require_regular(path, "--data", DataError)
    if not path.is_file():
        raise DataError(f"{path}: no such .data / data.yaml file or image folder; pass an existing --data")
    if path.suffix.lower() in _YAML_EXTS:
        return _yaml_spec(path)
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
            raise DataError(f"{path}:{n}: expected 'key = value', got {line!r}; fix the .data file "
                            "(or name an Ultralytics data file *.yaml)")
        key, value = (s.strip() for s in line.split("=", 1))
        if key == "classes":  # Darknet's atoi reads `abc` as 0 and `-3` as -3; both run on silently
            _check_classes(value, f"{path}:{n}")
        opts[key] = value
    return opts


def _check_classes(value: str, where: str) -> None:
    if not (value.isdigit() and int(value) >= 1):
        raise DataError(f"{where}: classes = {value[:40]} is not a class count; write a whole number >= 1 (the number "
                        "of names)")


def _yaml_spec(path: Path) -> DataSpec:
    """An Ultralytics data.yaml: `path` (root, relative to the yaml's folder), `train`/`val` (folders,
    list files, or lists of them, relative to the root), `names` (list or {id: name}), optional `nc`."""
    doc = load_yaml(read_yaml_text(path, DataError), str(path), DataError)  # bounded: an alias bomb is refused
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a mapping with train/val/names (Ultralytics data.yaml)")
    root = Path(str(doc.get("path") or ".")).expanduser()
    bases = [root] if root.is_absolute() else [path.parent / root, path.parent.parent / root, Path.cwd() / root]
    base = next((b for b in bases if b.is_dir()), bases[0]).resolve()
    splits = {}
    for key in ("train", "val"):
        values = doc.get(key) or []
        values = values if isinstance(values, list) else [values]
        splits[key] = [p for v in values for p in _image_list(_yaml_rel(str(v), base), [base], path, key)]
    names = _yaml_names(doc, path)
    train, valid = splits["train"], splits["val"] or splits["train"]
    if not train and not valid:
        raise DataError(f"{path}: neither 'train' nor 'val' lists any image (root {base}); fix the paths")
    return DataSpec(train=train, valid=valid, names=names, source=str(path))


def _yaml_rel(value: str, base: Path) -> str:
    """Exports that write `../train/images` beside a yaml at the dataset root (as Ultralytics accepts) mean
    `train/images` under the root."""
    if value.startswith("../") and not (base / value).exists() and (base / value[3:]).exists():
        return value[3:]
    return value


def _yaml_names(doc: dict, path: Path) -> list[str]:
    names, nc = doc.get("names"), doc.get("nc")
    if isinstance(names, dict):
        try:
            ids = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise DataError(f"{path}: names keys must be class ids 0..N-1") from None
        if ids != list(range(len(ids))):
            raise DataError(f"{path}: names ids must be 0..{len(ids) - 1} without gaps, got {ids}")
        names = [str(names[k] if k in names else names[str(k)]) for k in ids]
    elif isinstance(names, list):
        names = [str(n) for n in names]
    elif names is None and isinstance(nc, int) and nc > 0:
        names = [str(i) for i in range(nc)]
    else:
        raise DataError(f"{path}: needs 'names' (a list or an id: name map) or 'nc'; add one")
    if isinstance(nc, int) and nc != len(names):
        raise DataError(f"{path}: nc: {nc} but {len(names)} names; make them agree")
    return names


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
    require_regular(target, f"{data_file}: {key} =", DataError)
    if not target.is_file():
        tried = " and ".join(str(b) for b in bases[:2])
        raise DataError(f"{data_file}: {key} = {value} not found (tried relative to {tried}); fix the path")
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
    path = require_regular(path, "names file", DataError)
    return [s.strip() for s in path.read_text(errors="replace").splitlines() if s.strip()]


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
    return DataSpec(train=images, valid=images, names=names, source=str(folder),
                    names_from_labels=names_file is None)


# ----------------------------------------------------------------------------- labels

def label_path(image: Path) -> Path:
    """Label file of an image: in the sibling labels/ tree if that file exists, else beside the image."""
    # string operations: this runs for every image of a dataset (pathlib's parsing was most of the cost)
    stem = os.path.splitext(os.fspath(image))[0]
    rooted = stem if stem.startswith(os.sep) else os.sep + stem
    head, sep, tail = rooted.rpartition(f"{os.sep}images{os.sep}")  # the last `images` folder of the path
    if sep:
        candidate = f"{head}{os.sep}labels{os.sep}{tail}.txt"[len(rooted) - len(stem):]
        if os.path.isfile(candidate):
            return Path(candidate)
    return Path(stem + ".txt")


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
