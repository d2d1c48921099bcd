"""Every export format, run in its own runtime (onnxruntime, OpenVINO CPU, ncnn), against the torch model.

The reference is always the torch eval-mode output (or `compress.detection.boxes.non_max_suppression` of it for --nms
graphs) on real images, compared here directly -- not through the exporter's own check.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from compress.detection.boxes import box_iou, non_max_suppression
from compress.base.errors import ExportError
from compress.deploy.export import ExportConfig, NmsConfig, export
from compress.darknet.persist import load
from compress.deploy.runtimes import load_predictor

from conftest import DATA, randomize_bn, require_assets

import ncnn  # noqa: F401  (the runtimes under test must be installed: fail, don't skip)
import openvino  # noqa: F401
import pnnx  # noqa: F401

BOX_PX, SCORE = 1.0, 0.01             # fp32 formats
BOX_PX_HALF, SCORE_HALF = 3.0, 0.05   # --half (see ExportConfig.tolerances)
SIZE = 320


def _image(path: Path, hw: tuple[int, int]) -> torch.Tensor:
    img = Image.open(path).convert("RGB").resize((hw[1], hw[0]))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()


@pytest.fixture(scope="module")
def fastest():
    """yolo-fastest-1.1 at 320 and two real images (batch of 2) on which it finds objects."""
    w = require_assets() / "weights"
    model = load(w / "yolo-fastest-1.1.cfg", w / "yolo-fastest-1.1.weights").eval()
    samples = require_assets() / "data" / "samples"
    x = torch.cat([_image(samples / n, (SIZE, SIZE)) for n in ("dog.jpg", "horses.jpg")])
    with torch.no_grad():
        ref = model(x)
    assert (ref[..., 4].amax(1) > 0.5).all()  # confident detections on both: parity covers real boxes
    return model, x, ref


@pytest.fixture(scope="module")
def exported(fastest, tmp_path_factory):
    """Each (format, half) export of yolo-fastest-1.1, made once per module on first use."""
    cache: dict = {}

    def get(fmt: str, half: bool = False):
        if (fmt, half) not in cache:
            out = tmp_path_factory.mktemp(f"{fmt}{int(half)}") / ("m.onnx" if fmt == "onnx" else "m")
            cache[fmt, half] = export(fastest[0], out, ExportConfig(format=fmt, half=half))
        return cache[fmt, half]
    return get


def _diff(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    assert got.shape == ref.shape
    d = (got.double() - ref.double()).abs()
    return float(d[..., :4].max()), float(d[..., 4:].max())


@pytest.mark.parametrize("fmt,half", [("onnx", False), ("openvino", False), ("ncnn", False), ("onnx", True),
                                      ("openvino", True), ("ncnn", True)])
def test_format_matches_torch_in_its_runtime(fastest, exported, fmt, half):
    model, x, ref = fastest
    result = exported(fmt, half)
    assert result.path.suffix == {"onnx": ".onnx", "openvino": ".xml", "ncnn": ".param"}[fmt]
    assert all(f.is_file() for f in result.files)
    box, score = _diff(load_predictor(result.path)(x), ref)
    limit = (BOX_PX_HALF, SCORE_HALF) if half else (BOX_PX, SCORE)
    assert box <= limit[0] and score <= limit[1], (box, score)
    if not half:
        assert box < 0.01 and score < 1e-4  # fp32 conversions are exact up to float reassociation
    weights = max(f.stat().st_size for f in result.files)
    params = sum(p.numel() for p in model.parameters())
    assert weights < params * (2.6 if half else 4.4)  # fp16 weights take 2 bytes each, fp32 take 4


def test_nms_graph_matches_torch_nms(fastest, tmp_path):
    model, x, ref = fastest
    cfg = NmsConfig(iou_thres=0.45, score_thres=0.25, max_det=50)
    for fmt, out in (("onnx", tmp_path / "e2e.onnx"), ("openvino", tmp_path / "e2e")):
        result = export(model, out, ExportConfig(format=fmt, nms=cfg, dynamic_batch=True, check=True),
                        check_inputs=[x])
        assert result.parity.detections >= 2 and result.parity.unmatched == 0
        boxes, scores, classes, num = load_predictor(result.path).run(x)
        assert boxes.shape == (2, 50, 4) and scores.shape == (2, 50) and classes.shape == (2, 50)
        for k, want in enumerate(non_max_suppression(ref, cfg.score_thres, cfg.iou_thres, cfg.max_det)):
            n = int(num[k])
            assert n == len(want) > 0
            assert np.all(scores[k, n:] == 0) and np.all(np.diff(scores[k, :n]) <= 0)
            got = torch.from_numpy(boxes[k, :n]).double()
            iou = box_iou(want[:, :4].double(), got)
            best = iou.argmax(1)
            assert (iou.max(1).values > 0.99).all()
            assert (want[:, :4].double() - got[best]).abs().max() <= BOX_PX
            assert np.abs(want[:, 4].numpy() - scores[k, best.numpy()]).max() <= SCORE
            assert np.array_equal(want[:, 5].numpy().astype(int), classes[k, best.numpy()])


def test_dynamic_axes_run_other_sizes_and_batches(tmp_path):
    model = randomize_bn(load(DATA / "tiny-v4-groups.cfg")).eval()
    x = torch.rand(3, 3, 2 * model.stride, 3 * model.stride)
    with torch.no_grad():
        ref = model(x)
    for fmt, out in (("onnx", tmp_path / "dyn.onnx"), ("openvino", tmp_path / "dyn")):
        result = export(model, out, ExportConfig(format=fmt, dynamic=True, simplify=True))
        predictor = load_predictor(result.path)
        assert predictor.img_hw is None
        box, score = _diff(predictor(x), ref)
        assert box <= 0.01 and score <= 1e-4


def test_simplify_shrinks_the_graph_and_keeps_outputs(fastest, exported, tmp_path):
    model, x, ref = fastest
    plain = exported("onnx")
    slim = export(model, tmp_path / "b.onnx", ExportConfig(simplify=True))
    nodes = [len(onnx.load(str(r.path)).graph.node) for r in (plain, slim)]
    assert nodes[1] < nodes[0]
    box, score = _diff(load_predictor(slim.path)(x), ref)
    assert box < 0.01 and score < 1e-4


def test_metadata_describes_the_export(exported):
    result = exported("ncnn", True)
    meta = json.loads((result.path.parent / "metadata.json").read_text())
    assert meta["img_size"] == [SIZE, SIZE] and meta["classes"] == 80 and meta["half"] is True
    assert load_predictor(result.path).img_hw == (SIZE, SIZE)
    onnx_result = exported("onnx")
    props = {p.key: json.loads(p.value) for p in onnx.load(str(onnx_result.path)).metadata_props}
    assert props["classes"] == 80 and props["format"] == "onnx"


def test_check_fails_loudly_beyond_tolerance(tmp_path):
    model = randomize_bn(load(DATA / "tiny-v4-groups.cfg"))
    ok = export(model, tmp_path / "m", ExportConfig(format="openvino", check=True))
    assert ok.parity.max_box_diff < 0.01 and ok.parity.inputs == 1
    with pytest.raises(ExportError, match="differs from torch"):
        export(model, tmp_path / "m.onnx", ExportConfig(check=True, half=True, box_tol=1e-9, score_tol=1e-9))


def test_config_refusals(tmp_path):
    with pytest.raises(ExportError, match="ncnn"):
        ExportConfig(format="ncnn", nms=NmsConfig())
    with pytest.raises(ExportError, match="ncnn"):
        ExportConfig(format="ncnn", dynamic=True)
    with pytest.raises(ExportError, match="--format"):
        ExportConfig(format="tflite")
    with pytest.raises(ExportError, match="--max-det"):
        NmsConfig(max_det=0)
    model = load(DATA / "tiny-shortcut.cfg")
    with pytest.raises(ExportError, match=r"\*\.onnx"):
        export(model, tmp_path / "model.bin", ExportConfig())
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="writes a folder"):
        export(model, tmp_path / "file", ExportConfig(format="openvino"))
    assert (tmp_path / "file").read_text() == "x"


@pytest.fixture(scope="module")
def coco8(tmp_path_factory):
    """8 COCO128 images + labels in a fresh images/ labels/ tree, with coco.names beside them."""
    src = require_assets() / "data" / "coco128"
    root = tmp_path_factory.mktemp("coco8")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for img in sorted((src / "images" / "train2017").glob("*.jpg"))[:8]:
        (root / "images" / img.name).write_bytes(img.read_bytes())
        label = src / "labels" / "train2017" / f"{img.stem}.txt"
        (root / "labels" / label.name).write_text(label.read_text() if label.is_file() else "")
    (root / "images" / "coco.names").write_text((src / "coco.names").read_text())
    return root / "images"


def test_cli_eval_scores_every_exported_format_like_the_darknet_pair(exported, coco8, tmp_path):
    from click.testing import CliRunner

    from compress.cli import cli
    w = require_assets() / "weights"
    cfg = str(w / "yolo-fastest-1.1.cfg")
    scores = {}
    for name, weights in [("darknet", w / "yolo-fastest-1.1.weights"), ("onnx", exported("onnx").path),
                          ("openvino", exported("openvino").path), ("ncnn", exported("ncnn").path),
                          ("ncnn-fp16", exported("ncnn", True).path)]:
        report = tmp_path / f"{name}.json"
        res = CliRunner().invoke(cli, ["eval", "--cfg", cfg, "--weights", str(weights), "--data", str(coco8),
                                       "--workers", "0", "--no-progress", "--report", str(report)])
        assert res.exit_code == 0, res.output
        figures = json.loads(report.read_text())
        assert figures["img_size"] == SIZE  # taken from the exported model / the cfg
        scores[name] = figures["map50"]
    assert scores["darknet"] > 0.2, scores
    assert all(abs(v - scores["darknet"]) <= 0.01 for v in scores.values()), scores
    res = CliRunner().invoke(cli, ["eval", "--cfg", cfg, "--weights", str(exported("onnx").path), "--data",
                                   str(coco8), "--img-size", "416"])
    assert res.exit_code == 1 and "320x320 inputs only" in str(res.exception)


def test_int8_qdq_onnx_runs_in_openvino_like_onnxruntime(tmp_path):
    """The QDQ ONNX `quantize` writes also runs in OpenVINO (int8 kernels); both runtimes agree."""
    from compress.quant import GoogleConfig, calibrate, prepare_qat
    from compress.quant.onnx_qdq import export_qdq_onnx
    from compress.deploy.runtimes.openvino import to_openvino

    model = randomize_bn(load(DATA / "tiny-v4-groups.cfg")).eval()
    hw = (model.cfg.height, model.cfg.width)
    q = prepare_qat(model, GoogleConfig())
    calibrate(q, [torch.rand(4, 3, *hw) for _ in range(2)])
    export_qdq_onnx(q, tmp_path / "int8.onnx", hw)
    xml = to_openvino(tmp_path / "int8.onnx", tmp_path / "int8.xml")
    x = torch.rand(2, 3, *hw)
    ort, ov = load_predictor(tmp_path / "int8.onnx")(x), load_predictor(xml)(x)
    with torch.no_grad():
        ref = model(x)
    box, score = _diff(ov, ort)
    assert score < 0.05 and box < 0.05 * max(hw)  # a few int8 steps apart at most
    assert _diff(ov, ref)[1] < 0.1
    direct = load_predictor(tmp_path / "int8.onnx", runtime="openvino")  # OpenVINO reads the ONNX itself
    # the same graph either way; OpenVINO 2026.4 fuses the two differently by a few float32 ulps
    box, score = _diff(direct(x), ov)
    assert type(direct).__name__ == "OpenVinoPredictor" and box < 1e-4 * max(hw) and score < 1e-5


def test_cli_nms_export_checks_detections_on_a_real_image(tmp_path):
    from click.testing import CliRunner

    from compress.cli import cli
    w, samples = require_assets() / "weights", require_assets() / "data" / "samples"
    report = tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["export", "--cfg", str(w / "yolo-fastest-1.1.cfg"), "--weights",
                                   str(w / "yolo-fastest-1.1.weights"), "--out", str(tmp_path / "e2e.onnx"), "--nms",
                                   "--max-det", "20", "--check-image", str(samples / "dog.jpg"), "--report",
                                   str(report)])
    assert res.exit_code == 0, res.output
    figures = json.loads(report.read_text())
    assert figures["check_inputs"] == 2 and figures["check_detections"] >= 2 and figures["unmatched"] == 0
    assert figures["nms"]["max_det"] == 20 and figures["max_box_diff"] <= BOX_PX
