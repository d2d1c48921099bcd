"""onnxruntime predictor for exported .onnx files (float, fp16-weight, end-to-end NMS or int8 QDQ graphs)."""
from __future__ import annotations

import os

from compress.deploy.onnx_io import OnnxPredictor

__all__ = ["OrtPredictor"]


class OrtPredictor(OnnxPredictor):
    """`OnnxPredictor` with the loader signature of the other runtimes (`optimization`: see onnx_io)."""

    def __init__(self, path: str | os.PathLike, threads: int = 1, optimization: str = "all") -> None:
        super().__init__(path, threads, optimization)
