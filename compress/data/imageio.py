"""Image decoding (libjpeg-turbo through simplejpeg for JPEG, OpenCV otherwise; EXIF orientation applied),
the decode check, and the input geometry.

Two input geometries exist, as in Darknet: a plain resize to S x S (Darknet's default) and a letterbox
(aspect kept, grey padding; Darknet with `letter_box=1` in `[net]`). Both are described by the same
`(ratio_w, ratio_h), (pad_w, pad_h)` pair: an original point (x, y) lands at
(x * ratio_w + pad_w, y * ratio_h + pad_h) in the network input.
"""
from __future__ import annotations

import ctypes
import os
import stat
import threading
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

from compress.base.errors import DataError

try:  # a declared dependency; without it (no wheel for the platform) OpenCV decodes everything
    import simplejpeg
except ImportError:  # pragma: no cover - exercised only where simplejpeg is not installed
    simplejpeg = None

__all__ = ["PAD_VALUE", "decode_bgr", "exif_orientation", "reduce_factor", "load_image", "image_info", "letterbox", "fit_image", "geometry",
           "cfg_letterbox", "split_into", "rgb_planes", "tune_allocator"]

PAD_VALUE = 114          # grey padding (114/255), as in Darknet-trained YOLO letterboxing
_ORIENT_SWAPS = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees (width and height swap)
_JPEG = (".jpg", ".jpeg")     # EXIF orientation is honoured for JPEG files (what cameras write)
cv2.setNumThreads(1)     # one DataLoader worker = one core; OpenCV's own threads would oversubscribe


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_tuned_pid: int | None = None


def tune_allocator() -> None:
    """Once per process (DataLoader workers included): keep freed image buffers in the C heap.

    glibc hands the top of its heap back to the OS once more than its trim threshold is free (by default
    twice the largest freed large block, ~2 MB here), so each item's decode buffers were page-faulted in
    anew: ~440 faults and 1.3 ms of system time per augmented 416 item, a quarter of its cost (measured).
    Fixed thresholds (64 MB trim, 32 MB mmap) keep them. Elsewhere than glibc: nothing to do."""
    global _tuned_pid
    if _tuned_pid == os.getpid():
        return
    _tuned_pid = os.getpid()
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no C library handle (Windows) or no mallopt (macOS)
        return
    mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)


_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}


def reduce_factor(scale: float) -> int:
    """The largest decode reduction (1, 2, 4, 8) that still leaves at least one source pixel per output pixel
    when the image is drawn at `scale` (output px per original px)."""
    return next((k for k in (8, 4, 2) if scale * k <= 1.0), 1)


def decode_bgr(path: str | os.PathLike, reduce: int = 1, scratch: bool = False) -> np.ndarray | None:
    """BGR uint8 (H, W, 3) with the EXIF orientation applied, or None.

    `reduce` (2, 4, 8) decodes at 1/reduce of the size (JPEG DCT scaling: the entropy decoding stays, the
    inverse DCT and colour conversion of the dropped pixels go: on COCO128, whose JPEGs are 4:4:4, 11% faster
    at 1/2 and 25% at 1/8, as entropy decoding is most of the work).
    `scratch`: a JPEG may land in this thread's reusable buffer, which the next scratch decode overwrites
    (for callers that resample the image before decoding another: 2% faster augmentation)."""
    path = os.fspath(path)
    if not _regular(path):
        return None
    jpeg = os.path.splitext(path)[1].lower() in _JPEG
    img = _decode_jpeg(path, reduce, scratch) if jpeg else None
    if img is not None:
        return img
    flags = _REDUCED[reduce] | (0 if jpeg else cv2.IMREAD_IGNORE_ORIENTATION)  # EXIF orientation: JPEG only
    img = cv2.imread(path, flags)
    if img is None:  # formats OpenCV lacks (or odd paths): fall back to Pillow
        try:
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im) if jpeg else im
                img = np.ascontiguousarray(np.asarray(im.convert("RGB"))[..., ::-1])
        except Exception:  # noqa: BLE001 - any decoder failure means "undecodable"
            return None
    return img


_scratch = threading.local()


def _scratch_buffer(nbytes: int) -> np.ndarray:
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < nbytes:
        buf = _scratch.buf = np.empty(nbytes, np.uint8)
    return buf


