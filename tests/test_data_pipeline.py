"""The OpenCV data pipeline: boxes land on the objects after augmentation (real COCO128 images), EXIF
orientation, decode checks (truncated / changed files), ram/disk caches, plain-resize geometry, workers."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compress.data.augment import AugmentConfig
from compress.data.dataset import DetectionDataset, make_loader
from compress.base.errors import DataError

SIZE = 320


def _gray_crop(img: np.ndarray, x1: float, y1: float, x2: float, y2: float, n: int = 16) -> np.ndarray:
    """A box of an RGB/CHW-free HWC image, as an n x n grey patch with zero mean and unit norm."""
    crop = img[int(round(y1)):int(round(y2)), int(round(x1)):int(round(x2))].astype(np.float64).mean(2)
    patch = np.asarray(Image.fromarray(crop).resize((n, n), Image.BILINEAR), np.float64)
    patch -= patch.mean()
    return patch / (np.linalg.norm(patch) + 1e-9)


def _source_objects(ds: DetectionDataset) -> list[tuple[int, np.ndarray]]:
    """(class, patch) of every labelled object, cut from the image file with PIL and the raw label rows."""
    objects = []
    for path, labels in zip(ds.images, ds.labels):
        img = np.asarray(Image.open(path).convert("RGB"))
        h, w = img.shape[:2]
        for c, cx, cy, bw, bh in labels.tolist():
            if bw * w >= 24 and bh * h >= 24:
                objects.append((int(c), _gray_crop(img, (cx - bw / 2) * w, (cy - bh / 2) * h,
                                                   (cx + bw / 2) * w, (cy + bh / 2) * h)))
    return objects


def _best_match(img: np.ndarray, box: np.ndarray, objects) -> float:
    """Highest correlation of the output box's content with a same-class source object (either mirror)."""
    c, cx, cy, bw, bh = box
    patch = _gray_crop(img, (cx - bw / 2) * SIZE, (cy - bh / 2) * SIZE, (cx + bw / 2) * SIZE, (cy + bh / 2) * SIZE)
    return max((float((patch * p).sum()) for k, q in objects if k == int(c) for p in (q, q[:, ::-1])),
               default=-1.0)


@pytest.fixture(scope="module")
def coco8(request):
    from conftest import require_assets
    root = require_assets() / "data" / "coco128" / "images" / "train2017"
    return sorted(root.glob("*.jpg"))[:8]


@pytest.mark.parametrize("mosaic", [0.0, 1.0])
@pytest.mark.parametrize("letterbox", [True, False])
def test_augmented_boxes_land_on_the_objects(coco8, mosaic, letterbox):
    aug = AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, mosaic=mosaic, scale=0.3, translate=0.1, fliplr=0.5)
    ds = DetectionDataset(coco8, SIZE, augment=True, aug=aug, seed=1, num_classes=80, letterbox=letterbox)
    objects = _source_objects(ds)
    scores, shifted = [], []
    for i in range(len(ds)):
        tensor, labels = ds[i][:2]
        img = tensor.permute(1, 2, 0).numpy()
        for box in labels.numpy():
            c, cx, cy, bw, bh = box
            x1, y1, x2, y2 = (cx - bw / 2) * SIZE, (cy - bh / 2) * SIZE, (cx + bw / 2) * SIZE, (cy + bh / 2) * SIZE
            if min(x1, y1) < 1 or max(x2, y2) > SIZE - 1 or min(bw, bh) * SIZE < 24:
                continue  # clipped by the border or too small to compare
            scores.append(_best_match(img, box, objects))
            if x2 + bw * SIZE / 2 < SIZE:  # the same box moved half its width: must not match as well
                shifted.append(_best_match(img, box + [0, bw / 2, 0, 0, 0], objects))
    assert len(scores) >= 6
    assert np.median(scores) > 0.9 and np.mean(np.array(scores) > 0.7) > 0.85, scores
    assert np.median(shifted) < np.median(scores) - 0.2, (np.median(shifted), np.median(scores))


