"""QDQ ONNX export: onnxruntime runs it with int8 kernels and agrees with the fake-quant model."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from compress.darknet.cfg import read_cfg
from compress.darknet.model import build_model
from compress.quant import DorefaConfig, GoogleConfig, QConvBNAct, calibrate, prepare_qat, to_darknet
from compress.quant.export import write_int_weights, write_quant_json
from compress.quant.onnx_qdq import OnnxPredictor, _RawHeads, export_qdq_onnx, exportable, optimized_op_counts
from conftest import DATA, randomize_bn

import onnx
import onnxruntime  # noqa: F401

CFG = DATA / "tiny-v4-groups.cfg"  # yolov4-tiny in miniature


def _prepared(config, cfg=CFG):
    model = randomize_bn(build_model(read_cfg(cfg))).eval()
    q = prepare_qat(model, config)
    calibrate(q, [torch.rand(4, 3, 64, 64) for _ in range(2)])
    return q


def _head_step(q) -> float:
    """Output change caused by one code of the head convs' quantized input (the finest output 'step')."""
    heads = {p for h in q.graph.heads for p in q.graph.inputs[h]}
    return max(float(q.layers[h].input_qparams().scale * q.layers[h].folded().weight.abs().max()) for h in heads)


# Default reduced-range weights (|code| <= 63) keep onnxruntime's fused u8/s8 x s8 kernels exact on x86 CPUs
# without VNNI (full-range int8 weights saturate their int16 pair sums there, 10+ output steps off); so do
# pair-safe weights (|code| <= 127, each channel's two largest |codes| summing to <= 128).
CONFIGS = [GoogleConfig(), DorefaConfig(w_bits=4, a_bits=4), GoogleConfig(pow2=True),
           GoogleConfig(act_scheme="symmetric"), GoogleConfig(safe_range="pair")]


@pytest.mark.parametrize("config", CONFIGS, ids=["google8", "dorefa4", "google8-pow2", "google8-s8",
                                                         "google8-pair"])
def test_qdq_onnx_matches_fake_quant_within_a_step(tmp_path, config):
    q = _prepared(config)
    path = tmp_path / "raw.onnx"
    export_qdq_onnx(q, path, (64, 64), raw=True)
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        torch_out = _RawHeads(q)(x).numpy()
        frozen = _RawHeads(exportable(q))(x).numpy()
    np.testing.assert_allclose(frozen, torch_out, atol=1e-5, rtol=0)  # the export view is the same model
    ort_out = OnnxPredictor(path)(x).numpy()
    step = _head_step(q)
    diff = np.abs(ort_out - torch_out)
    # pow2 scales make exact .5 ties common; onnxruntime's integer kernels break some of them the other way
    share = 0.97 if config.pow2 else 0.99
    assert (diff <= step + 1e-6).mean() >= share, f"max {diff.max() / step:.2f} steps"
    assert diff.max() <= 4 * step


def test_decoded_qdq_model_runs_int8_kernels(tmp_path):
    q = _prepared(GoogleConfig())
    path = tmp_path / "model-int8.onnx"
    export_qdq_onnx(q, path, (64, 64))
    graph = onnx.load(str(path)).graph
    ops = Counter(n.op_type for n in graph.node)
    n_convs = sum(isinstance(m, QConvBNAct) for m in q.layers)
    assert ops["Conv"] == n_convs and ops["QuantizeLinear"] > 0
    int8_weights = [n for n in graph.node if n.op_type == "Constant"
                    and n.attribute[0].t.data_type == onnx.TensorProto.INT8 and len(n.attribute[0].t.dims) == 4]
    assert len(int8_weights) == n_convs  # weights stored as int8 codes, DQ only
    fused = optimized_op_counts(path, tmp_path / "opt.onnx")
    assert fused.get("QLinearConv", 0) >= n_convs - 2  # the head convs keep float outputs
    assert fused.get("QLinearLeakyRelu", 0) > 0
    x = torch.rand(2, 3, 64, 64)
    out = OnnxPredictor(path)(x)
    with torch.no_grad():
        ref = q(x)
    assert out.shape == ref.shape
    assert (out[..., 4:] - ref[..., 4:]).abs().max() < 0.05  # scores (sigmoid) agree


def test_dorefa_4bit_export_is_qcdq(tmp_path):
    q = _prepared(DorefaConfig(w_bits=4, a_bits=4))
    path = tmp_path / "d4.onnx"
    export_qdq_onnx(q, path, (64, 64))
    graph = onnx.load(str(path)).graph
    assert any(n.op_type == "Clip" for n in graph.node)  # Q -> Clip(0, 15) -> DQ for 4-bit activations
    inner = [m for m in q.layers if isinstance(m, QConvBNAct) and m.spec.w_scheme == "dorefa"]
    assert inner
    for m in inner:
        assert m.folded().codes.abs().max() <= 15


def test_quant_json_and_int_codes_reproduce_darknet_weights(tmp_path):
    q = _prepared(GoogleConfig(pow2=True))
    write_quant_json(q, tmp_path / "quant.json")
    write_int_weights(q, tmp_path / "weights_int.npz")
    doc = json.loads((tmp_path / "quant.json").read_text())
    npz = np.load(tmp_path / "weights_int.npz")
    dk = to_darknet(q)
    convs = [r for r in doc["layers"] if r["type"] == "convolutional"]
    assert len(convs) == sum(isinstance(m, QConvBNAct) for m in q.layers)
    for row in convs:
        i = row["layer"]
        codes, scale = npz[f"layer{i}.codes"], npz[f"layer{i}.scale"]
        assert codes.dtype == np.int8 and np.abs(codes).max() <= 127
        assert np.allclose(2.0 ** -np.array(row["weight"]["exponent"]), scale)  # pow2 exponents
        w = dk.layers[i].conv.weight.detach().numpy()
        np.testing.assert_allclose(codes * scale[:, None, None, None], w, rtol=0, atol=1e-7)
        np.testing.assert_allclose(npz[f"layer{i}.bias"], dk.layers[i].conv.bias.detach().numpy())
        if row["output"] is not None:
            out = row["output"]
            assert out["qmin"] == 0 and out["qmax"] == 255 and float(out["zero_point"]).is_integer()
            assert 2.0 ** -out["exponent"] == pytest.approx(out["scale"])