def _decode_jpeg(path: str, reduce: int, scratch: bool = False) -> np.ndarray | None:
    """The common JPEG (no EXIF rotation) through simplejpeg: the same libjpeg-turbo decoder as OpenCV's
    (pixel-identical output, at every `reduce`; tested) without OpenCV's imread overhead, 13% faster on
    COCO images. None hands the file to OpenCV: rotated, CMYK, damaged or truncated JPEGs, no simplejpeg."""
    if simplejpeg is None:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
        if exif_orientation(data) != 1:
            return None
        if reduce == 1 and not scratch:
            return simplejpeg.decode_jpeg(data, "BGR")
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        return simplejpeg.decode_jpeg(data, "BGR", min_height=-(-h // reduce), min_width=-(-w // reduce),
                                      buffer=_scratch_buffer(h * w * 3) if scratch else None)
    except (OSError, ValueError):
        return None


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1..8) in JPEG bytes: tag 0x0112 of IFD0 in the APP1 "Exif" segment; 1 when
    there is none (or it cannot be read, as OpenCV and Pillow then ignore it too)."""
    pos = 2  # walk the segment headers (a handful before the scan) rather than search the bytes (80 us)
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: no metadata after this
            break
        size = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xE1 and data[pos + 4:pos + 10] == b"Exif\0\0":
            return _tiff_orientation(data[pos + 10:pos + 2 + size])
        pos += 2 + size
    return 1


def _tiff_orientation(t: bytes) -> int:
    order = {b"II": "little", b"MM": "big"}.get(t[:2])
    if order is None or len(t) < 8:
        return 1
    u = lambda a, n: int.from_bytes(t[a:a + n], order)  # noqa: E731
    ifd = u(4, 4)
    for k in range(u(ifd, 2) if ifd + 2 <= len(t) else 0):
        entry = ifd + 2 + 12 * k
        if entry + 12 > len(t):
            break
        if u(entry, 2) == 0x0112:
            value = u(entry + 8, 2)
            return value if 1 <= value <= 8 else 1
    return 1


def split_into(img: np.ndarray, views: list[np.ndarray]) -> None:
    """De-interleave `img` (H, W, 3) into three (H, W) plane views (e.g. a tile of a (3, S, S) canvas)."""
    if not all(v.flags.c_contiguous for v in views):
        # OpenCV's split into row-strided destinations is ~15x slower than into contiguous ones (measured:
        # 0.35 vs 0.02 ms at 416): split into a scratch block, then copy its rows
        scratch = np.empty((3, *img.shape[:2]), img.dtype)
        split_into(img, list(scratch))
        for v, plane in zip(views, scratch):
            v[...] = plane
        return
    got = cv2.split(img, views)  # OpenCV writes into destinations of the right size and type ...
    if not np.shares_memory(got[0], views[0]):  # ... should it ever allocate instead, copy
        for g, v in zip(got, views):
            v[...] = g


def rgb_planes(bgr: np.ndarray) -> np.ndarray:
    """BGR (H, W, 3) -> RGB (3, H, W), uint8."""
    out = np.empty((3, *bgr.shape[:2]), bgr.dtype)
    split_into(bgr, [out[2], out[1], out[0]])
    return out


def load_image(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 (H, W, 3), EXIF orientation applied."""
    img = decode_bgr(path)
    if img is None:
        raise DataError(f"{path}: cannot decode image; remove it from the list")
    return np.ascontiguousarray(img[..., ::-1])


def image_info(path: Path) -> tuple[int, int] | str:
    """(h, w) as decoded (EXIF orientation applied), or the reason the image is unusable.

    Cheap: reads the header and, for JPEG, checks the end-of-image marker; only a JPEG without one
    (truncated, or trailing bytes) is decoded in full to tell the two apart.
    """
    if not _regular(path):
        return "not a regular file"  # a FIFO would block the read, a device never ends
    try:
        with Image.open(path) as im:
            w, h = im.size
            fmt = im.format
            orient = im.getexif().get(0x0112, 1) if fmt == "JPEG" and path.suffix.lower() in _JPEG else 1
        if fmt == "PNG":
            with Image.open(path) as im:
                im.verify()  # chunk CRCs: catches truncated or damaged files without decoding
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for corrupt files
        return f"unreadable ({exc.__class__.__name__})"
    if w < 1 or h < 1:
        return "empty"
    if fmt == "JPEG" and not _jpeg_complete(path):
        return "truncated"
    return (w, h) if orient in _ORIENT_SWAPS else (h, w)


def _regular(path: str | os.PathLike) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _jpeg_complete(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 64))
        if f.read().rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
            return True
    try:  # no end marker at the end: decode in full (Pillow raises on truncated data)
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001
        return False


def geometry(h0: int, w0: int, size: int, letterbox: bool
             ) -> tuple[tuple[float, float], tuple[int, int], tuple[int, int]]:
    """((ratio_w, ratio_h), (pad_w, pad_h), (new_w, new_h)) of an h0 x w0 image in a size x size input."""
    if not letterbox:
        return (size / w0, size / h0), (0, 0), (size, size)
    r = min(size / h0, size / w0)
    nw, nh = max(1, round(w0 * r)), max(1, round(h0 * r))
    return (r, r), ((size - nw) // 2, (size - nh) // 2), (nw, nh)


def fit_image(img: np.ndarray, size: int, letterbox: bool, orig_hw: tuple[int, int] | None = None,
              color: int = PAD_VALUE) -> tuple[np.ndarray, tuple[float, float], tuple[int, int]]:
    """The network input of `img` (any channel order) and its geometry relative to `orig_hw` (default: img's).

    `img` may be a downscaled copy (the image cache); the geometry still refers to the original size.
    """
    h0, w0 = orig_hw or img.shape[:2]
    ratio, (pw, ph), (nw, nh) = geometry(h0, w0, size, letterbox)
    if img.shape[1] != nw or img.shape[0] != nh:
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    if (nw, nh) == (size, size):
        return img, ratio, (pw, ph)
    out = np.full((size, size, 3), color, np.uint8)
    out[ph:ph + nh, pw:pw + nw] = img
    return out, ratio, (pw, ph)


def letterbox(img: np.ndarray, size: int, color: int = PAD_VALUE) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Resize keeping the aspect ratio and pad to size x size: (image, ratio, (pad_w, pad_h)).

    A point (x, y) of the original maps to (x * ratio + pad_w, y * ratio + pad_h).
    """
    out, (r, _), pad = fit_image(img, size, True, color=color)
    return out, r, pad


def cfg_letterbox(model: object) -> bool | None:
    """The input geometry a model declares: its own `letterbox` attribute (e.g. an exported-model wrapper),
    else `letter_box` of its cfg's [net] (Darknet: 0 = plain resize); None when it declares nothing."""
    value = getattr(model, "letterbox", None)
    if isinstance(value, bool):
        return value
    cfg = getattr(model, "cfg", None)
    net = getattr(cfg, "net", None)
    if net is None or not hasattr(net, "get_int"):
        return None
    return net.get_int("letter_box", 0) > 0
