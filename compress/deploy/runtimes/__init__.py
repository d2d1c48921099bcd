"""Run an exported model in its own runtime: onnxruntime (.onnx), OpenVINO (.xml), ncnn (.param).

`load_predictor(path)` picks the runtime by the file's extension (see `predictor.py`); the runtime packages are
optional extras, imported only when a file of theirs is loaded.
"""
from __future__ import annotations

from compress.deploy.runtimes.predictor import (METADATA_NAME, RUNTIMES, Predictor, inference_size, is_exported,
                                                load_for_inference, load_predictor, read_metadata, run_per_image)

__all__ = ["Predictor", "RUNTIMES", "load_predictor", "is_exported", "read_metadata", "METADATA_NAME",
           "run_per_image", "load_for_inference", "inference_size"]
