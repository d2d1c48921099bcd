"""`yolo-compress quantize` end to end on the demo cfg + synthetic shapes (small, CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import compress
from compress.cfg import read_cfg
from compress.cli import cli
from compress.model import build_model
from compress.synth import synthesize

from conftest import DEMO_CFG, randomize_bn

import onnxruntime  # noqa: F401


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("qcli")
    data = synthesize(root / "synth", n_train=8, n_valid=8, img_size=64)
    cfg, weights = root / "demo.cfg", root / "demo.weights"
    compress.save(randomize_bn(build_model(read_cfg(DEMO_CFG))), cfg, weights)
    return cfg, weights, data


def _run(args: list[str]) -> dict:
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def test_quantize_bits4_alone_runs_dorefa_and_writes_every_output(demo, tmp_path):
    cfg, weights, data = demo
    out = tmp_path / "q4"
    res = _run(["quantize", "--cfg", str(cfg), "--weights", str(weights), "--data", str(data), "--out", str(out),
                "--bits", "4", "--img-size", "64", "--calib-batches", "1", "--report", str(tmp_path / "r.json")])
    report = json.loads((out / "report.json").read_text())
    assert report == json.loads((tmp_path / "r.json").read_text())
    assert report["method"] == "dorefa" and report["quant_config"]["w_bits"] == 4
    for key in ("map50_fp32", "map50_fakequant", "map50_int8_onnx", "map50_95_fp32", "map50_95_fakequant",
                "map50_95_int8_onnx", "size_mb_fp32", "size_mb_int8", "latency_ms_fp32_onnx", "latency_ms_int8_onnx",
                "cfg", "weights", "onnx", "params", "gflops", "size_mb", "latency_ms", "map50", "map50_95"):
        assert key in report and report[key] is not None, key
    assert Path(report["cfg"]) == out / "demo-q4.cfg" and Path(report["weights"]) == out / "demo-q4.weights"
    for name in ("quant.json", "weights_int.npz", "model-int8.onnx", "model-fp32.onnx"):
        assert (out / name).is_file()
    assert report["size_mb_int8"] < 0.5 * report["size_mb_fp32"]
    assert "int8 QDQ ONNX" in res.output
    # the Darknet pair is folded and its inner conv weights sit on a 4-bit DoReFa grid (16 levels per channel)
    model = compress.load(report["cfg"], report["weights"])
    npz = np.load(out / "weights_int.npz")
    doc = json.loads((out / "quant.json").read_text())
    inner = [r["layer"] for r in doc["layers"] if r["type"] == "convolutional" and r["weight"]["scheme"] == "dorefa"]
    assert inner
    for i in inner:
        assert len(np.unique(npz[f"layer{i}.codes"])) <= 16
        w = model.layers[i].conv.weight.detach().numpy()
        assert all(len(np.unique(w[c])) <= 16 for c in range(w.shape[0]))


def test_quantize_rejects_bad_options_with_one_line(demo, tmp_path):
    cfg, weights, data = demo
    res = CliRunner().invoke(cli, ["quantize", "--cfg", str(cfg), "--weights", str(weights), "--data", str(data),
                                   "--out", str(tmp_path), "--pow2", "--no-bn-fold"])
    assert res.exit_code != 0
    assert "--no-bn-fold" in str(res.exception) or "--no-bn-fold" in res.output
