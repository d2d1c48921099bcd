"""`data convert`: COCO json / Pascal VOC xml datasets -> our layout (images/, labels/ YOLO txt, a .data file).

One call converts one split (`train` or `valid`) into OUT; call again with the other split to add it.
OUT gets `images/<split>/` (symlinks, or copies), `labels/<split>/*.txt`, `<split>.txt`, `classes.names`
and `dataset.data`. What is skipped is counted by reason and returned (and listed in `convert.json`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from compress.data.dataspec import IMG_EXTS, read_names
from compress.base.errors import DataError
from compress.base.fileio import write_text_atomic

__all__ = ["ConvertConfig", "ConvertResult", "convert", "CONVERTERS"]

log = logging.getLogger(__name__)
SPLITS = ("train", "valid")


@dataclass(frozen=True)
class ConvertConfig:
    source: str                 # 'coco' | 'voc'
    src: Path                   # COCO: the instances json; VOC: the VOC2007/VOC2012 folder
    out: Path
    split: str = "train"
    images: Path | None = None  # COCO: the image folder (default: beside the json, or its images/)
    names: Path | None = None   # fixed class order (VOC: default sorted names found)
    copy: bool = False          # copy images instead of symlinking them

    def __post_init__(self) -> None:
        if self.source not in CONVERTERS:
            raise DataError(f"--from must be one of {sorted(CONVERTERS)}, got {self.source!r}")
        if self.split not in SPLITS:
            raise DataError(f"--split must be one of {SPLITS}, got {self.split!r}")
        if not Path(self.src).exists():
            raise DataError(f"{self.src}: not found; pass the COCO json or the VOC folder as --src")


@dataclass
class ConvertResult:
    data: Path
    images: int = 0
    boxes: int = 0
    names: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    kept: Counter = field(default_factory=Counter)     # boxes kept after an adjustment: what -> count

    def to_dict(self) -> dict:
        return {"data": str(self.data), "images": self.images, "boxes": self.boxes, "classes": len(self.names),
                "skipped": dict(sorted(self.skipped.items())), "kept": dict(sorted(self.kept.items()))}


# The converters count in one Counter; keys with this prefix are boxes they KEPT after adjusting them (issue #26:
# "skipped box: clipped to the image (kept)" read as a skipped box); `convert` moves them to ConvertResult.kept.
KEPT = "kept: "
Record = tuple[Path, list[tuple[int, float, float, float, float]]]  # image, [(cls, cx, cy, w, h)]


def _coco(cfg: ConvertConfig, skipped: Counter) -> tuple[list[Record], list[str]]:
    try:
        doc = json.loads(Path(cfg.src).read_text())
        cats = sorted(doc["categories"], key=lambda c: c["id"])
        images = {im["id"]: im for im in doc["images"]}
        _check_categories(cats, cfg.src)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{cfg.src}: not a COCO instances json ({exc.__class__.__name__}: "
                        f"{str(exc)[:200]})") from None
    except RecursionError:  # json nests deeper than Python's stack: no COCO file does
        raise DataError(f"{cfg.src}: not a COCO instances json (nested too deeply)") from None
    names = [str(c["name"]) for c in cats]
    if cfg.names is not None:
        names = read_names(cfg.names)
    index = {c["id"]: names.index(str(c["name"])) if str(c["name"]) in names else None for c in cats}
    root = cfg.images or next((d for d in (Path(cfg.src).parent / "images", Path(cfg.src).parent) if d.is_dir()))
    boxes: dict[int, list] = {i: [] for i in images}
    for ann in doc.get("annotations", []):
        if not isinstance(ann, dict):
            skipped["box: annotation not an object"] += 1
            continue
        im = images.get(ann.get("image_id"))
        cls = index.get(ann.get("category_id"))
        if im is None:
            skipped["box: unknown image_id"] += 1
        elif cls is None:
            skipped["box: category not in names"] += 1
        elif ann.get("iscrowd"):
            skipped["box: iscrowd"] += 1
        elif not _numbers(ann.get("bbox"), 4) or not _numbers([im.get("width"), im.get("height")], 2):
            skipped["box: bbox or image size not numbers"] += 1
        else:
            box = _norm_box(*ann["bbox"], im["width"], im["height"], skipped)
            if box is not None:
                boxes[im["id"]].append((cls, *box))
    return [(root / im["file_name"], boxes[i]) for i, im in images.items()], names


def _numbers(values: object, n: int) -> bool:
    """A list of `n` int/float values (a bbox `"abc"` or `[5, 5]` is not one)."""
    return isinstance(values, (list, tuple)) and len(values) == n and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _check_categories(cats: list, src: Path) -> None:
    """One class per id, and names the names file can hold one per line (read back as the same list)."""
    seen: dict = {}
    for c in cats:
        name = str(c["name"])
        if c["id"] in seen:
            raise DataError(f"{src}: category id {c['id']} is listed twice ({seen[c['id']]!r} and {name!r}); give "
                            "each category its own id")
        if name.splitlines() != [name] or name != name.strip():  # read_names splits and strips exactly so
            raise DataError(f"{src}: category id {c['id']} has the name {name!r}; a class name is one line without "
                            "leading/trailing blanks (the names file holds one per line); fix it or pass --names FILE")
        seen[c["id"]] = name


def _norm_box(x: float, y: float, w: float, h: float, iw: float, ih: float, skipped: Counter):
    """Pixel x, y, w, h (top-left) -> normalised cx, cy, w, h clipped to the image, or None (counted)."""
    if not all(math.isfinite(v) for v in (x, y, w, h, iw, ih)):  # NaN passes every comparison below
        skipped["box: NaN or infinite coordinates"] += 1
        return None
    if w <= 0 or h <= 0 or iw <= 0 or ih <= 0:
        skipped["box: zero or negative size"] += 1
        return None
    x1, y1, x2, y2 = max(0.0, x), max(0.0, y), min(float(iw), x + w), min(float(ih), y + h)
    if x2 - x1 < 1 or y2 - y1 < 1:
        skipped["box: outside the image"] += 1
        return None
    if (x1, y1, x2, y2) != (x, y, x + w, y + h):
        skipped[KEPT + "box clipped to the image"] += 1  # kept: counted apart from the skipped (see `convert`)
    return (x1 + x2) / 2 / iw, (y1 + y2) / 2 / ih, (x2 - x1) / iw, (y2 - y1) / ih


def _voc(cfg: ConvertConfig, skipped: Counter) -> tuple[list[Record], list[str]]:
    root = Path(cfg.src)
    ann_dir, img_dir = root / "Annotations", root / "JPEGImages"
    if not ann_dir.is_dir():
        raise DataError(f"{root}: no Annotations/ folder; pass a VOC year folder (e.g. VOCdevkit/VOC2007) as --src")
    ids_file = root / "ImageSets" / "Main" / ("train.txt" if cfg.split == "train" else "val.txt")
    ids = ids_file.read_text().split() if ids_file.is_file() else sorted(p.stem for p in ann_dir.glob("*.xml"))
    parsed = [(i, _voc_objects(ann_dir / f"{i}.xml", skipped)) for i in ids]
    names = read_names(cfg.names) if cfg.names else sorted({o[0] for _, (_, objs) in parsed for o in objs})
    records = []
    for i, (size, objs) in parsed:
        if size is None:
            continue
        labels = []
        for name, difficult, (x1, y1, x2, y2) in objs:
            if name not in names:
                skipped["box: class not in names"] += 1
            elif difficult:
                skipped["box: difficult"] += 1
            else:  # VOC pixel coordinates are 1-based
                box = _norm_box(x1 - 1, y1 - 1, x2 - x1, y2 - y1, *size, skipped)
                if box is not None:
                    labels.append((names.index(name), *box))
        records.append((img_dir / f"{i}.jpg", labels))
    return records, names


def _voc_objects(xml: Path, skipped: Counter):
    try:
        tree = ET.parse(xml).getroot()
        size = (float(tree.findtext("size/width")), float(tree.findtext("size/height")))
        objs = [(o.findtext("name", "").strip(), o.findtext("difficult", "0").strip() == "1",
                 tuple(float(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")))
                for o in tree.iter("object")]
    except (OSError, ET.ParseError, TypeError, ValueError):
        skipped["image: annotation xml missing or malformed"] += 1
        return None, []
    return size, objs


CONVERTERS: dict[str, Callable[[ConvertConfig, Counter], tuple[list[Record], list[str]]]] = {
    "coco": _coco, "voc": _voc}


def convert(cfg: ConvertConfig) -> ConvertResult:
    """Convert one split; write OUT/labels, OUT/images links, the list file, names, .data and convert.json."""
    out = Path(cfg.out)
    if out.resolve() == Path(cfg.src).resolve() or Path(cfg.src).resolve() in out.resolve().parents:
        raise DataError(f"--out {out} is inside the source dataset; choose a separate folder")
    skipped: Counter = Counter()
    records, names = CONVERTERS[cfg.source](cfg, skipped)
    if not names:
        raise DataError(f"{cfg.src}: no classes found; pass --names FILE")
    kept = Counter({k[len(KEPT):]: skipped.pop(k) for k in [k for k in skipped if k.startswith(KEPT)]})
    result = ConvertResult(out / "dataset.data", names=names, skipped=skipped, kept=kept)
    listed = []
    _check_unique_names(records, cfg.src)
    for image, labels in records:
        if not image.is_file() or image.suffix.lower() not in IMG_EXTS:
            skipped["image: file missing or not an image"] += 1
            continue
        dst = out / "images" / cfg.split / image.name
        _place(image, dst, cfg.copy)
        text = "".join(f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n" for c, cx, cy, w, h in labels)
        write_text_atomic(out / "labels" / cfg.split / f"{image.stem}.txt", text)
        listed.append(f"images/{cfg.split}/{image.name}")
        result.images, result.boxes = result.images + 1, result.boxes + len(labels)
    if not listed:
        raise DataError(f"{cfg.src}: no image converted ({dict(skipped)}); check --images / the folder layout")
    write_text_atomic(out / f"{cfg.split}.txt", "\n".join(listed) + "\n")
    _write_meta(out, names, result, cfg.split)
    return result


def _check_unique_names(records: list[Record], src: Path) -> None:
    """Two entries writing one images/<split>/<name> (and labels/<name>.txt) would lose one's boxes."""
    first: dict[str, Path] = {}
    for image, _ in records:
        other = first.setdefault(image.name, image)
        if other is not image:
            raise DataError(f"{src}: two images become {image.name} ({other} and {image}); each image needs its own "
                            "file name (fix the duplicate entry in the annotations)")


def _place(src: Path, dst: Path, copy: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    if copy:
        shutil.copy2(src, dst)
    else:
        os.symlink(src.resolve(), dst)


def _write_meta(out: Path, names: list[str], result: ConvertResult, split: str) -> None:
    names_file = out / "classes.names"
    if names_file.is_file() and read_names(names_file) != names:
        raise DataError(f"{names_file}: holds other classes than this split's; convert both splits with the "
                        "same --names FILE")
    write_text_atomic(names_file, "\n".join(names) + "\n")
    splits = {s: f"{s}.txt" for s in SPLITS if (out / f"{s}.txt").is_file()}
    lines = [f"classes = {len(names)}", f"train = {splits.get('train', splits.get('valid'))}",
             f"valid = {splits.get('valid', splits.get('train'))}", "names = classes.names"]
    write_text_atomic(out / "dataset.data", "\n".join(lines) + "\n")
    report = out / "convert.json"
    try:
        previous = json.loads(report.read_text()) if report.is_file() else {}
    except ValueError:
        previous = {}
    previous[split] = result.to_dict()
    write_text_atomic(report, json.dumps(previous, indent=1) + "\n")
