"""Sections added through the section table, checked against independent references: OpenCV's Darknet reader
where it reads the section ([reorg], [shortcut] with unequal channels, [net] channels=1), else a plain-loop
re-statement of Darknet's C (reorg_cpu, shortcut_multilayer_cpu, forward_local_avgpool_layer)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.darknet.cfg import format_cfg, parse_cfg, write_cfg
from compress.base.errors import CfgError
from compress.darknet.graph import build_graph
from compress.darknet.model import build_model
from compress.darknet.summary import summarize
from compress.darknet.sections import SECTIONS, supported_sections_markdown
from compress.darknet.weights import write_weights

from conftest import randomize_bn
from test_opencv_parity import TOL, _blob, _compare

import cv2

NET = "[net]\nwidth=64\nheight=64\nchannels=3\n"
HEAD = ("[convolutional]\nfilters=14\nsize=1\nstride=1\npad=1\nactivation=linear\n"
        "[yolo]\nmask=0,1\nanchors=10,14, 23,27\nclasses=2\nnum=2\n")


def conv(f: int, k: int = 3, s: int = 1) -> str:
    return f"[convolutional]\nbatch_normalize=1\nfilters={f}\nsize={k}\nstride={s}\npad=1\nactivation=leaky\n"


OPENCV_CASES = {
    "reorg": NET + conv(8, 3, 2) + conv(16) + "[reorg]\nstride=2\n" + conv(8) + HEAD,
    "reorg-passthrough": NET + conv(8, 3, 2) + conv(16) + "[maxpool]\nsize=2\nstride=2\n" + conv(8)
    + "[route]\nlayers=-3\n[reorg]\nstride=2\n[route]\nlayers=-1,-3\n" + HEAD,
    "shortcut-fewer": NET + conv(8) + conv(16) + "[shortcut]\nfrom=-2\nactivation=linear\n" + HEAD,
    "shortcut-more": NET + conv(16) + conv(8) + "[shortcut]\nfrom=-2\nactivation=leaky\n" + HEAD,
    "gray": NET.replace("channels=3", "channels=1") + conv(8) + conv(8, 3, 2) + HEAD,
}


@pytest.mark.parametrize("name", sorted(OPENCV_CASES))
def test_matches_opencv(tmp_path: Path, name: str) -> None:
    cfg = parse_cfg(OPENCV_CASES[name], name)
    model = randomize_bn(build_model(cfg))
    write_cfg(cfg, tmp_path / "m.cfg")
    write_weights(tmp_path / "m.weights", model)
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    blob = _blob(img, 64)
    if name == "gray":  # OpenCV is fed the gray image; ours converts RGB the way Darknet loads channels=1
        gray = (img[..., 2] * 77.0 + img[..., 1] * 150.0 + img[..., 0] * 29.0) / 256
        blob = cv2.dnn.blobFromImage(gray.astype(np.float32), 1 / 255.0, (64, 64), crop=False)
        rgb = torch.from_numpy(_blob(img, 64))
        with torch.no_grad():
            assert torch.allclose(model.eval()(rgb), model(torch.from_numpy(blob)), atol=1e-5)
    box_err, cls_err, nonzero = _compare(tmp_path / "m.cfg", tmp_path / "m.weights", blob)
    assert box_err < TOL and cls_err < TOL and nonzero > 0


def test_stride_x_and_stride_y_like_darknet() -> None:
    """parse_convolutional/parse_maxpool: stride_x=/stride_y= override stride= (OpenCV ignores them)."""
    text = (NET + conv(8).replace("stride=1", "stride_x=2\nstride_y=1") + "[maxpool]\nsize=2\nstride=2\nstride_y=1\n"
            + conv(8).replace("stride=1", "stride_x=1\nstride_y=2") + HEAD)
    model = build_model(parse_cfg(text)).eval()
    shapes = model.graph.shapes()
    assert shapes[:3] == [(8, 64, 32), (8, 64, 16), (8, 32, 16)]
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 2 * 32 * 16, 7)


# --- Darknet's C, restated as plain loops ------------------------------------------------------------------------

def _reorg_cpu(x: np.ndarray, w: int, h: int, c: int, stride: int, forward: bool) -> np.ndarray:
    out = np.zeros_like(x)
    out_c = c // (stride * stride)
    for k in range(c):
        for j in range(h):
            for i in range(w):
                in_index = i + w * (j + h * k)
                c2, offset = k % out_c, k // out_c
                w2, h2 = i * stride + offset % stride, j * stride + offset // stride
                out_index = w2 + w * stride * (h2 + h * stride * c2)
                if forward:
                    out[out_index] = x[in_index]
                else:
                    out[in_index] = x[out_index]
    return out


@pytest.mark.parametrize("section, reverse", [("reorg", 0), ("reorg3d", 0), ("reorg3d", 1), ("reorg", 1)])
def test_reorg_is_darknets_reorg_cpu(section: str, reverse: int) -> None:
    c, h, w, s = (8, 6, 4, 2) if not reverse else (16, 3, 2, 2)
    cfg = parse_cfg(NET.replace("channels=3", f"channels={c}") + f"[{section}]\nstride={s}\nreverse={reverse}\n")
    layer = build_model(cfg).layers[0]
    x = torch.randn(1, c, h, w)
    got = layer(x).flatten().numpy()
    flat = x.flatten().numpy()
    if section == "reorg":      # reorg_old: reorg_cpu(input, l.w, l.h, l.c, ...)
        want = _reorg_cpu(flat, w, h, c, s, bool(reverse))
    else:                       # reorg3d: reorg_cpu(input, l.out_w, l.out_h, l.out_c, ...)
        oc, oh, ow = (c // 4, h * 2, w * 2) if reverse else (c * 4, h // 2, w // 2)
        want = _reorg_cpu(flat, ow, oh, oc, s, bool(reverse))
    np.testing.assert_array_equal(got, want)
    if section == "reorg3d" and not reverse:  # a plain space-to-depth: channel (dy*s + dx)*C + c
        y = layer(x)
        assert torch.equal(y[0, (1 * 2 + 0) * c + 3], x[0, 3, 1::2, 0::2])


def _shortcut_cpu(inp: np.ndarray, adds: list[np.ndarray], weights: np.ndarray | None, norm: str) -> np.ndarray:
    """shortcut_multilayer_cpu for one image; arrays flat (c*h*w), `weights` flat (nweights)."""
    n, src_outputs = len(adds), inp.size
    layer_step = weights.size // (n + 1) if weights is not None else 0
    step = src_outputs // layer_step if weights is not None else 0
    out = np.zeros_like(inp)
    for src_i in range(src_outputs):
        ws = [float(weights[src_i // step + k * layer_step]) for k in range(n + 1)] if weights is not None else None
        total, top = 1.0, -math.inf
        if ws is not None and norm != "none":
            top = max(ws)
            total = 1e-4 + sum(max(v, 0.0) if norm == "relu" else math.exp(v - top) for v in ws)

        def weight(k: int) -> float:
            v = ws[k]
            return max(v, 0.0) / total if norm == "relu" else math.exp(v - top) / total if norm == "softmax" else v

        out[src_i] = inp[src_i] * (weight(0) if ws is not None else 1.0)
        for k, add in enumerate(adds):
            if src_i < add.size:
                out[src_i] += add[src_i] * (weight(k + 1) if ws is not None else 1.0)
    return out


@pytest.mark.parametrize("kind, norm, widths", [
    ("none", "none", (4, 6, 2)), ("per_feature", "relu", (4, 4, 4)), ("per_channel", "softmax", (4, 4, 6)),
    ("per_channel", "none", (4, 2, 4)), ("per_feature", "softmax", (4, 6, 4)),
])
def test_shortcut_is_darknets_multilayer_shortcut(kind: str, norm: str, widths: tuple[int, int, int]) -> None:
    a, b, c = widths
    text = (NET + conv(b) + conv(c) + conv(a) + f"[shortcut]\nfrom=-2,-3\nweights_type={kind}\n"
            f"weights_normalization={norm}\nactivation=linear\n")
    model = build_model(parse_cfg(text))
    layer = model.layers[3]
    if layer.weight is not None:
        with torch.no_grad():
            layer.weight.normal_(0.3, 0.8)
        assert layer.weight.numel() == 3 * (a if kind == "per_channel" else 1)
    x, f1, f2 = torch.randn(1, a, 5, 5), torch.randn(1, c, 5, 5), torch.randn(1, b, 5, 5)
    with torch.no_grad():
        got = layer(x, f1, f2).flatten().numpy()
    weights = None if layer.weight is None else layer.weight.detach().flatten().numpy()
    want = _shortcut_cpu(x.flatten().numpy(), [f1.flatten().numpy(), f2.flatten().numpy()], weights, norm)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert model.graph.channels[3] == a and model.graph.inputs[3] == (2, 1, 0)


def test_local_avgpool_is_darknets() -> None:
    """forward_local_avgpool_layer: window from -pad/2, mean over the taps inside the image."""
    model = build_model(parse_cfg(NET + "[local_avgpool]\nsize=3\nstride=2\n"))
    x = torch.randn(1, 2, 7, 6)
    got = model.layers[0](x)
    size, stride, pad = 3, 2, 2
    oh, ow = (7 + pad - size) // stride + 1, (6 + pad - size) // stride + 1
    assert got.shape == (1, 2, oh, ow) == (1, 2, *model.graph.shapes(7, 6)[0][1:])
    for k in range(2):
        for i in range(oh):
            for j in range(ow):
                taps = [float(x[0, k, i * stride + n - pad // 2, j * stride + m - pad // 2])
                        for n in range(size) for m in range(size)
                        if 0 <= i * stride + n - pad // 2 < 7 and 0 <= j * stride + m - pad // 2 < 6]
                assert float(got[0, k, i, j]) == pytest.approx(sum(taps) / len(taps), abs=1e-6)


def test_upsample_scale_and_gaussian_yolo_by_hand() -> None:
    text = (NET + conv(8) + "[upsample]\nstride=2\nscale=0.5\n[convolutional]\nfilters=22\nsize=1\nstride=2\n"
            "activation=linear\n[Gaussian_yolo]\nmask=0,1\nanchors=10,14, 23,27\nclasses=2\nnum=2\n")
    cfg = parse_cfg(text)
    assert "[Gaussian_yolo]" in format_cfg(cfg) and format_cfg(parse_cfg(format_cfg(cfg))) == format_cfg(cfg)
    model = build_model(cfg).eval()
    x = torch.randn(1, 8, 4, 4)
    assert torch.equal(model.layers[1](x), 0.5 * x.repeat_interleave(2, 2).repeat_interleave(2, 3))
    feat = torch.randn(1, 22, 2, 3)
    head = model.layers[3]
    out = head(feat, (64, 96), False)
    p = feat.view(2, 11, 2, 3)                               # anchor 1, cell (y=1, x=2)
    a, y, xc = 1, 1, 2
    v = p[a, :, y, xc]
    sig = torch.sigmoid
    want = torch.stack([(sig(v[0]) + xc) * 32, (sig(v[2]) + y) * 32, torch.exp(v[4]) * 23, torch.exp(v[6]) * 27,
                        sig(v[8]) * (1 - sig(v[[1, 3, 5, 7]]).mean()), sig(v[9]), sig(v[10])])
    torch.testing.assert_close(out[0, a * 6 + y * 3 + xc], want)
    assert head(feat, (64, 96), True).shape == (1, 2, 2, 3, 7)   # raw maps: the [yolo] entries for training


def test_asff_head_fuses_levels_by_hand() -> None:
    text = (NET + conv(8, 3, 2) + "[convolutional]\nfilters=16\nsize=1\nactivation=linear\n[route]\nlayers=-2\n"
            + conv(8, 3, 2) + "[convolutional]\nfilters=16\nsize=1\nactivation=linear\n"
            + "".join(f"[yolo]\nfrom=1,4\nmask={m}\nanchors=10,14, 23,27, 40,40, 60,60\nclasses=2\nnum=4\n"
                      for m in ("0,1", "2,3")))
    cfg = parse_cfg(text)
    assert cfg.dialect == "reference"
    model = build_model(cfg).eval()
    assert model.graph.inputs[5] == (1, 4) and model.graph.heads == (5, 6)
    l0, l1 = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 4, 4)
    w = torch.sigmoid(l1[:, -2:]) * (2 / 2)
    fused = l1[:, :-2] * w[:, 1:2] + w[:, 0:1] * torch.nn.functional.interpolate(
        l0[:, :-2], size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(model.layers[6](l0, l1, (64, 64), True), model.layers[6].raw(fused))
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 2 * 32 * 32 + 2 * 16 * 16, 7)


# --- validation: file:line errors before anything is allocated ------------------------------------------------

@pytest.mark.parametrize("change, match", [
    ("stride=1", r"bad\.cfg:10: \[convolutional\] stride=0 must be >= 1"),
    ("filters=8", r"bad\.cfg:8: \[convolutional\] filters=-16 must be >= 1"),
    ("size=3", r"bad\.cfg:9: \[convolutional\] size=0 must be >= 1"),
])
def test_bad_conv_values_name_the_line(change: str, match: str) -> None:
    bad = {"stride=1": "stride=0", "filters=8": "filters=-16", "size=3": "size=0"}[change]
    text = NET + "\n" + conv(8).replace(change, bad) + HEAD
    with pytest.raises(CfgError, match=match):
        build_model(parse_cfg(text, "bad.cfg"))


def test_upsample_stride_zero_and_huge_layers_are_refused() -> None:
    with pytest.raises(CfgError, match=r"bad\.cfg:13: \[upsample\] stride=0 must be >= 1"):
        build_graph(parse_cfg(NET + conv(8) + "[upsample]\nstride=0\n", "bad.cfg"))
    with pytest.raises(CfgError, match=r"bad\.cfg:5: \[convolutional\] layer 0 alone needs 12.4 GB of weights"):
        build_model(parse_cfg(NET + conv(100000000) + HEAD, "bad.cfg"))
    with pytest.raises(CfgError, match=r"bad\.cfg:5: .*GB of weights"):
        build_model(parse_cfg(NET + conv(16).replace("size=3", "size=99999") + HEAD, "bad.cfg"))


def test_sizes_that_cannot_flow_are_refused(assets: Path) -> None:
    from compress.darknet.cfg import read_cfg
    model = build_model(read_cfg(assets / "cfg" / "yolov4-tiny.cfg"))
    with pytest.raises(CfgError, match=r"yolov4-tiny\.cfg:\d+: \[route\] joins input 0 \(8x8\) with input 1 \(7x7\)"):
        summarize(model, (100, 100))
    assert summarize(model, (96, 96)).gflops > 0
    with pytest.raises(CfgError, match=r"\[convolutional\] size=7 stride=1 pad=0 leaves nothing of its 4x4 input"):
        build_graph(parse_cfg(NET + "[convolutional]\nfilters=2\nsize=7\n")).shapes(4, 4)


def test_no_head_and_dialects() -> None:
    model = build_model(parse_cfg(NET + conv(8), "nohead.cfg"))
    with pytest.raises(CfgError, match=r"nohead\.cfg: the cfg has no detection head"):
        model.num_classes
    assert parse_cfg(NET + conv(8).replace("leaky", "none")).dialect == "reference"
    assert parse_cfg(NET + conv(8)).dialect == "darknet"
    ref = parse_cfg(NET.replace("channels=3", "channels=1") + conv(8) + HEAD, dialect="reference")
    assert ref.channels == 3 and "dialect=reference" in format_cfg(ref)
    assert parse_cfg(format_cfg(ref)).dialect == "reference"


def test_readme_table_lists_every_section() -> None:
    text = supported_sections_markdown()
    for name, section in SECTIONS.items():
        assert f"`[{section.header or name}]`" in text


def test_share_index_reuses_an_earlier_convs_weights(tmp_path: Path) -> None:
    """Darknet's share_index: the conv computes with layer N's weights and stores none (load_weights skips it)."""
    text = NET + conv(8) + conv(8) + conv(8).replace("batch_normalize=1", "batch_normalize=1\nshare_index=-1") + HEAD
    model = randomize_bn(build_model(parse_cfg(text))).eval()
    alone = build_model(parse_cfg(NET + conv(8) + conv(8) + HEAD))
    assert model.layers[2].conv is model.layers[1].conv and model.layers[2].darknet_tensors() == []
    from compress.darknet.model import estimate_weights
    from compress.darknet.weights import count_darknet_floats, read_weights
    assert count_darknet_floats(model) == count_darknet_floats(alone) == sum(estimate_weights(model.graph))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a = model.layers[1](model.layers[0](x))
        assert torch.equal(model.layers[2](a), model.layers[1](a))
    write_weights(tmp_path / "s.weights", model)
    again = build_model(parse_cfg(text))
    read_weights(tmp_path / "s.weights", again)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model(x))
    with pytest.raises(CfgError, match=r"share_index names layer 0, which is not a conv of the same shape"):
        build_model(parse_cfg(NET + conv(8) + conv(8).replace("batch_normalize=1", "share_index=0\nbatch_normalize=1")
                              + HEAD))


def test_table_quant_rule_agrees_with_the_quant_package() -> None:
    """The table's output-quantization rule is the one compress/quant applies to the built modules."""
    from compress.quant.prepare import _output_rule
    from compress.darknet.sections import output_quant_rule
    from conftest import TINY_CFGS
    from compress.darknet.cfg import read_cfg
    checked = 0
    for path in TINY_CFGS:
        model = build_model(read_cfg(path))
        for i, (layer, section) in enumerate(zip(model.layers, model.graph.sections)):
            if section.conv or section.head:
                continue
            n = len(model.graph.inputs[i])
            assert output_quant_rule(section, n) == _output_rule(layer, n), (path.name, i, section.name)
            checked += 1
    assert checked > 10


