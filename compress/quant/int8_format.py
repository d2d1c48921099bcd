"""The `int8` format of `benchmark`: post-training int8 (per-channel weights, calibrated activations) as a QDQ
ONNX graph run by onnxruntime, the same exporter `quantize` uses. Registered into `deploy.benchmark.FORMATS`
from here because quantization sits above deploy/."""
from __future__ import annotations

from pathlib import Path

from compress.darknet.model import DarknetModel
from compress.deploy.benchmark import Artifact, BuildContext, register_format
from compress.deploy.runtimes import load_predictor
from compress.quant.config import GoogleConfig
from compress.quant.onnx_qdq import export_qdq_onnx
from compress.quant.prepare import calibrate, prepare_qat

__all__ = ["int8_artifact"]


@register_format("int8")
def int8_artifact(model: DarknetModel, folder: Path, ctx: BuildContext) -> Artifact:
    """Calibrate a fake-quant copy of `model` on the context's batches, export QDQ ONNX, load it in onnxruntime."""
    qmodel = prepare_qat(model, GoogleConfig())
    calibrate(qmodel, ctx.calibration())
    path = folder / "model-int8.onnx"
    export_qdq_onnx(qmodel, path, (ctx.img_size, ctx.img_size))
    return Artifact(load_predictor(path, threads=ctx.threads), (path,))
