"""load_predictor: runtime by extension, clear errors, any batch size, input size for eval."""
from __future__ import annotations

import pytest
import torch

from compress.base.errors import ExportError
from compress.deploy.export import ExportConfig, export
from compress.deploy.onnx_io import OnnxPredictor, session, torch_to_onnx
from compress.darknet.persist import EXPORTED_SUFFIXES, load
from compress.deploy.runtimes import RUNTIMES, inference_size, is_exported, load_for_inference, load_predictor

from conftest import DATA, randomize_bn

import onnxruntime  # noqa: F401


@pytest.fixture(scope="module")
def tiny():
    return randomize_bn(load(DATA / "tiny-shortcut.cfg")).eval()


def test_fixed_batch_graph_runs_any_batch_and_matches_torch(tiny, tmp_path):
    path = tmp_path / "m.onnx"
    export(tiny, path, ExportConfig())  # batch fixed at 1
    predictor = load_predictor(path)
    assert predictor.fixed_batch == 1 and predictor.img_hw == (tiny.cfg.height, tiny.cfg.width)
    x = torch.rand(3, 3, tiny.cfg.height, tiny.cfg.width)
    with torch.no_grad():
        ref = tiny(x)
    assert torch.allclose(predictor(x), ref, atol=1e-3, rtol=1e-4)


def test_onnx_io_bytes_sessions_and_optimization_levels(tiny):
    x = torch.rand(1, 3, tiny.cfg.height, tiny.cfg.width)
    data = torch_to_onnx(tiny, x, 13)
    with torch.no_grad():
        ref = tiny(x).numpy()
    for level in ("disable", "all"):
        got = session(data, optimization=level).run(None, {"images": x.numpy()})[0]
        assert abs(got - ref).max() < 1e-3
    with pytest.raises(ExportError, match="optimization"):
        session(data, optimization="max")
    with pytest.raises(ExportError, match="onnxruntime cannot load"):
        session(b"not onnx")


def test_load_predictor_errors(tmp_path):
    with pytest.raises(ExportError, match="unknown model format"):
        load_predictor(tmp_path / "m.tflite")
    with pytest.raises(ExportError, match="no such file"):
        load_predictor(tmp_path / "m.xml")
    (tmp_path / "m.param").write_text("7767517\n1 1\nInput in0 0 1 in0\n")
    with pytest.raises(ExportError, match="m.bin"):
        load_predictor(tmp_path / "m.param")
    assert is_exported("a/b.ONNX") and is_exported("m.param") and not is_exported("m.weights")
    assert not is_exported(None)
    assert set(RUNTIMES) == set(EXPORTED_SUFFIXES)  # persist refuses exactly the files a runtime runs


def test_eval_helpers_refuse_nms_graphs_and_size_mismatch(tiny, tmp_path):
    from compress.deploy.onnx_nms import NmsConfig

    path = tmp_path / "e2e.onnx"
    export(tiny, path, ExportConfig(nms=NmsConfig()))
    with pytest.raises(ExportError, match="without --nms"):
        load_for_inference(DATA / "tiny-shortcut.cfg", path)
    fixed = OnnxPredictor(export(tiny, tmp_path / "m.onnx", ExportConfig()).path)
    size = tiny.cfg.width
    assert inference_size(fixed, None) == size == inference_size(fixed, None, size)
    with pytest.raises(ExportError, match="--img-size"):
        inference_size(fixed, None, 2 * size)
    dyn = OnnxPredictor(export(tiny, tmp_path / "d.onnx", ExportConfig(dynamic=True)).path)
    assert dyn.img_hw is None
    assert inference_size(dyn, DATA / "tiny-shortcut.cfg") == size
    assert inference_size(dyn, None, 2 * size) == 2 * size
    with pytest.raises(ExportError, match="--img-size or --cfg"):
        inference_size(dyn, None)
    assert inference_size(tiny, None) == size
