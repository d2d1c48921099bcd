"""OpenVINO (CPU plugin): convert an exported ONNX graph to IR (.xml + .bin) and run it.

Inference is pinned to f32 (`INFERENCE_PRECISION_HINT`): on CPUs with bf16/fp16 units OpenVINO would otherwise
lower the precision by itself and the parity check would measure that instead of the conversion. int8 QDQ
graphs from `quantize` still run their convolutions in int8 (OpenVINO's low-precision transformations).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from compress.base.errors import ExportError
from compress.deploy.onnx_io import as_numpy
from compress.deploy.runtimes.predictor import run_per_image

__all__ = ["OpenVinoPredictor", "to_openvino"]


def to_openvino(onnx_model: bytes | str | os.PathLike, xml_path: str | os.PathLike, half: bool = False) -> Path:
    """Convert an ONNX model (bytes or file) to `xml_path` + its .bin; `half` stores the weights in fp16."""
    import openvino as ov  # optional extra (pip install openvino): only this export needs it

    src = onnx_model if isinstance(onnx_model, (str, os.PathLike)) else _as_file(onnx_model, Path(xml_path))
    try:
        model = ov.convert_model(str(src))
        ov.save_model(model, str(xml_path), compress_to_fp16=half)
    except Exception as exc:  # OpenVINO raises its own GeneralFailure / OpConversionFailure
        raise ExportError(f"{xml_path}: OpenVINO conversion failed ({str(exc).splitlines()[0]})") from exc
    finally:
        if src is not onnx_model:
            Path(src).unlink(missing_ok=True)
    return Path(xml_path)


def _as_file(data: bytes, near: Path) -> Path:
    tmp = near.with_name(f".{near.stem}.tmp.onnx")
    tmp.write_bytes(data)
    return tmp


class OpenVinoPredictor:
    """Callable (N,3,H,W) float tensor in [0,1] -> first output as a tensor, on OpenVINO's CPU plugin."""

    def __init__(self, path: str | os.PathLike, threads: int = 1) -> None:
        import openvino as ov  # optional extra: imported only when an .xml model is loaded

        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": max(1, int(threads)), "INFERENCE_PRECISION_HINT": "f32",
                  "PERFORMANCE_HINT": "LATENCY"}
        try:
            self.compiled = core.compile_model(str(path), "CPU", config)
        except Exception as exc:
            raise ExportError(f"{path}: OpenVINO cannot load it ({str(exc).splitlines()[0]}); "
                              f"is its .bin beside it?") from exc
        self.request = self.compiled.create_infer_request()
        shape = self.compiled.inputs[0].get_partial_shape()
        dims = [d.get_length() if d.is_static else None for d in shape]
        self.img_hw = (dims[2], dims[3]) if dims[2] and dims[3] else None
        self.fixed_batch = dims[0]
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]

    def _infer(self, x: np.ndarray) -> list[np.ndarray]:
        result = self.request.infer({0: x})
        return [np.array(result[o]) for o in self.compiled.outputs]

    def run(self, imgs: torch.Tensor) -> list[np.ndarray]:
        if self.fixed_batch is None or self.fixed_batch == len(imgs):
            return self._infer(as_numpy(imgs))
        return run_per_image(self._infer, imgs)

    def __call__(self, imgs: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(imgs)[0])
