"""`yolo-compress info`: table, --report figures checked against independent counts, PNG, one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import compress
from compress.cli import main
from compress.darknet.weights import count_darknet_floats

from conftest import ASSETS, DATA


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code or 0, out.out, out.err


def _conv_gflops(model, size: int) -> float:
    """2 x multiply-adds of every Conv2d in ConvBNAct layers, from the tensor shapes of a real forward."""
    total = 0
    hooks = []
    for layer in model.layers:
        conv = getattr(layer, "conv", None)
        if isinstance(conv, torch.nn.Conv2d) and hasattr(layer, "bn"):
            def hook(m, inp, out):
                nonlocal total
                total += out.numel() * m.weight[0].numel()  # N=1: outputs x (k*k*cin/groups)
            hooks.append(conv.register_forward_hook(hook))
    with torch.no_grad():
        model.eval()(torch.rand(1, 3, size, size))
    for h in hooks:
        h.remove()
    return 2 * total / 1e9


def test_info_report_on_official_weights(assets: Path, tmp_path: Path, capsys) -> None:
    cfg, weights = ASSETS / "weights" / "yolov4-tiny.cfg", ASSETS / "weights" / "yolov4-tiny.weights"
    report, png = tmp_path / "r.json", tmp_path / "g.png"
    code, out, err = _run(["info", "--cfg", str(cfg), "--weights", str(weights), "--report", str(report),
                           "--gamma-plot", str(png)], capsys)
    assert code == 0, err
    model = compress.load(cfg, weights)
    data = json.loads(report.read_text())
    assert data["params"] == count_darknet_floats(model) == 6_062_814
    # Darknet prints 6.910 BFLOPs for yolov4-tiny@416; that total also counts the 3 maxpools (~0.002).
    assert data["gflops"] == pytest.approx(_conv_gflops(model, 416), abs=1e-4)
    assert 6.900 < data["gflops"] < 6.910
    assert data["img_size"] == [416, 416] and len(data["layers"]) == 38
    assert sum(r["params"] for r in data["layers"]) == data["params"]
    row = data["layers"][30]
    assert (row["type"], row["in_channels"], row["output"]) == ("yolo", 255, "13x13")
    assert data["layers"][0]["kernel"] == "3x3/2" and data["layers"][0]["output"] == "208x208"
    gammas = np.concatenate([l.bn.weight.detach().abs().numpy() for l in model.layers if getattr(l, "bn", None)])
    assert data["gamma"]["count"] == gammas.size
    assert data["gamma"]["mean"] == pytest.approx(float(gammas.mean()), rel=1e-6)
    assert data["gamma"]["p50"] == pytest.approx(float(np.median(gammas)), rel=1e-6)
    assert data["weights_mb"] == pytest.approx(24_251_276 / 1e6)
    # the printed table: header + separator + one row per layer, then the totals line
    lines = out.splitlines()
    assert lines[0].startswith("|") and "type" in lines[0] and "params" in lines[0]
    assert sum(1 for line in lines if line.startswith("|")) == 2 + 38
    assert "38 layers, 6,062,814 params, 6.90" in out and "at 416x416" in out
    assert "BN |gamma|:" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import cv2
    assert cv2.imread(str(png)).shape[:2] == (400, 700)  # figsize 7x4 at 100 dpi


def test_info_img_size_and_no_weights(tmp_path: Path, capsys) -> None:
    report = tmp_path / "r.json"
    code, out, err = _run(["info", "--cfg", str(DATA / "tiny-shortcut.cfg"), "--img-size", "128",
                           "--report", str(report)], capsys)
    assert code == 0, err
    data = json.loads(report.read_text())
    model = compress.load(DATA / "tiny-shortcut.cfg")
    assert data["params"] == count_darknet_floats(model)
    assert data["img_size"] == [128, 128] and data["weights"] is None
    se = data["layers"][12]
    assert se["type"] == "se" and se["params"] == 2 * 32 * 8  # reduction=4: 32->8->32, no bias
    conv_only = _conv_gflops(model, 128)
    se_flops = 2 * 2 * 32 * 8 / 1e9  # counted as 2 x its weights
    assert data["gflops"] == pytest.approx(round(conv_only + se_flops, 4), abs=1e-4)


def test_info_bad_cfg_is_one_error_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.cfg"
    bad.write_text("[net]\nwidth=64\n\n[convolutional]\nfilters=abc\nsize=3\n")
    code, out, err = _run(["info", "--cfg", str(bad)], capsys)
    assert code == 1
    assert err.splitlines() == [f"Error: {bad}:5: [convolutional] filters='abc' is not an integer; "
                                "fix the value in the cfg"]
    assert "Traceback" not in err + out
    bad.write_text("[net]\n[upsample]\n[crnn]\noutput=2\n")
    code, _, err = _run(["info", "--cfg", str(bad)], capsys)
    assert code == 1 and len(err.splitlines()) == 1 and err.startswith(f"Error: {bad}:3: unsupported section")


def test_info_wrong_weights_is_one_error_line(assets: Path, capsys) -> None:
    code, out, err = _run(["info", "--cfg", str(DATA / "tiny-v4-groups.cfg"),
                           "--weights", str(ASSETS / "weights" / "yolo-fastest-1.1.weights")], capsys)
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith("Error: ") and "holds 346062 floats" in err


def test_info_debug_raises(tmp_path: Path) -> None:
    bad = tmp_path / "bad.cfg"
    bad.write_text("[net]\n[convolutional]\nfilters=abc\n")
    with pytest.raises(compress.CompressError, match="is not an integer"):
        main(["--debug", "info", "--cfg", str(bad)])
