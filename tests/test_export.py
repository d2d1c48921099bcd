"""ONNX export: onnxruntime must reproduce the torch eval-mode output (boxes in pixels, scores)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from compress.base.errors import ExportError
from compress.deploy.export import ExportConfig, check_onnx, export_onnx, onnx_session
from compress.darknet.persist import load

from conftest import DATA, randomize_bn

import onnxruntime  # noqa: F401

BOX_RTOL = 1e-4   # box columns: max |diff| / input size
SCORE_ATOL = 1e-5


def _assert_parity(model, path: Path, x: torch.Tensor) -> None:
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    got = onnx_session(path).run(["output"], {"images": x.numpy()})[0]
    assert got.shape == ref.shape
    size = max(x.shape[-2:])
    assert np.abs(got[..., :4] - ref[..., :4]).max() / size <= BOX_RTOL
    np.testing.assert_allclose(got[..., 4:], ref[..., 4:], rtol=0, atol=SCORE_ATOL)


def _real_image(assets: Path, hw: tuple[int, int]) -> torch.Tensor:
    from PIL import Image
    img = Image.open(assets / "data" / "samples" / "dog.jpg").convert("RGB").resize((hw[1], hw[0]))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()


@pytest.mark.parametrize("opset", [13, 17])
def test_tiny_cfgs_match_onnxruntime(tiny_cfg, opset, tmp_path):
    model = randomize_bn(load(tiny_cfg))
    path = tmp_path / "m.onnx"
    result = export_onnx(model, path, ExportConfig(opset=opset))
    assert path.is_file() and result.opset == opset and result.size_mb == pytest.approx(path.stat().st_size / 1e6)
    _assert_parity(model, path, torch.rand(1, 3, model.cfg.height, model.cfg.width))


def test_dynamic_batch_runs_batch_2_and_static_runs_it_image_by_image(tmp_path):
    model = randomize_bn(load(DATA / "tiny-v4-groups.cfg"))
    dyn, static = tmp_path / "dyn.onnx", tmp_path / "static.onnx"
    export_onnx(model, dyn, ExportConfig(dynamic_batch=True))
    export_onnx(model, static, ExportConfig())
    x = torch.rand(2, 3, model.cfg.height, model.cfg.width)
    _assert_parity(model, dyn, x)
    with pytest.raises(Exception, match="[Ii]nvalid dimensions|[Gg]ot invalid"):
        onnx_session(static).run(["output"], {"images": x.numpy()})  # the graph itself takes batch 1 only
    assert check_onnx(model, static, [x]).max_score_diff <= SCORE_ATOL  # the predictor runs it per image
    with pytest.raises(ExportError, match="--dynamic"):
        check_onnx(model, static, [torch.rand(1, 3, 2 * model.cfg.height, model.cfg.width)])


def test_img_size_override_and_stride_error(tmp_path):
    model = randomize_bn(load(DATA / "tiny-shortcut.cfg"))
    result = export_onnx(model, tmp_path / "m.onnx", ExportConfig(img_size=2 * model.cfg.width, check=True))
    assert result.img_size == (2 * model.cfg.height, 2 * model.cfg.width)
    assert result.parity.max_score_diff <= SCORE_ATOL
    with pytest.raises(ExportError, match="multiple of the model stride"):
        export_onnx(model, tmp_path / "bad.onnx", ExportConfig(img_size=model.stride * 4 + 1))
    assert not (tmp_path / "bad.onnx").exists()


def test_config_validation():
    with pytest.raises(ExportError, match="opset=9"):
        ExportConfig(opset=9)


@pytest.mark.parametrize("name", ["yolov4-tiny", "yolo-fastest-1.1"])
def test_real_models_match_onnxruntime_on_a_real_image(assets, name, tmp_path):
    w = assets / "weights"
    model = load(w / f"{name}.cfg", w / f"{name}.weights")
    hw = (model.cfg.height, model.cfg.width)
    image = _real_image(assets, hw)
    result = export_onnx(model, tmp_path / "m.onnx", ExportConfig(dynamic_batch=True, check=True),
                         check_inputs=[image])
    assert result.parity.inputs == 2
    assert result.parity.max_box_diff / max(hw) <= BOX_RTOL and result.parity.max_score_diff <= SCORE_ATOL
    _assert_parity(model, tmp_path / "m.onnx", torch.cat([image, image.flip(-1)]))
    with torch.no_grad():  # the real image yields confident detections, so parity covers real boxes
        assert model(image)[..., 4].max() > 0.5


def test_cli_export_report(tmp_path):
    from compress.cli import cli
    cfg = DATA / "tiny-attn.cfg"
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["export", "--cfg", str(cfg), "--out", str(out), "--check", "--opset", "13",
                                   "--report", str(report)])
    assert res.exit_code == 0, res.output
    figures = json.loads(report.read_text())
    assert figures["onnx"] == str(out) and figures["opset"] == 13
    assert figures["size_mb"] == pytest.approx(out.stat().st_size / 1e6, abs=1e-4)
    assert 0 <= figures["max_abs_diff"] < 1e-3
    res = CliRunner().invoke(cli, ["export", "--cfg", str(cfg), "--out", str(cfg)])
    assert res.exit_code != 0 and cfg.read_text().startswith(("[", "#"))
