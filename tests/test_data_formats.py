"""Data in the formats users have: Ultralytics data.yaml, --val, COCO json and VOC xml conversion."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from compress.cli import cli
from compress.data.convert import ConvertConfig, convert
from compress.data.dataset import DetectionDataset, load_data_spec
from compress.base.errors import DataError

CFG = Path(__file__).parent / "data" / "tiny-v4-groups.cfg"  # 2 classes


def _img(path: Path, w: int, h: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(path)
    return path


def test_ultralytics_data_yaml(tmp_path):
    root = tmp_path / "ds"
    a = _img(root / "images" / "train" / "a.jpg", 40, 30)
    b = _img(root / "images" / "val" / "b.jpg", 40, 30)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text("1 0.5 0.5 0.2 0.2\n")
    (tmp_path / "cfgs").mkdir()
    yml = tmp_path / "cfgs" / "data.yaml"
    yml.write_text("path: ../ds\ntrain: images/train\nval: [images/val]\nnames:\n  0: cat\n  1: dog\n")
    spec = load_data_spec(yml)
    assert spec.names == ["cat", "dog"] and spec.train == [a] and spec.valid == [b]
    assert DetectionDataset(spec.train, 64, num_classes=spec.nc).labels[0].tolist()[0][0] == 1
    (root / "data.yaml").write_text("train: ../images/train\nval: ../images/val\nnames: [cat, dog]\n")
    assert load_data_spec(root / "data.yaml").train == [a]  # exporters' '../' beside a root-level yaml
    yml.write_text("path: ../ds\ntrain: images/train\nnames: [cat, dog]\nnc: 3\n")
    with pytest.raises(DataError, match="nc: 3 but 2 names"):
        load_data_spec(yml)
    yml.write_text("path: ../ds\ntrain: images/nope\nnames: [cat]\n")
    with pytest.raises(DataError, match="images/nope not found"):
        load_data_spec(yml)


def test_folder_as_train_and_valid_warns_and_val_separates(tmp_path, caplog):
    _img(tmp_path / "train" / "a.png", 32, 32)
    held = _img(tmp_path / "held" / "b.png", 32, 32)
    with caplog.at_level(logging.WARNING, logger="compress.data.dataspec"):
        spec = load_data_spec(tmp_path / "train", training=True)
    assert spec.train_is_valid and "pass --val DIR" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="compress.data.dataspec"):
        spec = load_data_spec(tmp_path / "train", val=tmp_path / "held", training=True)
    assert spec.valid == [held] and not spec.train_is_valid and not caplog.text
    assert load_data_spec(spec) is spec  # a ready spec passes through (the CLI hands it to the library)


def _coco(tmp_path: Path) -> Path:
    _img(tmp_path / "coco" / "images" / "1.jpg", 100, 50)
    _img(tmp_path / "coco" / "images" / "2.jpg", 20, 20)
    doc = {"images": [{"id": 1, "file_name": "1.jpg", "width": 100, "height": 50},
                      {"id": 2, "file_name": "2.jpg", "width": 20, "height": 20},
                      {"id": 3, "file_name": "missing.jpg", "width": 10, "height": 10}],
           "categories": [{"id": 5, "name": "cat"}, {"id": 9, "name": "dog"}],
           "annotations": [{"image_id": 1, "category_id": 9, "bbox": [10, 5, 20, 10], "iscrowd": 0},
                           {"image_id": 1, "category_id": 5, "bbox": [90, 40, 20, 20], "iscrowd": 0},
                           {"image_id": 1, "category_id": 5, "bbox": [0, 0, 50, 50], "iscrowd": 1},
                           {"image_id": 2, "category_id": 5, "bbox": [1, 1, 0, 5], "iscrowd": 0},
                           {"image_id": 7, "category_id": 5, "bbox": [1, 1, 5, 5], "iscrowd": 0},
                           {"image_id": 2, "category_id": 42, "bbox": [1, 1, 5, 5], "iscrowd": 0}]}
    path = tmp_path / "coco" / "instances.json"
    path.write_text(json.dumps(doc))
    return path


def test_convert_coco(tmp_path):
    result = convert(ConvertConfig("coco", _coco(tmp_path), tmp_path / "out"))
    assert (result.images, result.boxes, result.names) == (2, 2, ["cat", "dog"])
    assert dict(result.skipped) == {"box: iscrowd": 1, "box: zero or negative size": 1, "box: unknown image_id": 1,
                                    "box: category not in names": 1, "image: file missing or not an image": 1}
    assert dict(result.kept) == {"box clipped to the image": 1}   # kept: not among the skipped (issue #26)
    rows = np.loadtxt(tmp_path / "out" / "labels" / "train" / "1.txt", ndmin=2)
    # dog (COCO id 9 -> class 1): x 10..30, y 5..15 of 100x50; cat clipped to x 90..100, y 40..50
    assert np.allclose(rows, [[1, 0.2, 0.2, 0.2, 0.2], [0, 0.95, 0.9, 0.1, 0.2]], atol=1e-6)
    spec = load_data_spec(result.data)
    assert spec.names == ["cat", "dog"] and len(spec.train) == 2 and spec.valid == spec.train
    assert json.loads((tmp_path / "out" / "convert.json").read_text())["train"]["images"] == 2


def _voc(tmp_path: Path) -> Path:
    root = tmp_path / "VOC2007"
    _img(root / "JPEGImages" / "000001.jpg", 200, 100)
    _img(root / "JPEGImages" / "000002.jpg", 50, 50)
    (root / "Annotations").mkdir(parents=True)
    obj = "<object><name>{}</name><difficult>{}</difficult><bndbox><xmin>{}</xmin><ymin>{}</ymin>" \
          "<xmax>{}</xmax><ymax>{}</ymax></bndbox></object>"
    (root / "Annotations" / "000001.xml").write_text(
        "<annotation><size><width>200</width><height>100</height></size>"
        + obj.format("person", 0, 21, 11, 61, 51) + obj.format("car", 1, 1, 1, 10, 10) + "</annotation>")
    (root / "Annotations" / "000002.xml").write_text("<annotation><size><width>50")  # malformed
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "val.txt").write_text("000001\n000002\n")
    return root


def test_convert_voc_via_cli(tmp_path):
    res = CliRunner().invoke(cli, ["data", "convert", "--from", "voc", "--src", str(_voc(tmp_path)), "--out",
                                   str(tmp_path / "out"), "--split", "valid", "--copy"])
    assert res.exit_code == 0, res.output
    assert "skipped box: difficult" in res.output and "annotation xml missing or malformed" in res.output
    rows = np.loadtxt(tmp_path / "out" / "labels" / "valid" / "000001.txt", ndmin=2)
    # 1-based VOC pixels 21..61 x 11..51 -> 0-based 20..60 x 10..50 of 200x100; classes sorted: car, person
    assert np.allclose(rows, [[1, 0.2, 0.3, 0.2, 0.4]], atol=1e-6)
    assert not (tmp_path / "out" / "images" / "valid" / "000001.jpg").is_symlink()
    spec = load_data_spec(tmp_path / "out" / "dataset.data")
    assert spec.names == ["car", "person"] and len(spec.valid) == 1


def test_convert_refuses_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="--from must be one of"):
        ConvertConfig("yolo", tmp_path, tmp_path / "o")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(DataError, match="not a COCO instances json"):
        convert(ConvertConfig("coco", tmp_path / "x.json", tmp_path / "o"))
    (tmp_path / "voc").mkdir()
    with pytest.raises(DataError, match="no Annotations/ folder"):
        convert(ConvertConfig("voc", tmp_path / "voc", tmp_path / "o2"))
    with pytest.raises(DataError, match="inside the source dataset"):
        convert(ConvertConfig("voc", tmp_path / "voc", tmp_path / "voc" / "out"))


def test_detect_cli_refuses_short_names(tmp_path):
    src = _img(tmp_path / "img.png", 64, 64)
    (tmp_path / "one.names").write_text("only\n")
    res = CliRunner().invoke(cli, ["detect", "--cfg", str(CFG), "--source", str(src), "--out", str(tmp_path / "o"),
                                   "--names", str(tmp_path / "one.names")])
    assert isinstance(res.exception, DataError) and "has 1 names but the model predicts 2" in str(res.exception)
    assert not (tmp_path / "o").exists()
