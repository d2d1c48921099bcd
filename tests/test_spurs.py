"""The reference project's own cfgs (`cfg/spurs/`) read in its dialect: every cfg its model builder can build
comes out with the count that builder gives (`reference-params.json`: parameters + BN statistics), and a pair
read in that dialect is written back in it, weights byte-identical."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import compress
from compress.darknet.cfg import parse_cfg, read_cfg
from compress.base.errors import CfgError
from compress.darknet.graph import build_graph
from compress.darknet.model import build_model, estimate_weights
from compress.darknet.summary import summarize
from compress.darknet.weights import count_darknet_floats, write_weights

from conftest import ASSETS, TINY_CFGS, randomize_bn

SPURS = ASSETS / "cfg" / "spurs"
_REF = json.loads((SPURS / "reference-params.json").read_text()) if SPURS.is_dir() else {}
BUILDABLE = sorted(k for k, v in _REF.items() if "params_and_bn_stats" in v)
# one of each structure: MobileNetV3 ([depthwise], [se] filters=, h_swish), GhostNet (activation=none,
# [se] reduction=), ASFF head, channels=1, [reorg3d], num > anchor pairs, MobileNet-small
BUILT = ["yolov3-mobilenet-coco.cfg", "yolov3-ghost-coco.cfg", "yolov3-asff.cfg", "yolov3-singlechannel.cfg",
         "yolov3-spp-pan-scale.cfg", "yolov3-tiny-ship-one.cfg", "yolov3tiny-mobilenet-small-coco.cfg"]


def test_all_buildable_reference_cfgs_have_the_reference_count(assets: Path) -> None:
    assert len(BUILDABLE) == 41 and len(list(SPURS.glob("*.cfg"))) == 43
    wrong = {}
    for name in BUILDABLE:
        graph = build_graph(read_cfg(SPURS / name, dialect="reference"))
        got = sum(estimate_weights(graph))
        if got != _REF[name]["params_and_bn_stats"]:
            wrong[name] = (got, _REF[name]["params_and_bn_stats"])
    assert not wrong


@pytest.mark.parametrize("name", BUILT)
def test_built_models_have_the_reference_count(assets: Path, name: str) -> None:
    model = build_model(read_cfg(SPURS / name, dialect="reference"))
    assert count_darknet_floats(model) == _REF[name]["params_and_bn_stats"] == sum(estimate_weights(model.graph))


@pytest.mark.parametrize("name", ["yolov3-mobilenet-coco.cfg", "yolov3-ghost-coco.cfg", "yolov3-asff.cfg",
                                  "yolov3-tiny-ship-one.cfg", "yolov3tiny-mobilenet-small-coco.cfg",
                                  "yolov3tiny-efficientnetB0.cfg"])
def test_reference_cfgs_run_a_forward_pass(assets: Path, name: str) -> None:
    cfg = read_cfg(SPURS / name)  # dialect detected ([depthwise], activation=none, [yolo] from=) or Darknet's
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64))
    assert out.shape[0] == 1 and out.shape[2] == 5 + cfg.classes and torch.isfinite(out).all()


def test_reference_reorg3d_passes_through_so_its_route_cannot_join(assets: Path) -> None:
    """The reference builds [reorg3d] as an empty module: its count matches, but the route after it joins maps
    of different sizes; read as Darknet ([reorg3d] = space-to-depth) the cfg runs."""
    model = build_model(read_cfg(SPURS / "yolov3-spp-pan-scale.cfg", dialect="reference"))
    with pytest.raises(CfgError, match=r"scale\.cfg:776: \[route\] joins input 0 \(136x136\) with input 1 \(272x272\)"):
        summarize(model)
    darknet = build_graph(read_cfg(SPURS / "yolov3-spp-pan-scale.cfg"))
    assert darknet.cfg.dialect == "darknet" and darknet.shapes(64, 64)


def test_reference_pair_round_trips_in_its_dialect(assets: Path, tmp_path: Path) -> None:
    src = SPURS / "yolov3tiny-mobilenet-small-coco.cfg"
    model = randomize_bn(build_model(read_cfg(src)))
    write_weights(tmp_path / "in.weights", model)
    loaded = compress.load(src, tmp_path / "in.weights")
    assert loaded.cfg.dialect == "reference"
    compress.save(loaded, tmp_path / "out.cfg", tmp_path / "out.weights")
    assert (tmp_path / "out.weights").read_bytes() == (tmp_path / "in.weights").read_bytes()
    again = read_cfg(tmp_path / "out.cfg")
    assert again.dialect == "reference" and again.blocks == read_cfg(tmp_path / "out.cfg").blocks
    assert [(b.type, b.options) for b in again.blocks] == [(b.type, b.options) for b in loaded.cfg.blocks]
    assert "[depthwise]" in (tmp_path / "out.cfg").read_text() and any(
        b.type == "se" and b.has("filters") for b in again.blocks)
    text = (SPURS / "yolov3-tiny.cfg").read_text().replace("channels=3", "channels=1")
    assert "channels=1" in text
    single = parse_cfg(text, "single.cfg", dialect="reference")  # like yolov3-singlechannel.cfg: 3 are built
    compress.save(build_model(single), tmp_path / "single.cfg", tmp_path / "single.weights")
    assert compress.load(tmp_path / "single.cfg", tmp_path / "single.weights").cfg.channels == 3


@pytest.mark.parametrize("path", TINY_CFGS, ids=lambda p: p.stem)
def test_estimate_equals_allocated_count(path: Path) -> None:
    model = build_model(read_cfg(path))
    assert estimate_weights(model.graph) == [sum(t.numel() for t in getattr(m, "darknet_tensors", list)())
                                             for m in model.layers]


def test_every_reference_cfg_is_written_back_in_its_dialect(assets: Path) -> None:
    from compress.darknet.cfg import format_cfg
    for path in sorted(SPURS.glob("*.cfg")):
        for dialect in (None, "reference"):
            cfg = read_cfg(path, dialect=dialect)
            text = format_cfg(cfg)
            again = parse_cfg(text, "<written>")
            assert again.dialect == cfg.dialect and format_cfg(again) == text, path.name
            assert [(b.type, b.options) for b in again.blocks] == [(b.type, b.options) for b in cfg.blocks]