def test_plain_resize_geometry(tmp_path):
    img = tmp_path / "images" / "x.png"
    img.parent.mkdir()
    yy, xx = np.mgrid[0:50, 0:100]
    smooth = np.stack([xx * 2.5, yy * 5, (xx + yy) * 1.6], -1).astype(np.uint8)  # resamplers agree on ramps
    Image.fromarray(smooth).save(img)
    (tmp_path / "images" / "x.txt").write_text("1 0.25 0.25 0.5 0.5\n")
    tensor, labels, _, (h0, w0), (ratio, pad) = DetectionDataset([img], 64, letterbox=False)[0]
    assert (h0, w0, ratio, pad) == (50, 100, (0.64, 1.28), (0, 0))
    assert torch.allclose(labels, torch.tensor([[1, 0.25, 0.25, 0.5, 0.5]]))  # normalised: unchanged
    ref = np.asarray(Image.fromarray(np.asarray(Image.open(img))).resize((64, 64), Image.BILINEAR), np.float32)
    assert np.abs(tensor.permute(1, 2, 0).numpy() - ref).mean() < 2  # stretched, not padded


def test_exif_orientation_is_applied(tmp_path):
    """A 60x30 JPEG stored sideways with EXIF orientation 6 (rotate 90 clockwise) is a 30x60 portrait."""
    stored = np.zeros((30, 60, 3), np.uint8)
    stored[:, :10] = 255                       # white left strip -> white top strip once rotated clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "p.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    ds = DetectionDataset([path], 64, letterbox=False)
    assert ds.shapes == [(60, 30)]
    img = ds.load(0)
    assert img.shape == (60, 30, 3) and img[:8].mean() > 200 and img[20:].mean() < 30


