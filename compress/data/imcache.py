"""Decoded-image caches for `--cache ram|disk`, and the once-per-file decode check of dataset indexing.

Cached images are decoded (EXIF applied) and downscaled so their long side is at most the training size;
geometry is always computed from the original size, so a cached copy and a fresh decode give the same
labels. The RAM cache is filled up front (threads; OpenCV releases the GIL) so forked DataLoader workers
share it; the disk cache (`.npy` per image) fills lazily, on first use, from any worker.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from compress.base.errors import DataError
from compress.base.fileio import write_text_atomic
from compress.base.memory import available_memory
from compress.data.imageio import decode_bgr, image_info

__all__ = ["CACHE_MODES", "ImageCache", "index_images", "available_memory", "cache_size"]

log = logging.getLogger(__name__)
CACHE_MODES = ("ram", "disk")
_THREADS = min(8, os.cpu_count() or 1)
_INDEX_MEMO: dict[tuple[str, int, int], tuple[int, int] | str] = {}  # (path, size, mtime) -> (h, w) | reason
_INDEX_FILE = "index.json"


def _key(path: Path) -> tuple[str, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def index_images(paths: Sequence[Path], cache_dir: Path | None = None) -> list[tuple[int, int] | str]:
    """Per image (h, w) as decoded, or why it is unusable ('missing', 'truncated', 'unreadable (...)').

    Each file is checked once per process (and once ever when `cache_dir` holds the index), keyed by
    path, size and modification time, so an edited file is checked again.
    """
    stored = _read_index(cache_dir)
    keys = [_key(p) for p in paths]
    todo = [(p, k) for p, k in zip(paths, keys) if k is not None and k not in _INDEX_MEMO
            and "|".join(map(str, k)) not in stored]
    for p, k in zip(paths, keys):
        if k is not None and k not in _INDEX_MEMO and "|".join(map(str, k)) in stored:
            v = stored["|".join(map(str, k))]
            _INDEX_MEMO[k] = tuple(v) if isinstance(v, list) else v
    with ThreadPoolExecutor(_THREADS) as pool:
        for (p, k), info in zip(todo, pool.map(lambda item: image_info(item[0]), todo)):
            _INDEX_MEMO[k] = info
    if cache_dir is not None and any(k and "|".join(map(str, k)) not in stored for k in keys):
        _write_index(cache_dir, {**stored, **{"|".join(map(str, k)): _INDEX_MEMO[k] for k in keys if k}})
    return ["missing" if k is None else _INDEX_MEMO[k] for k in keys]


def _read_index(cache_dir: Path | None) -> dict:
    if cache_dir is None or not (cache_dir / _INDEX_FILE).is_file():
        return {}
    try:
        return json.loads((cache_dir / _INDEX_FILE).read_text())
    except (OSError, ValueError):
        return {}  # a damaged index is only a lost speed-up


def _write_index(cache_dir: Path, index: dict) -> None:
    try:
        write_text_atomic(cache_dir / _INDEX_FILE, json.dumps(index))
    except OSError as exc:
        log.warning("%s: cannot write the image index cache (%s); images will be checked again next run",
                    cache_dir, exc)


def cache_size(hw: tuple[int, int], size: int) -> tuple[int, int]:
    """(h, w) of the cached copy: downscaled so the long side is at most `size` (never upscaled)."""
    h, w = hw
    r = min(1.0, size / max(h, w))
    return max(1, round(h * r)), max(1, round(w * r))


def decode_for_cache(path: Path, size: int) -> np.ndarray | None:
    img = decode_bgr(path)
    if img is None:
        return None
    h, w = cache_size(img.shape[:2], size)
    if (h, w) != img.shape[:2]:
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    return img


class ImageCache:
    """Decoded, downscaled BGR images by dataset index (`get(i)` -> array or None when not cached)."""

    def __init__(self, mode: str, paths: Sequence[Path], shapes: Sequence[tuple[int, int]], size: int,
                 directory: Path | None = None, ram_budget: int | None = None) -> None:
        if mode not in CACHE_MODES:
            raise DataError(f"cache must be one of {CACHE_MODES} (or none), got {mode!r}")
        self.mode, self.paths, self.size = mode, list(paths), size
        self.shapes = list(shapes)
        self._ram: list[np.ndarray | None] = []
        if mode == "ram":
            self._fill_ram(shapes, ram_budget)
        else:
            if directory is None:
                raise DataError("--cache disk needs a cache folder (cache_dir)")
            self.dir = Path(directory)
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DataError(f"{self.dir}: cannot create the image cache folder ({exc}); "
                                "choose another --cache-dir or use --cache ram") from None

    def _fill_ram(self, shapes: Sequence[tuple[int, int]], budget: int | None) -> None:
        need = sum(h * w * 3 for h, w in (cache_size(s, self.size) for s in shapes))
        budget = budget if budget is not None else available_memory() // 2
        if need > budget:
            raise DataError(f"--cache ram needs {need / 2**30:.2f} GiB for {len(shapes)} images at "
                            f"{self.size} but the budget is {budget / 2**30:.2f} GiB (half the available "
                            "memory); use --cache disk, a smaller --img-size, or no cache")
        with ThreadPoolExecutor(_THREADS) as pool:
            self._ram = list(pool.map(lambda p: decode_for_cache(p, self.size), self.paths))
        log.info("cached %d images in RAM (%.2f GiB)", len(self._ram), need / 2**30)

    def _file(self, index: int) -> Path:
        key = _key(self.paths[index]) or (str(self.paths[index]), 0, 0)
        digest = hashlib.sha1(f"{key}|{self.size}".encode()).hexdigest()[:20]
        return self.dir / f"{digest}.npy"

    def _fits(self, img: np.ndarray, index: int) -> bool:
        """The cached copy of image `index` has the shape and type `decode_for_cache` gives it."""
        want = cache_size(tuple(self.shapes[index]), self.size) if index < len(self.shapes) else img.shape[:2]
        return img.dtype == np.uint8 and img.ndim == 3 and img.shape == (*want, 3)

    def get(self, index: int) -> np.ndarray | None:
        if self.mode == "ram":
            return self._ram[index]
        f = self._file(index)
        if f.is_file():
            try:
                cached = np.load(f)
            except (OSError, ValueError):
                cached = None  # a partial or damaged file: decode again and rewrite it
            if cached is not None and self._fits(cached, index):
                return cached
            # another array under this name (an edited or reused --cache-dir) would break the resize in a worker
        img = decode_for_cache(self.paths[index], self.size)
        if img is not None:
            tmp = f.with_name(f"{f.stem}.{os.getpid()}.tmp.npy")
            try:
                np.save(tmp, img)
                os.replace(tmp, f)
            except OSError as exc:
                log.warning("%s: cannot write the image cache (%s)", f, exc)
        return img
