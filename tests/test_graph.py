"""graph.py: known answers on the tiny cfgs, and static shapes == the shapes a real forward produces."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compress.darknet.cfg import parse_cfg, read_cfg
from compress.darknet.graph import build_graph, conv_geometry, maxpool_geometry
from compress.darknet.model import build_model

from conftest import ASSETS, DATA


def _graph(name: str):
    return build_graph(read_cfg(DATA / name))


def test_v4_groups_known_answers() -> None:
    g = _graph("tiny-v4-groups.cfg")
    assert len(g.inputs) == 21
    assert g.inputs[0] == (-1,) and g.in_channels(0) == 3
    assert g.inputs[2] == (1,) and g.channels[2] == 8          # route groups=2 group_id=1 of 16 channels
    assert g.inputs[5] == (4, 3) and g.channels[5] == 16       # route -1,-2
    assert g.inputs[7] == (1, 6) and g.channels[7] == 32       # route -6,-1
    assert g.inputs[14] == (11,) and g.channels[14] == 32      # route -3 (skips the head)
    assert g.inputs[17] == (16, 9) and g.channels[17] == 48    # route -1,9 (absolute index)
    assert g.heads == (13, 20)
    assert g.channels[12] == g.channels[19] == 21
    assert g.consumers[1] == (2, 7) and g.consumers[9] == (10, 17) and g.consumers[11] == (12, 14)
    assert g.consumers[13] == () and g.consumers[20] == ()
    assert g.kept_outputs == frozenset({1, 3, 9, 11})
    assert g.in_channels(3) == 8 and g.in_channels(18) == 48
    shapes = g.shapes()
    assert shapes[0] == (8, 32, 32) and shapes[7] == (32, 32, 32) and shapes[8] == (32, 16, 16)
    assert shapes[10] == (32, 8, 8) and shapes[13] == (21, 8, 8)
    assert shapes[16] == (16, 16, 16) and shapes[17] == (48, 16, 16) and shapes[20] == (21, 16, 16)
    assert g.shapes(96, 128)[13] == (21, 12, 16)


def test_shortcut_known_answers() -> None:
    g = _graph("tiny-shortcut.cfg")
    assert g.inputs[4] == (3, 1) and g.channels[4] == 16       # shortcut from=-3: (previous, source)
    assert g.inputs[7] == (6, 4)                               # shortcut of a shortcut
    assert g.inputs[11] == (10, 8) and g.channels[11] == 32
    assert g.inputs[12] == (11,) and g.channels[12] == 32      # [se] keeps channels
    assert g.inputs[16] == (15, 13)
    assert g.heads == (19, 26)
    assert g.inputs[20] == (17,) and g.inputs[23] == (22, 12) and g.channels[23] == 16 + 32
    assert g.kept_outputs == frozenset({1, 4, 8, 12, 13, 17})
    assert g.consumers[12] == (13, 23)
    assert g.shapes()[19] == (21, 8, 8) and g.shapes()[26] == (21, 16, 16)


def test_attn_known_answers() -> None:
    g = _graph("tiny-attn.cfg")
    assert g.channels[1] == 8 and g.block(1).get_int("groups") == 8
    assert g.inputs[8] == (7, 5) and g.channels[8] == 16        # scale_channels from=-3
    assert g.shapes()[6] == (16, 1, 1) and g.shapes()[7] == (16, 1, 1) and g.shapes()[8] == (16, 32, 32)
    assert g.shapes()[4] == (16, 32, 32)                         # maxpool size=2 stride=1 keeps the size
    assert g.inputs[13] == (12, 10, 9) and g.channels[13] == 48  # SPP concat
    assert g.inputs[16] == (15, 14) and g.channels[16] == 16     # sam from=-2
    assert g.heads == (19,) and g.shapes()[19] == (21, 16, 16)


def test_geometry_helpers() -> None:
    cfg = parse_cfg("[net]\n[convolutional]\nsize=3\nstride=2\npad=1\n[convolutional]\nsize=5\npadding=1\n"
                    "[maxpool]\nsize=2\nstride=2\n[maxpool]\nsize=3\nstride=1\n[maxpool]\nstride=2\n")
    b = cfg.blocks
    assert conv_geometry(b[0]) == (3, 2, 1) and conv_geometry(b[1]) == (5, 1, 1)
    assert maxpool_geometry(b[2]) == (2, 2, 1) and maxpool_geometry(b[3]) == (3, 1, 2)
    assert maxpool_geometry(b[4]) == (2, 2, 1)
    g = build_graph(cfg)
    # Darknet: conv out = (h + 2p - k)/s + 1; maxpool out = (h + padding - size)/s + 1
    assert g.shapes(13, 13) == [(1, 7, 7), (1, 5, 5), (1, 3, 3), (1, 3, 3), (1, 2, 2)]


def _forward_shapes(model, h: int, w: int) -> dict[int, tuple[int, int, int]]:
    got: dict[int, tuple[int, int, int]] = {}
    handles = [layer.register_forward_hook(lambda m, i, o, k=k: got.__setitem__(k, tuple(o.shape[1:])))
               for k, layer in enumerate(model.layers) if type(layer).__name__ not in ("YOLOLayer", "RegionLayer")]
    with torch.no_grad():
        model(torch.rand(1, 3, h, w), raw=True)
    for handle in handles:
        handle.remove()
    return got


@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
def test_static_shapes_match_forward(tiny_cfg: Path, size: tuple[int, int]) -> None:
    model = build_model(read_cfg(tiny_cfg)).eval()
    static = model.graph.shapes(*size)
    for i, shape in _forward_shapes(model, *size).items():
        assert static[i] == shape, f"layer {i} ({model.cfg.blocks[i].type})"
        assert model.graph.channels[i] == shape[0]


@pytest.mark.parametrize("name", ["yolov4-tiny", "yolo-fastest-1.1", "yolov3-tiny_3l", "yolov2-tiny"])
def test_static_shapes_match_forward_assets(assets: Path, name: str) -> None:
    model = build_model(read_cfg(ASSETS / "cfg" / f"{name}.cfg")).eval()
    static = model.graph.shapes(128, 96)
    got = _forward_shapes(model, 128, 96)
    assert got and all(static[i] == shape for i, shape in got.items())