def _jpeg(path: Path, seed: int = 0, size=(48, 64)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def test_truncated_and_broken_images_are_skipped_and_counted(tmp_path, caplog):
    good = [_jpeg(tmp_path / f"g{i}.jpg", i) for i in range(3)]
    data = _jpeg(tmp_path / "t.jpg", 9).read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[:len(data) // 2])          # truncated mid-scan
    (tmp_path / "trailing.jpg").write_bytes(good[0].read_bytes() + b"\x00garbage")  # complete + junk: fine
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    paths = [*good, tmp_path / "t.jpg", tmp_path / "trailing.jpg", tmp_path / "b.png"]
    with caplog.at_level(logging.WARNING, logger="compress.data.dataset"):
        ds = DetectionDataset(paths, 64)
    assert ds.report.unreadable_images == 2 and ds.report.bad_images == {"truncated": 1, "unreadable": 1}
    assert len(ds) == 4 and "truncated=1" in caplog.text
    # a file that breaks after indexing: a blank image and a warning, not a worker traceback
    (tmp_path / "g1.jpg").write_bytes(b"gone")
    batches = list(make_loader(ds, 64, batch_size=2, workers=2))
    assert sum(len(b[0]) for b in batches) == 4


def test_ram_and_disk_cache_give_the_same_items(tmp_path):
    paths = [_jpeg(tmp_path / f"{i}.jpg", i, (40 + 8 * i, 64)) for i in range(4)]
    for p in paths:
        p.with_suffix(".txt").write_text("0 0.5 0.5 0.5 0.5\n")
    aug = AugmentConfig(mosaic=0.5)
    plain = DetectionDataset(paths, 64, augment=True, aug=aug)
    for mode in ("ram", "disk"):
        cached = DetectionDataset(paths, 64, augment=True, aug=aug, cache=mode, cache_dir=tmp_path / "c")
        for i in range(4):
            a, b = plain[i], cached[i]
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert cached[0][0].shape == (3, 64, 64)
    assert len(list((tmp_path / "c").glob("*.npy"))) == 4 and (tmp_path / "c" / "index.json").is_file()
    with pytest.raises(DataError, match="--cache ram needs .* use --cache disk"):
        DetectionDataset(paths, 64, cache="ram", ram_budget=1000)


def test_cache_downscales_large_images_but_keeps_geometry(tmp_path):
    yy, xx = np.mgrid[0:200, 0:300]
    path = tmp_path / "big.png"
    Image.fromarray(np.stack([xx * 0.8, yy * 1.2, (xx + yy) * 0.5], -1).astype(np.uint8)).save(path)
    path.with_suffix(".txt").write_text("0 0.5 0.5 0.2 0.4\n")
    plain = DetectionDataset([path], 64, letterbox=False)
    cached = DetectionDataset([path], 64, letterbox=False, cache="ram")
    assert cached.cache.get(0).shape == (43, 64, 3)                 # long side = img_size
    a, b = plain[0], cached[0]
    assert a[3:] == b[3:] and torch.equal(a[1], b[1])                # same labels and geometry
    assert (a[0].float() - b[0].float()).abs().mean() < 2.5          # resampled twice: close


def test_persistent_workers_follow_the_epoch(tmp_path):
    paths = [_jpeg(tmp_path / f"{i}.jpg", i) for i in range(4)]
    loader = make_loader(paths, 64, batch_size=4, augment=True, workers=2, aug=AugmentConfig(), seed=5)
    assert loader.persistent_workers
    e0, e1 = [next(iter(loader))[0] for _ in range(2)]
    serial = make_loader(paths, 64, batch_size=4, augment=True, workers=0, aug=AugmentConfig(), seed=5)
    s0, s1 = [next(iter(serial))[0] for _ in range(2)]
    assert not torch.equal(e0, e1) and torch.equal(e0, s0) and torch.equal(e1, s1)


def test_augment_config_from_hyp_mapping():
    cfg = AugmentConfig.from_dict({"mosaic": 1.0, "hsv_h": "0.02", "lr0": 0.01, "box": 0.05})
    assert (cfg.mosaic, cfg.hsv_h, cfg.scale) == (1.0, 0.02, 0.5)
    with pytest.raises(DataError, match="mosaic must be in"):
        AugmentConfig.from_dict({"mosaic": 2})


def test_draw_puts_pixels_where_its_returned_matrix_says():
    """A coloured block drawn through random scale/translate/flip matrices: pixels whose centres lie inside
    its image under the returned (applied) matrix are the block's colour, as RGB planes; pixels outside are
    untouched; the applied matrix is the requested one up to half an output or half a source pixel."""
    from compress.data.augment import draw
    rng = np.random.default_rng(0)
    src = np.zeros((80, 100, 3), np.uint8)
    src[20:40, 30:60] = (255, 128, 0)  # BGR
    centres = np.arange(96) + 0.5
    for _ in range(60):
        sx, sy = rng.uniform(0.4, 2.5), rng.uniform(0.4, 2.5)
        cx, cy = rng.uniform(10, 86, 2)  # where the block's centre lands
        m = np.array([[sx, 0, cx - 45 * sx], [0, sy, cy - 30 * sy], [0, 0, 1]])
        if rng.random() < 0.5:
            m = np.array([[-1.0, 0, 96], [0, 1, 0], [0, 0, 1]]) @ m
        out = np.zeros((3, 96, 96), np.uint8)
        a = draw(src, m, out)
        corners = np.array([[30, 20, 1], [60, 40, 1]]).T
        shown = ((m @ corners) >= 0) & ((m @ corners) <= 96)  # beyond the drawn crop, errors extrapolate
        err = np.where(shown, np.abs(a @ corners - m @ corners), 0).max(1)[:2]
        assert (err <= np.maximum(0.5, np.abs(m.diagonal()[:2]) / 2) + 1e-9).all() and a[0, 0] * m[0, 0] > 0
        (x1, x2), (y1, y2) = sorted((a @ corners)[0]), sorted((a @ corners)[1])
        mx, my = abs(a[0, 0]) / 2 + 0.25, abs(a[1, 1]) / 2 + 0.25  # bilinear blends half a source pixel
        inside = (np.abs(centres[None, :] - (x1 + x2) / 2) < (x2 - x1) / 2 - mx) & \
                 (np.abs(centres[:, None] - (y1 + y2) / 2) < (y2 - y1) / 2 - my)
        outside = (np.abs(centres[None, :] - (x1 + x2) / 2) > (x2 - x1) / 2 + mx) | \
                  (np.abs(centres[:, None] - (y1 + y2) / 2) > (y2 - y1) / 2 + my)
        assert inside.any() and (out[:, inside].T == (0, 128, 255)).all()
        assert (out[:, outside] == 0).all()
