"""model.py / layers.py: every real cfg builds with the published parameter count; output shapes; decode by hand."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from compress.darknet.cfg import parse_cfg, read_cfg
from compress.base.errors import CfgError
from compress.darknet.layers import BN_EPS, RegionLayer, YOLOLayer
from compress.darknet.model import build_model
from compress.darknet.weights import count_darknet_floats

from conftest import ASSETS, DEMO_CFG, randomize_bn

# PROVENANCE.md, section 2 (and 4a for yolo-fastest-1.1): parameter counts derived from the official weights.
PARAMS = {
    "yolov3-tiny": 8_858_734, "yolov3-tiny_3l": 9_009_967, "yolov3": 62_001_757, "yolov3-voc": 61_678_657,
    "yolov3-spp": 63_052_381, "yolov4-tiny": 6_062_814, "yolov4-tiny-3l": 6_334_045, "yolov4": 64_429_405,
    "yolov2-tiny": 11_237_145, "yolov2-tiny-voc": 15_867_885, "yolo-fastest-1.1": 346_062,
}
ASSET_CFGS = sorted((ASSETS / "cfg").glob("*.cfg")) + sorted((ASSETS / "weights").glob("*.cfg"))


def _num_boxes(model, h: int, w: int) -> int:
    shapes = model.graph.shapes(h, w)
    return sum(model.layers[i].num_anchors * shapes[i][1] * shapes[i][2] for i in model.graph.heads)


@pytest.mark.parametrize("path", ASSET_CFGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_asset_cfg_builds_counts_and_runs(assets: Path, path: Path) -> None:
    model = build_model(read_cfg(path))
    assert count_darknet_floats(model) == PARAMS[path.stem]
    assert len(model.layers) == len(model.cfg.blocks)
    assert model.stride == 32
    size = 64 if count_darknet_floats(model) > 20e6 else 96
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, size, size))
    assert out.shape == (1, _num_boxes(model, size, size), 5 + model.num_classes)
    assert torch.isfinite(out).all()


def test_all_weighted_asset_cfgs_have_a_count(assets: Path) -> None:
    assert {p.stem for p in ASSET_CFGS} == set(PARAMS)


def test_layer_types_and_bn(tiny_cfg: Path) -> None:
    model = build_model(read_cfg(tiny_cfg))
    for block, layer in zip(model.cfg.blocks, model.layers):
        if block.type == "convolutional":
            bn = bool(block.get_int("batch_normalize", 0))
            assert layer.batch_normalize == bn and (layer.bn is not None) == bn
            assert (layer.conv.bias is None) == bn
            if bn:
                assert layer.bn.eps == BN_EPS == 1e-6
    assert model.heads == [model.layers[i] for i in model.graph.heads]
    assert all(isinstance(h, YOLOLayer) for h in model.heads)
    assert model.num_classes == 2


@pytest.mark.parametrize("hw", [(64, 64), (96, 96), (128, 128), (64, 96)])
def test_output_shapes(tiny_cfg: Path, hw: tuple[int, int]) -> None:
    model = randomize_bn(build_model(read_cfg(tiny_cfg)))
    x = torch.rand(2, 3, *hw)
    model.train()
    raw = model(x)
    assert isinstance(raw, list) and len(raw) == len(model.heads)
    for head, p, i in zip(model.heads, raw, model.graph.heads):
        _, h, w = model.graph.shapes(*hw)[i]
        assert p.shape == (2, head.num_anchors, h, w, 5 + model.num_classes)
        assert hw[0] % h == 0 and hw[0] // h <= model.stride
    model.eval()
    with torch.no_grad():
        dec = model(x)
        raw_eval = model(x, raw=True)
    assert dec.shape == (2, _num_boxes(model, *hw), 5 + model.num_classes)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(raw_eval, model(x, raw=True)))
    scores = dec[..., 4:]
    assert ((scores >= 0) & (scores <= 1)).all()
    # train-mode decode on request: raw=False forces boxes even in train mode
    model.train()
    assert model(x, raw=False).shape == dec.shape


def test_demo_cfg_builds() -> None:
    model = build_model(read_cfg(DEMO_CFG)).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 128, 128))
    assert out.shape == (1, _num_boxes(model, 128, 128), 8)


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _check_cell(model, x: torch.Tensor, head_k: int, a: int, cy: int, cx: int) -> None:
    """Recompute one decoded row from the raw map with plain Python floats (Darknet's formulas)."""
    img_h, img_w = x.shape[-2:]
    with torch.no_grad():
        raw = model(x, raw=True)
        dec = model(x, raw=False)
    head = model.heads[head_k]
    offset = sum(p.shape[1] * p.shape[2] * p.shape[3] for p in raw[:head_k])
    _, _, h, w, _ = raw[head_k].shape
    row = dec[0, offset + a * h * w + cy * w + cx].tolist()
    t = raw[head_k][0, a, cy, cx].tolist()
    s = head.scale_x_y
    aw, ah = (float(v) for v in head.anchors[a])
    if head.new_coords:  # logistic already applied by the conv; Darknet: (x*s - (s-1)/2 + i)/w, (2*w)^2 * anchor
        want = [(t[0] * s - (s - 1) / 2 + cx) * img_w / w, (t[1] * s - (s - 1) / 2 + cy) * img_h / h,
                (2 * t[2]) ** 2 * aw, (2 * t[3]) ** 2 * ah, *t[4:]]
    else:
        want = [(_sigmoid(t[0]) * s - (s - 1) / 2 + cx) * img_w / w, (_sigmoid(t[1]) * s - (s - 1) / 2 + cy) * img_h / h,
                math.exp(t[2]) * aw, math.exp(t[3]) * ah, *map(_sigmoid, t[4:])]
    assert row == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_decode_by_hand_v4_groups() -> None:
    cfg = read_cfg(Path(__file__).parent / "data" / "tiny-v4-groups.cfg")
    model = randomize_bn(build_model(cfg)).eval()
    head = model.heads[0]
    assert head.scale_x_y == 1.05 and head.mask == (3, 4, 5)
    assert head.anchors.tolist() == [[16, 20], [24, 18], [32, 30]]  # pixels of the masked anchors
    x = torch.rand(1, 3, 64, 96)  # non-square: x and y strides differ per axis only through w/h
    _check_cell(model, x, 0, 1, 3, 7)
    _check_cell(model, x, 1, 2, 15, 0)
    _check_cell(model, x, 1, 0, 0, 23)


def _new_coords_cfg():
    cfg = read_cfg(Path(__file__).parent / "data" / "tiny-v4-groups.cfg")
    blocks = list(cfg.blocks)
    for i in model_heads(cfg):
        blocks[i] = blocks[i].replace(new_coords=1, scale_x_y=2.0)
        blocks[i - 1] = blocks[i - 1].replace(activation="logistic")
    return cfg.with_blocks(blocks)


def model_heads(cfg) -> list[int]:
    return [i for i, b in enumerate(cfg.blocks) if b.type == "yolo"]


def test_decode_by_hand_new_coords() -> None:
    model = randomize_bn(build_model(_new_coords_cfg())).eval()
    assert all(h.new_coords and h.scale_x_y == 2.0 for h in model.heads)
    x = torch.rand(1, 3, 64, 64)
    raw = model(x, raw=True)
    assert all(((p >= 0) & (p <= 1)).all() for p in raw)  # the logistic conv output
    _check_cell(model, x, 0, 0, 2, 5)
    _check_cell(model, x, 1, 2, 9, 11)


def test_region_decode_by_hand() -> None:
    text = ("[net]\nwidth=64\nheight=64\n[convolutional]\nfilters=8\nsize=3\nstride=2\npad=1\nactivation=leaky\n"
            "[maxpool]\nsize=2\nstride=2\n[convolutional]\nfilters=14\nsize=1\nactivation=linear\n"
            "[region]\nanchors=1.5,2, 3,1.25\nclasses=2\nnum=2\ncoords=4\n")
    model = build_model(parse_cfg(text)).eval()
    assert isinstance(model.heads[0], RegionLayer)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        t = model(x, raw=True)[0][0, 1, 5, 9].tolist()
        row = model(x)[0, 1 * 256 + 5 * 16 + 9].tolist()
    stride = 64 / 16  # Darknet v2: anchors are in grid cells, classes are softmaxed
    e = [math.exp(v) for v in t[5:]]
    want = [(_sigmoid(t[0]) + 9) * stride, (_sigmoid(t[1]) + 5) * stride, math.exp(t[2]) * 3 * stride,
            math.exp(t[3]) * 1.25 * stride, _sigmoid(t[4]), *(v / sum(e) for v in e)]
    assert row == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_forward_hooks_give_features(tiny_cfg: Path) -> None:
    model = build_model(read_cfg(tiny_cfg)).eval()
    feats = {}
    i = model.graph.heads[0] - 2
    model.layers[i].register_forward_hook(lambda m, inp, out: feats.__setitem__(i, out))
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 64))
    assert feats[i].shape[1:] == model.graph.shapes(64, 64)[i]


