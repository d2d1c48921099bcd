"""Data specs, label validation, letterbox, dataset/loader, augmentation and the synthetic dataset."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compress.data.augment import AugmentConfig, flip_lr
from compress.data.dataset import (DataSpec, DetectionDataset, collate, label_path, letterbox, load_data_spec,
                           make_loader)
from compress.base.errors import DataError
from compress.data.synth import synthesize


def _image(path: Path, w: int, h: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _label(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("synth"), n_train=6, n_valid=3, img_size=64, seed=1)


def test_data_file_relative_paths_and_labels_tree(tmp_path):
    root = tmp_path / "darknet"
    img = _image(root / "data" / "images" / "a.jpg", 40, 30)
    _label(root / "data" / "labels" / "a.txt", "1 0.5 0.5 0.2 0.4\n")
    (root / "data" / "train.txt").write_text("data/images/a.jpg\n")   # relative to the darknet root
    (root / "cfg").mkdir()
    (root / "cfg" / "x.names").write_text("cat\ndog\n")
    data = root / "cfg" / "x.data"
    data.write_text("classes= 2\ntrain = data/train.txt\nvalid = data/images  # a folder\nnames = cfg/x.names\n")
    spec = load_data_spec(data)
    assert spec.nc == 2 and spec.names == ["cat", "dog"]
    assert [p.resolve() for p in spec.train] == [img.resolve()] == [p.resolve() for p in spec.valid]
    assert label_path(img) == root / "data" / "labels" / "a.txt"
    ds = DetectionDataset(spec.train, 64, num_classes=spec.nc)
    assert ds.labels[0].tolist() == [[1.0, 0.5, 0.5, pytest.approx(0.2), pytest.approx(0.4)]]


def test_folder_spec_names_from_parent_and_labels_beside(tmp_path):
    img = _image(tmp_path / "set" / "imgs" / "b.png", 32, 32)
    _label(img.with_suffix(".txt"), "0 0.5 0.5 0.5 0.5\n")
    (tmp_path / "set" / "my.names").write_text("thing\n")
    spec = load_data_spec(tmp_path / "set" / "imgs")
    assert spec.names == ["thing"] and spec.valid == [img]
    assert label_path(img) == img.with_suffix(".txt")


def test_bad_spec_errors(tmp_path):
    with pytest.raises(DataError, match="no such"):
        load_data_spec(tmp_path / "nope.data")
    bad = tmp_path / "bad.data"
    bad.write_text("classes = 3\nnames = missing.names\ntrain = t.txt\n")
    with pytest.raises(DataError, match="t.txt not found"):
        load_data_spec(bad)


def test_bad_labels_are_counted_not_fatal(tmp_path, caplog):
    d = tmp_path / "images"
    good = _image(d / "good.jpg", 50, 40)
    _label(tmp_path / "labels" / "good.txt",
           "0 0.5 0.5 0.2 0.2\n"          # ok
           "1 1.5 0.5 0.2 0.2\n"          # out of range
           "7 0.5 0.5 0.2 0.2\n"          # class id >= classes
           "0 0.5 0.5 0.2\n"              # malformed: 4 fields
           "x 0.5 0.5 0.2 0.2\n"          # malformed: not a number
           "0.5 0.5 0.5 0.2 0.2\n"        # malformed: fractional class
           "2 1.0004 0.5 0.1 0.1\n")      # within tolerance: clipped, kept
    _image(d / "background.jpg", 20, 20)  # no label file at all
    (d / "broken.jpg").write_bytes(b"not an image")
    with caplog.at_level(logging.INFO, logger="compress.data.dataset"):
        ds = DetectionDataset([good, d / "background.jpg", d / "broken.jpg", d / "missing.jpg"], 32,
                              num_classes=3, source="t")
    r = ds.report
    assert (r.images, r.boxes, r.background, r.missing_images, r.unreadable_images) == (2, 2, 1, 1, 1)
    assert dict(r.bad_rows) == {"out_of_range": 1, "bad_class": 1, "malformed": 3}
    warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1 and "missing" in warnings[0].getMessage()
    assert ds.labels[0][1].tolist() == [2.0, 1.0, 0.5, pytest.approx(0.1), pytest.approx(0.1)]
    assert len(ds[1][1]) == 0  # background image kept, no labels


def test_no_usable_images_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no usable images"):
        DetectionDataset([tmp_path / "missing.jpg"], 32)


@pytest.mark.parametrize("w,h,size", [(640, 480, 416), (300, 500, 320), (77, 33, 64), (64, 64, 64)])
def test_letterbox_round_trip(w, h, size):
    img = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    out, r, (pw, ph) = letterbox(img, size)
    assert out.shape == (size, size, 3)
    assert r == pytest.approx(min(size / w, size / h))
    assert (pw == 0 or ph == 0) and pw >= 0 and ph >= 0
    if pw:
        assert (out[:, :pw] == 114).all()
    if ph:
        assert (out[:ph] == 114).all()
    boxes = np.array([[0, 0, w, h], [w * 0.1, h * 0.2, w * 0.7, h * 0.9]])
    mapped = boxes * r + [pw, ph, pw, ph]
    assert (mapped >= -1e-6).all() and (mapped <= size + 1e-6).all()
    assert np.allclose((mapped - [pw, ph, pw, ph]) / r, boxes, atol=1e-9)


def test_item_labels_follow_the_letterbox(tmp_path):
    img = _image(tmp_path / "images" / "x.jpg", 100, 50)
    _label(tmp_path / "labels" / "x.txt", "0 0.5 0.5 1.0 1.0\n1 0.25 0.25 0.5 0.5\n")
    tensor, labels, path, (h0, w0), (r, (pw, ph)) = DetectionDataset([img], 64)[0]
    assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.uint8
    assert (h0, w0, r, pw, ph) == (50, 100, (0.64, 0.64), 0, 16)
    # the whole-image box spans the resized content exactly
    assert torch.allclose(labels[0], torch.tensor([0, 0.5, 0.5, 1.0, 0.5]), atol=1e-6)
    assert torch.allclose(labels[1], torch.tensor([1, 0.25, 0.375, 0.5, 0.25]), atol=1e-6)
    assert tensor[:, 0, 0].tolist() == [114] * 3


def test_collate_and_loader(synth):
    spec = load_data_spec(synth)
    assert isinstance(spec, DataSpec) and spec.names == ["circle", "square", "triangle"]
    loader = make_loader(spec, 64, batch_size=4, augment=False, workers=0)
    imgs, targets, paths, shapes = next(iter(loader))
    assert imgs.shape == (3, 3, 64, 64) and len(paths) == 3 == len(shapes)  # valid split: 3 images
    assert targets.shape[1] == 6 and set(targets[:, 0].tolist()) <= {0.0, 1.0, 2.0}
    ds = loader.dataset
    assert len(targets) == sum(len(lab) for lab in ds.labels)
    assert shapes[0] == ((64, 64), ((1.0, 1.0), (0, 0)))
    batch = collate([ds[0], ds[1]])
    assert torch.equal(batch[1][:, 1:], torch.cat([ds[0][1], ds[1][1]]))


def test_augment_is_deterministic_and_epoch_dependent(synth):
    spec = load_data_spec(synth)
    aug = AugmentConfig(mosaic=0.5)
    runs = []
    for workers in (0, 2):
        loader = make_loader(spec, 64, batch_size=3, augment=True, workers=workers, shuffle=True, aug=aug, seed=3)
        runs.append([b for _ in range(2) for b in loader])  # two epochs
    for (ia, ta, pa, _), (ib, tb, pb, _) in zip(*runs):
        assert pa == pb and torch.equal(ia, ib) and torch.equal(ta, tb)
    epoch0 = {p: img for b in runs[0][:2] for p, img in zip(b[2], b[0])}
    epoch1 = {p: img for b in runs[0][2:] for p, img in zip(b[2], b[0])}
    assert any(not torch.equal(epoch0[p], epoch1[p]) for p in epoch0)
    for _, t, _, _ in runs[0]:
        xy, wh = t[:, 2:4], t[:, 4:6]
        assert ((xy - wh / 2) >= -1e-5).all() and ((xy + wh / 2) <= 1 + 1e-5).all() and (wh > 0).all()


def test_flip_lr_mirrors_boxes():
    img = np.zeros((10, 20, 3), np.uint8)
    img[:, :5] = 255
    boxes = np.array([[1, 0, 0, 5, 10]], np.float32)
    out, b = flip_lr(img, boxes)
    assert (out[:, 15:] == 255).all() and (out[:, :15] == 0).all()
    assert b.tolist() == [[1, 15, 0, 20, 10]]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_synth_is_deterministic(tmp_path, synth):
    a = synthesize(tmp_path / "a", n_train=6, n_valid=3, img_size=64, seed=1)
    assert _digest(a.parent) == _digest(synth.parent)
    b = synthesize(tmp_path / "b", n_train=6, n_valid=3, img_size=64, seed=2)
    assert _digest(a.parent).keys() == _digest(b.parent).keys() and _digest(a.parent) != _digest(b.parent)
    assert a.read_text() == "classes = 3\ntrain = train.txt\nvalid = valid.txt\nnames = synth.names\n"


def test_synth_labels_are_valid(synth):
    spec = load_data_spec(synth)
    ds = DetectionDataset(spec.train + spec.valid, 64, num_classes=3)
    assert ds.report.problems == 0 and ds.report.background == 0
    counts = [len(lab) for lab in ds.labels]
    assert min(counts) >= 1 and max(counts) <= 4
    wh = np.concatenate(ds.labels)[:, 3:] * 64
    assert wh.min() >= 4.5 and wh.max() <= 31
