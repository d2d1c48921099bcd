"""`export --half` to ONNX: a float16 graph (float16 weights and activations through the conv layers, float32
input, output and YOLO decode), run by onnxruntime's CPU provider and compared with the torch model; a broken
float16 artifact fails the export's check."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from compress.base.errors import ExportError
from compress.deploy.export import (ExportConfig, NmsConfig, ParityResult, _enforce_tolerance, _worst, check_export,
                             export)
from compress.darknet.persist import load
from compress.deploy.runtimes import load_predictor

from conftest import DATA, randomize_bn, require_assets

SIZE = 320


@pytest.fixture(scope="module")
def fastest():
    w = require_assets() / "weights"
    return load(w / "yolo-fastest-1.1.cfg", w / "yolo-fastest-1.1.weights").eval()


def _types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every initializer and typed value (after ONNX shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {**{v.name: v.type.tensor_type.elem_type for v in values},
            **{i.name: i.data_type for i in model.graph.initializer}}


def test_half_onnx_is_a_float16_graph(fastest, tmp_path):
    result = export(fastest, tmp_path / "m.onnx", ExportConfig(half=True, check=True))
    model = onnx.load(result.path)
    types = _types(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    heads = {i for i, s in enumerate(fastest.graph.sections) if s.head}
    assert len(convs) == sum(1 for b in fastest.cfg.blocks if b.type == "convolutional")
    for conv in convs:  # weights, inputs and outputs of every conv in float16
        assert {types[conv.input[1]], types[conv.input[0]], types[conv.output[0]]} == {TensorProto.FLOAT16}, conv.name
    decode = [n for n in model.graph.node if n.op_type == "Exp"]
    assert decode and all(types[n.output[0]] == TensorProto.FLOAT for n in decode)  # the decode stays float32
    assert all(any(f"/layers.{i}/" in n.name for i in heads) for n in decode)
    io = [*model.graph.input, *model.graph.output]
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in io)
    assert result.parity.max_box_diff <= 3.0 and result.parity.max_score_diff <= 0.05
    assert 0 < result.parity.fp16_box_diff <= 3.0 and 0 < result.parity.fp16_score_diff <= 0.05


def test_half_onnx_matches_torch_on_real_images(fastest, tmp_path):
    """onnxruntime (CPU, float16 kernels) vs torch float32 on real images: the measured float16 deviation."""
    samples = require_assets() / "data" / "samples"
    images = tuple(str(samples / n) for n in ("dog.jpg", "horses.jpg", "person.jpg"))
    result = export(fastest, tmp_path / "m.onnx", ExportConfig(half=True, check=True, check_images=images))
    assert result.parity.inputs == 4
    assert 1e-3 < result.parity.max_box_diff <= 3.0  # float16 moves boxes (not a float32 graph in disguise)
    assert 1e-4 < result.parity.max_score_diff <= 0.05


def test_half_nms_graph_matches_torch_detections(fastest, tmp_path):
    samples = require_assets() / "data" / "samples"
    result = export(fastest, tmp_path / "e2e.onnx", ExportConfig(half=True, check=True, nms=NmsConfig(),
                                                                 check_images=(str(samples / "dog.jpg"),)))
    assert result.parity.detections > 0 and result.parity.unmatched == 0
    assert result.parity.max_box_diff <= 3.0


def _overflowing_model():
    """A model whose float32 output is ordinary but whose hidden activations exceed float16's 65504."""
    model = randomize_bn(load(DATA / "tiny-v4-groups.cfg"), 0).eval()
    layers = [m for m in model.layers if getattr(m, "bn", None) is not None]
    with torch.no_grad():
        layers[0].bn.weight.fill_(1.0)
        layers[0].bn.running_var.fill_(1.0)
        layers[0].conv.weight.fill_(3e4)   # each folded weight < 65504, but their sums reach ~4e5: float16 inf
        layers[1].conv.weight.mul_(1e-5)   # float32 comes back to ordinary values here
    return model


def test_float16_overflow_fails_the_check(tmp_path):
    """onnxruntime's x86 kernels run the float16 graph's convolutions in float32, so the runtime comparison
    passes; the float16-arithmetic comparison (what a GPU computes) catches the overflow."""
    model = _overflowing_model()
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(1, 3, 64, 64))).all()
    with pytest.raises(ExportError, match="in float16 arithmetic.*inf/NaN"):
        export(model, tmp_path / "m.onnx", ExportConfig(img_size=64, half=True, check=True))
    assert (tmp_path / "m.onnx").is_file()  # written, but the command fails


def test_corrupted_half_artifact_fails_the_check(fastest, tmp_path):
    """A float16 file whose weights are not the model's (one conv scaled) fails the runtime comparison."""
    path = export(fastest, tmp_path / "m.onnx", ExportConfig(half=True)).path
    model = onnx.load(path)
    weight = next(i for i in model.graph.initializer if i.data_type == TensorProto.FLOAT16 and len(i.dims) == 4)
    array = onnx.numpy_helper.to_array(weight) * np.float16(1.5)
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    onnx.save(model, path)
    parity = check_export(fastest, path, img_size=(SIZE, SIZE))
    assert parity.max_box_diff > 3.0 or parity.max_score_diff > 0.05


def test_nan_difference_is_a_failure(tmp_path):
    nan = ParityResult(float("nan"), float("nan"), 0.0, 1)
    with pytest.raises(ExportError, match="differs from torch"):
        _enforce_tolerance(nan, ExportConfig(), tmp_path / "m.onnx")
    assert _worst(0.5, float("nan")) == float("inf")
