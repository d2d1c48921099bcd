"""Our eval-mode output == OpenCV's independent Darknet reader (`cv2.dnn.readNetFromDarknet`), row by row.

OpenCV (test-only dependency) returns per [yolo] head an (H*W*A, 5+C) matrix ordered (cell y, cell x, anchor):
cx, cy, w, h normalised by the input size, objectness, then class score = objectness * class probability, set to
0 below its internal threshold. Ours is (anchor, y, x) in input pixels with plain class probabilities.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import compress
from compress.darknet.cfg import parse_cfg, read_cfg, write_cfg
from compress.darknet.model import build_model
from compress.darknet.weights import write_weights

from conftest import ASSETS, DATA, randomize_bn

import cv2
if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromDarknet"):
    pytest.skip("this OpenCV has no readNetFromDarknet (use opencv-python-headless<5)", allow_module_level=True)

TOL = 1e-4  # normalised units; measured ~7e-6 (BN eps 1e-6 on both sides)
COCO_IMAGE = "data/coco128/images/train2017/000000000357.jpg"


def _compare(cfg_path: Path, weights_path: Path, blob: np.ndarray, nms: bool = False) -> tuple[float, float, int]:
    """(max |box+obj diff|, max |class diff| where OpenCV is nonzero, number of nonzero class scores)."""
    net = cv2.dnn.readNetFromDarknet(str(cfg_path), str(weights_path))
    net.setInput(blob)
    theirs = net.forward(net.getUnconnectedOutLayersNames())
    model = compress.load(cfg_path, weights_path)
    h_in, w_in = blob.shape[2:]
    with torch.no_grad():
        ours = model(torch.from_numpy(blob))
    assert ours.shape[0] == 1 and ours.shape[1] == sum(t.shape[0] for t in theirs)
    shapes = model.graph.shapes(h_in, w_in)
    box_err, cls_err, nonzero, offset = 0.0, 0.0, 0, 0
    for k, (head_i, mat) in enumerate(zip(model.graph.heads, theirs)):
        a, (_, h, w) = model.heads[k].num_anchors, shapes[head_i]
        rows = ours[0, offset:offset + a * h * w].view(a, h, w, -1).permute(1, 2, 0, 3).reshape(h * w * a, -1).numpy()
        offset += a * h * w
        assert mat.shape == rows.shape
        mine = rows.copy()
        mine[:, [0, 2]] /= w_in
        mine[:, [1, 3]] /= h_in
        box_err = max(box_err, float(np.abs(mat[:, :5] - mine[:, :5]).max()))
        scores = mine[:, 4:5] * mine[:, 5:]
        nz = mat[:, 5:] != 0
        nonzero += int(nz.sum())
        if nz.any():
            cls_err = max(cls_err, float(np.abs(mat[:, 5:][nz] - scores[nz]).max()))
        if not nms:  # where OpenCV zeroed a score ours is small too (below its threshold, not a different box)
            assert scores[~nz].max(initial=0) < max(0.25, mat[:, 5:][nz].min(initial=1))
    return box_err, cls_err, nonzero


def _blob(img: np.ndarray, size: int) -> np.ndarray:
    return cv2.dnn.blobFromImage(img, 1 / 255.0, (size, size), swapRB=True, crop=False)


@pytest.mark.parametrize("name, size", [("yolov3-tiny", 416), ("yolov4-tiny", 416), ("yolo-fastest-1.1", 320)])
@pytest.mark.parametrize("image", ["data/samples/dog.jpg", COCO_IMAGE])
def test_official_models_match_opencv(assets: Path, name: str, size: int, image: str) -> None:
    img = cv2.imread(str(ASSETS / image))
    assert img is not None
    box_err, cls_err, nonzero = _compare(ASSETS / "weights" / f"{name}.cfg", ASSETS / "weights" / f"{name}.weights",
                                         _blob(img, size))
    print(f"{name}@{size} {Path(image).name}: box/obj {box_err:.2e}, class {cls_err:.2e} over {nonzero} scores")
    assert box_err < TOL and cls_err < TOL
    assert nonzero > 0  # the real models find something on these images


def _opencv_compatible(cfg):
    """OpenCV does not know [se]/[cbam]/[eca] (swapped for an identity maxpool size=1 stride=1), relu6, hardswish."""
    blocks = [b if b.type not in ("se", "cbam", "eca") else type(b)("maxpool", (("size", "1"), ("stride", "1")),
                                                                    b.line, b.source) for b in cfg.blocks]
    swap = {"relu6": "relu", "hardswish": "swish"}
    return cfg.with_blocks(b.replace(activation=swap[b.get("activation")]) if b.get("activation") in swap else b
                           for b in blocks)


@pytest.mark.parametrize("name", ["tiny-v4-groups", "tiny-shortcut", "tiny-attn"])
def test_tiny_random_models_match_opencv(tmp_path: Path, name: str) -> None:
    cfg = _opencv_compatible(read_cfg(DATA / f"{name}.cfg"))
    torch.manual_seed(0)
    model = randomize_bn(build_model(cfg))
    with torch.no_grad():
        for layer in model.layers:
            conv = getattr(layer, "conv", None)
            if conv is not None and conv.bias is not None:
                conv.bias.normal_(0, 0.5)
    cfg_path, weights_path = tmp_path / f"{name}.cfg", tmp_path / f"{name}.weights"
    write_cfg(cfg, cfg_path)
    write_weights(weights_path, model)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)
    for size in (64, 96):
        box_err, cls_err, nonzero = _compare(cfg_path, weights_path, _blob(img, size))
        print(f"{name}@{size}: box/obj {box_err:.2e}, class {cls_err:.2e} over {nonzero} scores")
        assert box_err < TOL and cls_err < TOL and nonzero > 0


def test_region_head_matches_opencv(tmp_path: Path) -> None:
    """YOLOv2 [region]: anchors in grid cells, softmax classes. OpenCV also runs NMS on region output, so only
    its nonzero class scores are compared."""
    cfg = parse_cfg("[net]\nwidth=64\nheight=64\nchannels=3\n[convolutional]\nbatch_normalize=1\nfilters=8\n"
                    "size=3\nstride=2\npad=1\nactivation=leaky\n[maxpool]\nsize=2\nstride=2\n[convolutional]\n"
                    "filters=14\nsize=1\nstride=1\npad=1\nactivation=linear\n[region]\nanchors=1.5,2, 3,1.25\n"
                    "classes=2\nnum=2\ncoords=4\nsoftmax=1\n")
    model = randomize_bn(build_model(cfg))
    write_cfg(cfg, tmp_path / "r.cfg")
    write_weights(tmp_path / "r.weights", model)
    img = np.random.default_rng(1).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    box_err, cls_err, nonzero = _compare(tmp_path / "r.cfg", tmp_path / "r.weights", _blob(img, 64), nms=True)
    print(f"region@64: box/obj {box_err:.2e}, class {cls_err:.2e} over {nonzero} scores")
    assert box_err < TOL and cls_err < TOL and nonzero > 100
