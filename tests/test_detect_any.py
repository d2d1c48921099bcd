"""detect from any artifact eval accepts (Darknet pair, ONNX, OpenVINO, ncnn), PNG/JPEG by the --out file name,
labels that never overlap one another, and runtime predictors that take numpy input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from compress.base.errors import DataError
from compress.darknet.cfg import read_cfg
from compress.darknet.model import build_model
from compress.darknet.persist import load, save
from compress.data.synth import synthesize
from compress.deploy.export import ExportConfig, export
from compress.deploy.runtimes import load_predictor
from compress.detection.detect import draw_detections, place_labels
from compress.jobs import DetectJob, run_job

from conftest import DEMO_CFG


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("det")
    torch.manual_seed(0)
    save(build_model(read_cfg(DEMO_CFG)), root / "demo.cfg", root / "demo.weights")
    synthesize(root / "s", n_train=1, n_valid=2, img_size=64, seed=0)
    images = sorted((root / "s" / "images" / "valid").iterdir())
    model = load(root / "demo.cfg", root / "demo.weights")
    files = {"onnx": export(model, root / "m.onnx", ExportConfig(img_size=64)).path,
             "openvino": export(model, root / "ov", ExportConfig("openvino", img_size=64)).path,
             "ncnn": export(model, root / "nc", ExportConfig("ncnn", img_size=64)).path}
    return {"root": root, "cfg": root / "demo.cfg", "weights": root / "demo.weights", "image": images[0],
            "folder": images[0].parent, **files}


def _rects_disjoint(rects: list[tuple[int, int, int, int]]) -> bool:
    return all(a[0] + a[2] <= b[0] or b[0] + b[2] <= a[0] or a[1] + a[3] <= b[1] or b[1] + b[3] <= a[1]
               for i, a in enumerate(rects) for b in rects[i + 1:])


@pytest.mark.parametrize("y1", [0, 40, 95])   # boxes at the top edge, in the middle, at the bottom
def test_labels_of_overlapping_boxes_never_overlap(y1):
    boxes = [(10 + k, y1, 60 + k, min(100, y1 + 30)) for k in range(6)]   # six near-identical boxes
    sizes = [(45, 11)] * 6
    spots = place_labels(boxes, sizes, (200, 100))
    rects = [(x, y, w, h) for (x, y), (w, h) in zip(spots, sizes)]
    assert _rects_disjoint(rects)
    assert all(0 <= x and x + w <= 200 for x, _, w, _ in rects)
    assert spots[0][1] == (y1 - 11 if y1 >= 11 else y1)   # the best box: above it, else inside at the top


def test_a_crowd_of_300_tags_stays_disjoint():
    """max_det boxes on one spot: every tag gets its own place (the fallback jumps below its blockers)."""
    spots = place_labels([(5, 5, 50, 50)] * 300, [(40, 10)] * 300, (120, 90))
    assert _rects_disjoint([(x, y, 40, 10) for x, y in spots])


def test_drawn_tags_are_separate_patches():
    """Two same-class boxes one pixel apart: both tags are drawn whole (the second would cover the first)."""
    img = Image.new("RGB", (200, 120), (255, 255, 255))
    dets = np.array([[20, 40, 120, 100, 0.9, 0], [21, 41, 121, 101, 0.8, 0]], np.float32)
    out = np.asarray(draw_detections(img, dets, ["person"]))
    draw = ImageDraw.Draw(img)
    w, h = (lambda b: (b[2] - b[0] + 3, b[3] + 3))(draw.textbbox((0, 0), "person 0.90"))
    filled = (out != 255).any(-1)
    # two tags stacked: one above the first box, one more where it does not overlap
    assert filled[40 - h:40, 20:20 + w].mean() > 0.5
    spots = place_labels(dets[:, :4].tolist(), [(w, h)] * 2, (200, 120))
    assert spots[0] == (20, 40 - h) and spots[1] != spots[0]
    assert _rects_disjoint([(x, y, w, h) for x, y in spots])


@pytest.mark.parametrize("fmt", ["onnx", "openvino", "ncnn"])
def test_predictors_take_numpy_input(setup, fmt):
    predictor = load_predictor(setup[fmt])
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(predictor(x.numpy()), predictor(x))
    assert torch.equal(predictor(x[0].numpy()), predictor(x))   # one (3,H,W) image


@pytest.mark.parametrize("fmt", ["onnx", "openvino", "ncnn"])
def test_detect_runs_every_exported_format_like_the_darknet_pair(setup, tmp_path, fmt):
    ref = run_job(DetectJob(setup["cfg"], setup["weights"], setup["folder"], tmp_path / "ref", img_size=64,
                            conf_thres=0.05))
    got = run_job(DetectJob(setup["cfg"], setup[fmt], setup["folder"], tmp_path / fmt, conf_thres=0.05))
    assert got["boxes"] == ref["boxes"] > 0
    a = json.loads((tmp_path / "ref" / "detections.json").read_text())
    b = json.loads((tmp_path / fmt / "detections.json").read_text())
    for ra, rb in zip(a, b):
        for db in rb["detections"]:   # each runtime box is a torch box (order may differ on near-ties)
            assert any(da["class"] == db["class"] and abs(da["conf"] - db["conf"]) < 1e-3
                       and np.allclose(da["box_xyxy"], db["box_xyxy"], atol=0.1) for da in ra["detections"]), db


@pytest.mark.parametrize("name, magic, fmt", [("x.png", b"\x89PNG", "PNG"), ("x.jpg", b"\xff\xd8\xff", "JPEG"),
                                              ("x.JPEG", b"\xff\xd8\xff", "JPEG")])
def test_out_file_format_follows_its_name(setup, tmp_path, name, magic, fmt):
    out = tmp_path / name
    r = run_job(DetectJob(setup["cfg"], setup["onnx"], setup["image"], out), tmp_path / "r.json")
    assert out.read_bytes()[:len(magic)] == magic and r["images"] == 1
    with Image.open(out) as im:
        assert im.format == fmt and im.size == Image.open(setup["image"]).size
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "r.json"])   # no folder, no report.json


def test_out_file_needs_one_image(setup, tmp_path):
    with pytest.raises(DataError, match="holds 2 images; pass a folder as --out"):
        run_job(DetectJob(setup["cfg"], setup["weights"], setup["folder"], tmp_path / "x.png"))
