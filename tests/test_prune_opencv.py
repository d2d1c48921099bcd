"""Pruned real models (yolov3-tiny, yolov4-tiny) load in OpenCV's independent Darknet reader and give our
outputs. OpenCV rows per head are (y, x, anchor) with cx, cy, w, h normalised, obj, obj*cls; ours (anchor, y, x)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import compress
from compress.prune import PruneConfig, prune

import cv2
if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromDarknet"):
    pytest.skip("this OpenCV has no readNetFromDarknet", allow_module_level=True)


def _ours_as_opencv_rows(model, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        out = model.eval()(x)[0]
    h_in, w_in = x.shape[2:]
    shapes, rows, offset = model.graph.shapes(h_in, w_in), [], 0
    for k, head_i in enumerate(model.graph.heads):
        a, (_, h, w) = model.heads[k].num_anchors, shapes[head_i]
        r = out[offset:offset + a * h * w].view(a, h, w, -1).permute(1, 2, 0, 3).reshape(h * w * a, -1).numpy().copy()
        offset += a * h * w
        r[:, [0, 2]] /= w_in
        r[:, [1, 3]] /= h_in
        r[:, 5:] *= r[:, 4:5]
        rows.append(r)
    return rows


@pytest.mark.parametrize("name, method", [("yolov3-tiny", "slim"), ("yolov4-tiny", "regular")])
def test_pruned_pair_matches_opencv(assets: Path, tmp_path: Path, name: str, method: str) -> None:
    model = compress.load(assets / "weights" / f"{name}.cfg", assets / "weights" / f"{name}.weights")
    result = prune(model, PruneConfig(method=method, percent=0.5, min_keep=0.05))
    assert result.mask
    cfg, weights = tmp_path / "p.cfg", tmp_path / "p.weights"
    compress.save(result.model, cfg, weights)
    img = cv2.imread(str(assets / "data" / "samples" / "dog.jpg"))
    blob = cv2.dnn.blobFromImage(img, 1 / 255.0, (320, 320), swapRB=True, crop=False)
    net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    net.setInput(blob)
    theirs = net.forward(net.getUnconnectedOutLayersNames())
    ours = _ours_as_opencv_rows(compress.load(cfg, weights), torch.from_numpy(blob))
    assert len(theirs) == len(ours)
    for t, o in zip(theirs, ours):
        assert t.shape == o.shape
        assert np.abs(t[:, :5] - o[:, :5]).max() < 1e-4
        nz = t[:, 5:] != 0  # OpenCV zeroes class scores below its threshold
        assert np.abs(t[:, 5:][nz] - o[:, 5:][nz]).max(initial=0) < 1e-4
