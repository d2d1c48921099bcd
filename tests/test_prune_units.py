"""Residual units behind an inference-identity block (Yolo-Fastest's `[conv][dropout][shortcut]`) are removable
exactly (checked in OpenCV's Darknet reader), and a latency target that channel widths cannot reach removes
units first (issue 25: yolo-fastest-1.1 at 0.5 on onnxruntime); the least-squares refit follows the removal."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import compress
from compress.darknet.cfg import read_cfg
from compress.darknet.model import build_model
from compress.darknet.persist import save
from compress.jobs import PruneJob, run_job
from compress.prune import PruneConfig, prune
from compress.prune.coupling import build_coupling, prunable_layers, residual_units, unit_conv
from compress.prune.layer import ranked_units
from compress.prune.reconstruct import ReconstructConfig, reconstruct, refit_layers
from compress.data.dataset import to_input
from compress.train.bn_adapt import image_batches

from conftest import DEMO_CFG, randomize_bn

import cv2
if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromDarknet"):
    pytest.skip("this OpenCV has no readNetFromDarknet (use opencv-python-headless<5)", allow_module_level=True)


def _opencv(pair: tuple[Path, Path], blob: np.ndarray) -> list[np.ndarray]:
    net = cv2.dnn.readNetFromDarknet(str(pair[0]), str(pair[1]))
    net.setInput(blob)
    return list(net.forward(net.getUnconnectedOutLayersNames()))


def _fastest(assets: Path):
    w = assets / "weights"
    return compress.load(w / "yolo-fastest-1.1.cfg", w / "yolo-fastest-1.1.weights").eval()


def test_yolo_fastest_units_close_with_the_conv_before_dropout(assets: Path) -> None:
    model = _fastest(assets)
    units = residual_units(model.graph)
    assert len(units) == 18   # every [shortcut] of yolo-fastest-1.1 closes [conv][conv][conv][dropout]
    for s, unit in units.items():
        assert unit[-1] == s and model.cfg.blocks[unit[-2]].type == "dropout"
        assert unit_conv(model.graph, unit) == unit[-3] and model.cfg.blocks[unit[-3]].type == "convolutional"
    ranked = ranked_units(model, build_coupling(model.graph))
    assert len(ranked) == len(prunable_layers(build_coupling(model.graph), 2)) > 0
    assert [score for _, score in ranked] == sorted(score for _, score in ranked)


def test_removing_units_through_dropout_is_exact_in_opencv(assets: Path, tmp_path: Path) -> None:
    """gamma = 0 (beta kept) on the closing convs of two units: removing them (the `layer` method picks them, mean
    |gamma| 0) leaves OpenCV's outputs of the pair unchanged; the constant rides the dropout and the shortcut."""
    model = _fastest(assets)
    order = [s for s, _ in ranked_units(model, build_coupling(model.graph))]
    chosen = sorted(order[-2:])   # the two MOST important: only the zeroing makes them the cut
    units = residual_units(model.graph)
    for s in chosen:
        model.layers[unit_conv(model.graph, units[s])].bn.weight.data.zero_()
    result = prune(model, PruneConfig(method="layer", shortcuts=2))
    assert result.info["removed_units"] == chosen
    assert len(result.model.layers) == len(model.layers) - 10
    zeroed, short = (tmp_path / "z.cfg", tmp_path / "z.weights"), (tmp_path / "s.cfg", tmp_path / "s.weights")
    save(model, *zeroed)
    save(result.model, *short)
    img = cv2.imread(str(assets / "data" / "samples" / "dog.jpg"))
    blob = cv2.dnn.blobFromImage(img, 1 / 255.0, (320, 320), swapRB=True, crop=False)
    for a, b in zip(_opencv(zeroed, blob), _opencv(short, blob)):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-4
    plain = prune(model, PruneConfig(method="layer", shortcuts=2, compensate=False)).model
    save(plain, tmp_path / "p.cfg", tmp_path / "p.weights")
    worst = max(float(np.abs(a - b).max()) for a, b in zip(_opencv(zeroed, blob),
                                                           _opencv((tmp_path / "p.cfg", tmp_path / "p.weights"), blob)))
    assert worst > 1e-2   # the beta constant matters: without compensation the outputs move