def test_dilated_conv_pads_like_darknet() -> None:
    """Darknet pads `pad * dilation` (im2col_cpu_ext), so a dilated 3x3 with pad=1 keeps the spatial size."""
    text = "[net]\nwidth=16\nheight=16\n[convolutional]\nfilters=4\nsize=3\nstride=1\npad=1\ndilation=2\nactivation=linear\n"
    model = build_model(parse_cfg(text)).eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        y = model.layers[0](x)
    assert model.graph.shapes(16, 16)[0] == tuple(y.shape[1:]) == (4, 16, 16)
    w, b = model.layers[0].conv.weight.detach().double(), model.layers[0].conv.bias.detach().double()
    xp = torch.nn.functional.pad(x.double(), (2, 2, 2, 2))
    for f, oy, ox in [(0, 0, 0), (3, 7, 15), (2, 15, 4)]:
        want = b[f] + sum(w[f, c, ky, kx] * xp[0, c, oy + 2 * ky, ox + 2 * kx]
                          for c in range(3) for ky in range(3) for kx in range(3))
        assert float(y[0, f, oy, ox]) == pytest.approx(float(want), abs=1e-5)


def test_unknown_shortcut_weights_type_names_the_line() -> None:
    text = "[net]\n[convolutional]\nfilters=4\n[shortcut]\nfrom=-1\nweights_type=per_pixel\n"
    with pytest.raises(CfgError, match=r"<cfg>:6: \[shortcut\] weights_type=per_pixel is not supported; use one of"):
        build_model(parse_cfg(text))
    assert len(build_model(parse_cfg(text.replace("per_pixel", "per_channel"))).layers[1].darknet_tensors()) == 1
