"""Pruning through depthwise convs: a depthwise conv is cut together with its producer. yolo-fastest-1.1 with
sparse gammas loses most of its width at slim 0.5 and still matches OpenCV; every method runs on the
reference project's MobileNet cfgs, and keep-size == compact there too."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import compress
from compress.darknet.cfg import read_cfg
from compress.darknet.model import build_model
from compress.prune import METHODS, PruneConfig, prune
from compress.prune.coupling import build_coupling
from compress.darknet.summary import summarize

from conftest import ASSETS, randomize_bn
from test_opencv_parity import TOL, _blob, _compare
from test_prune_surgery import _check_exact

import cv2

MOBILENET = ASSETS / "cfg" / "spurs" / "yolov3tiny-mobilenet-small-coco.cfg"


def _sparsify(model) -> None:
    """60% of every BN layer's gammas near zero, the same channels for layers of the same width (so coupled
    layers agree, as group-aware sparse training leaves them)."""
    with torch.no_grad():
        for layer in model.layers:
            bn = getattr(layer, "bn", None)
            if bn is not None:
                n = bn.weight.numel()
                idx = torch.randperm(n, generator=torch.Generator().manual_seed(n))[: int(n * 0.6)]
                bn.weight[idx] *= 1e-3


def test_depthwise_convs_are_coupled_with_their_producer(assets: Path) -> None:
    graph = build_model(read_cfg(assets / "weights" / "yolo-fastest-1.1.cfg")).graph
    coupling = build_coupling(graph)
    depthwise = [i for i, b in enumerate(graph.cfg.blocks) if b.get_int("groups", 1) > 1]
    fed_by_conv = [i for i in depthwise if graph.sections[graph.inputs[i][0]].conv]
    assert len(fed_by_conv) >= 20
    for i in fed_by_conv:
        assert graph.inputs[i][0] in coupling.group_of[i]  # tied to the conv that feeds it


def test_yolo_fastest_slim_half_keeps_under_70_percent_and_matches_opencv(assets: Path, tmp_path: Path) -> None:
    w = assets / "weights"
    model = compress.load(w / "yolo-fastest-1.1.cfg", w / "yolo-fastest-1.1.weights").eval()
    _sparsify(model)
    before = summarize(model, (320, 320))
    result = prune(model, PruneConfig(method="slim", percent=0.5))
    after = summarize(result.model, (320, 320))
    print(f"yolo-fastest-1.1 slim 0.5: params {after.params / before.params:.3f}, "
          f"FLOPs {after.gflops / before.gflops:.3f}")
    assert after.params <= 0.70 * before.params and after.gflops <= 0.70 * before.gflops
    assert any(result.model.cfg.blocks[i].get_int("groups", 1) < graph_groups
               for i, graph_groups in ((i, b.get_int("groups", 1)) for i, b in enumerate(model.cfg.blocks))
               if graph_groups > 1)
    compress.save(result.model, tmp_path / "p.cfg", tmp_path / "p.weights")
    img = cv2.imread(str(assets / "data" / "samples" / "dog.jpg"))
    box_err, cls_err, _ = _compare(tmp_path / "p.cfg", tmp_path / "p.weights", _blob(img, 320))
    assert box_err < TOL and cls_err < TOL  # every box and objectness; the sparse model scores few classes


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_on_the_reference_mobilenet(assets: Path, method: str) -> None:
    model = randomize_bn(build_model(read_cfg(MOBILENET))).eval()
    kind = METHODS[method].kind
    config = PruneConfig(method=method, percent=0.3, min_keep=0.05, img_size=64,
                         shortcuts=2 if kind in ("layer", "model") else 0)
    result = prune(model, config)
    assert summarize(result.model, (64, 64)).params < summarize(model, (64, 64)).params
    with torch.no_grad():
        out = result.model.eval()(torch.rand(1, 3, 64, 64))
    assert torch.isfinite(out).all()


def test_keep_size_equals_compact_on_the_reference_mobilenet(assets: Path) -> None:
    _check_exact(MOBILENET, "slim", 0.3, 64)