def test_attention_operands_must_agree() -> None:
    text = NET + conv(8) + "[avgpool]\n" + "[convolutional]\nfilters=4\nsize=1\nactivation=logistic\n"
    with pytest.raises(CfgError, match=r"bad\.cfg:17: \[scale_channels\] multiplies the previous layer \(4 channels\) "
                                       r"with layer from= \(8 channels\)"):
        build_graph(parse_cfg(text + "[scale_channels]\nfrom=-3\n", "bad.cfg"))
    with pytest.raises(CfgError, match=r"\[sam\] joins the previous layer \(1x1\) with layer from= \(64x64\)"):
        build_graph(parse_cfg(text.replace("filters=4", "filters=8") + "[sam]\nfrom=-3\n")).shapes()


def test_reference_dialect_tiny_maxpool_zero_pads() -> None:
    """The reference builds [maxpool] size=2 stride=1 as ZeroPad2d((0,1,0,1)) + MaxPool2d(2, 1): its last row
    and column see a 0; Darknet ignores the taps outside the image."""
    text = NET + "[maxpool]\nsize=2\nstride=1\n"
    x = -torch.rand(1, 1, 3, 3) - 1
    darknet = build_model(parse_cfg(text)).layers[0](x)
    reference = build_model(parse_cfg(text, dialect="reference")).layers[0](x)
    assert torch.equal(darknet[..., :2, :2], reference[..., :2, :2])
    assert torch.equal(reference[..., 2, :], torch.zeros(1, 1, 3)) and torch.equal(darknet[0, 0, 2, 2], x[0, 0, 2, 2])
