"""JPEG decoding through simplejpeg: pixel-identical to OpenCV's imread (the independent reference, same
libjpeg-turbo) on real COCO images at every DCT reduction; EXIF orientation read from the bytes as Pillow
reads it; files simplejpeg cannot take (rotated, CMYK, truncated) still decode through OpenCV/Pillow."""
from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from compress.data import imageio
from compress.data.imageio import decode_bgr, exif_orientation, split_into

_CV_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
               8: cv2.IMREAD_REDUCED_COLOR_8}


@pytest.fixture(scope="module")
def coco_jpegs():
    from conftest import require_assets
    root = require_assets() / "data"
    return sorted((root / "coco128" / "images" / "train2017").glob("*.jpg"))[:24] + sorted(
        (root / "samples").glob("*.jpg"))


def test_simplejpeg_is_the_decoder(coco_jpegs, monkeypatch):
    """The fast path is taken (not silently OpenCV): with simplejpeg's decode broken, decoding fails over."""
    assert imageio.simplejpeg is not None, "simplejpeg is a dependency: pip install simplejpeg"
    calls = []
    real = imageio.simplejpeg.decode_jpeg
    monkeypatch.setattr(imageio.simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(1) or real(*a, **k))
    decode_bgr(coco_jpegs[0])
    assert calls == [1]


@pytest.mark.parametrize("reduce", [1, 2, 4, 8])
def test_decode_matches_opencv_exactly(coco_jpegs, reduce):
    for path in coco_jpegs:
        ours = decode_bgr(path, reduce)
        ref = cv2.imread(str(path), _CV_REDUCED[reduce])
        assert ours.shape == ref.shape and ours.dtype == np.uint8, path
        assert np.array_equal(ours, ref), f"{path} at 1/{reduce}: max diff {np.abs(ours.astype(int) - ref).max()}"


def test_exif_orientation_matches_pillow(coco_jpegs, tmp_path):
    for path in coco_jpegs:
        with Image.open(path) as im:
            assert exif_orientation(path.read_bytes()) == im.getexif().get(0x0112, 1), path
    base = Image.fromarray(np.zeros((8, 12, 3), np.uint8))
    for value in range(1, 9):
        exif = Image.Exif()
        exif[0x0110] = "camera"  # another IFD0 entry before the orientation
        exif[0x0112] = value
        buf = io.BytesIO()
        base.save(buf, "JPEG", exif=exif)
        assert exif_orientation(buf.getvalue()) == value


def test_exif_orientation_big_endian_and_absent():
    """A Motorola-order (MM) TIFF header, as many cameras write; no APP1 at all; garbage."""
    ifd = b"\x00\x01" + b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x08\x00\x00" + b"\x00\x00\x00\x00"
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + ifd
    app1 = b"\xff\xe1" + (len(tiff) + 8).to_bytes(2, "big") + b"Exif\x00\x00" + tiff
    assert exif_orientation(b"\xff\xd8" + app1 + b"\xff\xda\x00\x02") == 8
    assert exif_orientation(b"\xff\xd8\xff\xdb\x00\x04\x00\x00\xff\xda") == 1
    assert exif_orientation(b"not a jpeg") == 1
    assert exif_orientation(b"\xff\xd8" + app1[:14]) == 1  # cut inside the TIFF header


def test_rotated_cmyk_and_truncated_jpegs_still_decode(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    assert decode_bgr(tmp_path / "rot.jpg").shape == (60, 40, 3)  # rotated by OpenCV
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    img = decode_bgr(tmp_path / "cmyk.jpg")
    assert img.shape == (40, 60, 3) and np.array_equal(img, cv2.imread(str(tmp_path / "cmyk.jpg")))
    Image.fromarray(rgb).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) * 2 // 3])
    ours, ref = decode_bgr(tmp_path / "cut.jpg"), cv2.imread(str(tmp_path / "cut.jpg"))
    assert ref is not None and np.array_equal(ours, ref)  # OpenCV's partial decode, as before


def test_split_into_strided_views_equals_transpose():
    rng = np.random.default_rng(1)
    tile = rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)
    for out_w in (50, 64):  # contiguous destination and a tile of a wider canvas
        out = np.zeros((3, 40, out_w), np.uint8)
        split_into(tile, [out[c, 5:35, :50] for c in (2, 1, 0)])
        assert np.array_equal(out[:, 5:35, :50], tile[..., ::-1].transpose(2, 0, 1))
        assert not out[:, :5].any() and not out[:, 35:].any() and not out[:, :, 50:].any()