def test_refit_after_unit_removal_follows_the_renumbering(assets: Path) -> None:
    """A unit whose closing conv has gamma = 0 is removed exactly; every conv after it then sees exactly the
    original's inputs, so an unregularised refit must give back the original's outputs: it does only when each
    conv of the shorter model is paired with its own original layer (not the one at its new index)."""
    model = _fastest(assets)
    units = residual_units(model.graph)
    s = sorted(units)[1]
    model.layers[unit_conv(model.graph, units[s])].bn.weight.data.zero_()
    cut = prune(model, PruneConfig(method="layer", shortcuts=1))
    assert set(cut.removed_blocks) == set(units[s])
    layers = refit_layers(model, cut.model, downstream=True, removed=cut.removed_blocks)
    assert layers and min(layers) == s + 1 - len(units[s]) and all(cut.model.graph.sections[j].conv for j in layers)
    images = sorted((assets / "data" / "coco128" / "images" / "train2017").glob("*.jpg"))
    x = to_input(next(iter(image_batches(images[16:20], 320, 4, 1, False))), "cpu")
    with torch.no_grad():
        target = [o.clone() for o in model(x, raw=True)]
    figures = reconstruct(model, cut.model, cut.mask, image_batches(images[:8], 320, 8, 1, False),
                          ReconstructConfig(ridge=0.0, positions=1024), removed=cut.removed_blocks)
    assert figures["reconstructed_convs"] == layers
    with torch.no_grad():
        for o, t in zip(cut.model(x, raw=True), target):
            assert float((o - t).abs().max()) < 1e-2 * float(t.abs().max())


def test_latency_target_out_of_reach_of_widths_removes_units(tmp_path: Path) -> None:
    """The demo model with a 0.9 width floor cannot reach 0.3 of its latency by channels: units go first, the
    report names them, the pair is valid and its removed convs count 0 channels. No timing assertion."""
    torch.manual_seed(0)
    model = randomize_bn(build_model(read_cfg(DEMO_CFG)).eval(), seed=3)
    cfg, weights = tmp_path / "m.cfg", tmp_path / "m.weights"
    save(model, cfg, weights)
    report = run_job(PruneJob(cfg, weights, tmp_path / "o", method="l1", target_latency=0.3, runtime="torch",
                              layer_keep=0.9, refine=0, img_size=64))
    units = report["latency"]["removed_units"]
    assert units and set(units) <= set(residual_units(model.graph))
    assert set(report["removed_blocks"]) >= set(units)
    tried = report["info"]["removed_units"]["tried"]
    assert tried and report["info"]["removed_units"]["shortcuts"] == units
    gone = {row["layer"] for row in report["channels"] if row["after"] == 0}
    assert gone and gone <= set(report["removed_blocks"])
    out = json.loads((tmp_path / "o" / "report.json").read_text())
    small = compress.load(out["cfg"], out["weights"])
    assert len(small.layers) == len(model.layers) - len(report["removed_blocks"])


def test_no_unit_removed_when_widths_reach_the_target(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = randomize_bn(build_model(read_cfg(DEMO_CFG)).eval(), seed=3)
    cfg, weights = tmp_path / "m.cfg", tmp_path / "m.weights"
    save(model, cfg, weights)
    report = run_job(PruneJob(cfg, weights, tmp_path / "o", method="l1", target_flops=0.6, img_size=64))
    assert report["removed_blocks"] == []
    lat = run_job(PruneJob(cfg, weights, tmp_path / "o2", method="l1", target_latency=0.95, runtime="torch",
                           refine=0, img_size=64))
    assert lat["latency"]["removed_units"] == [] and lat["removed_blocks"] == []


def test_refit_without_the_removed_blocks_is_refused(assets: Path) -> None:
    from compress.base.errors import PruneError
    model = _fastest(assets)
    cut = prune(model, PruneConfig(method="layer", shortcuts=1))
    images = sorted((assets / "data" / "coco128" / "images" / "train2017").glob("*.jpg"))[:4]
    with pytest.raises(PruneError, match="pass the pruning's removed blocks"):
        reconstruct(model, cut.model, cut.mask, image_batches(images, 320, 4, 1, False))
