"""Pick and run the runtime for an exported model: onnxruntime (.onnx), OpenVINO (.xml), ncnn (.param).

`load_predictor(path)` picks the runtime by the file's extension and returns a callable that maps a float
(N, 3, H, W) tensor or numpy array in [0, 1] to the model's eval-mode output (N, boxes, 5 + C), like
`DarknetModel.eval()`, so `compress.detection.evaluate.evaluate` and the export parity checks run on any of
them. The runtime packages are imported only when a file of theirs is loaded (they are optional extras:
`pip install yolo-compress[openvino]`).
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from compress.base.errors import ExportError
from compress.darknet.cfg import read_cfg
from compress.darknet.persist import is_exported, load
from compress.deploy.onnx_io import as_numpy

__all__ = ["Predictor", "RUNTIMES", "load_predictor", "is_exported", "read_metadata", "METADATA_NAME",
           "run_per_image", "load_for_inference", "inference_size"]

METADATA_NAME = "metadata.json"  # written beside OpenVINO / ncnn files: input size, classes, source cfg


class Predictor(Protocol):
    """What every runtime wrapper offers."""

    img_hw: tuple[int, int] | None   # fixed input (H, W), None when the graph takes any size

    def __call__(self, imgs: "torch.Tensor | np.ndarray") -> torch.Tensor: ...

    def run(self, imgs: "torch.Tensor | np.ndarray") -> list[np.ndarray]: ...


# extension -> (module in this package, its loader, the pip package that provides the runtime). The keys are
# darknet.persist's EXPORTED_SUFFIXES (which `load` refuses), kept there because persist sits below deploy/
# (tests/test_runtimes.py holds the two equal).
RUNTIMES: dict[str, tuple[str, str, str]] = {
    ".onnx": ("ort", "OrtPredictor", "onnxruntime"),
    ".xml": ("openvino", "OpenVinoPredictor", "openvino"),
    ".param": ("ncnn", "NcnnPredictor", "ncnn"),
}


def load_predictor(path: str | os.PathLike, threads: int = 1, runtime: str | None = None, **options) -> Predictor:
    """The runtime wrapper for `path`, chosen by its extension (see RUNTIMES); `threads` CPU threads.

    `runtime="openvino"` runs an .onnx file (e.g. the int8 QDQ model from `quantize`) in OpenVINO instead of
    onnxruntime (OpenVINO reads ONNX directly).

    Raises:
        ExportError: unknown extension, missing file or missing runtime package (named with its pip command).
    """
    path = Path(path)
    entry = RUNTIMES.get(path.suffix.lower())
    if runtime is not None:
        entry = next((e for e in RUNTIMES.values() if e[2] == runtime or e[0] == runtime), None)
        if entry is None:
            raise ExportError(f"runtime={runtime!r}: use one of {', '.join(e[2] for e in RUNTIMES.values())}")
    if entry is None:
        raise ExportError(f"{path}: unknown model format {path.suffix!r}; use one of {', '.join(RUNTIMES)}")
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    module, name, package = entry
    try:
        factory = getattr(importlib.import_module(f"{__package__}.{module}"), name)
        return factory(path, threads=threads, **options)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == package:
            raise ExportError(f"{path}: the {package} runtime is not installed; pip install {package}") from None
        raise


def read_metadata(model_path: str | os.PathLike) -> dict:
    """The export's metadata.json beside `model_path` ({} when there is none)."""
    meta = Path(model_path).with_name(METADATA_NAME)
    if not meta.is_file():
        return {}
    try:
        return json.loads(meta.read_text())
    except ValueError as exc:
        raise ExportError(f"{meta}: not valid JSON ({exc}); re-run export") from exc


def run_per_image(fn, imgs: "torch.Tensor | np.ndarray") -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    """Run a batch-1 runtime `fn(np (1,3,H,W)) -> list of arrays` on each image; concatenate per output."""
    x = as_numpy(imgs)
    parts = [fn(np.ascontiguousarray(x[i:i + 1])) for i in range(len(x))]
    return [np.concatenate(outs) for outs in zip(*parts)]


def load_for_inference(cfg: str | os.PathLike | None, weights: str | os.PathLike | None, device: str = "cpu"):
    """The torch model for Darknet .weights / .pt (or none), else the runtime predictor of an exported file
    (CPU, torch's thread count). An end-to-end (--nms) graph is refused: scoring needs the raw output."""
    if not is_exported(weights):
        return load(cfg, weights, device=device)
    predictor = load_predictor(weights, threads=torch.get_num_threads())
    if len(getattr(predictor, "output_names", ())) > 1:
        raise ExportError(f"{weights}: exported with --nms (outputs {', '.join(predictor.output_names)}); "
                          f"eval needs the raw (N, boxes, 5+C) output: export again without --nms")
    return predictor


def inference_size(model, cfg: str | os.PathLike | None, requested: int | None = None) -> int:  # type: ignore
    """Square input size: `requested`, else the exported model's fixed size, else the cfg's width.

    Raises:
        ExportError: `requested` differs from the size the exported model was fixed to.
    """
    fixed = getattr(model, "img_hw", None)
    if fixed and (fixed[0] != fixed[1] or (requested and requested != fixed[0])):
        raise ExportError(f"the exported model takes {fixed[1]}x{fixed[0]} inputs only; drop --img-size or "
                          f"export with --img-size {requested or max(fixed)} (or --dynamic)")
    if requested or fixed:
        return int(requested or fixed[0])
    if hasattr(model, "cfg"):
        return int(model.cfg.width)
    if cfg is None:
        raise ExportError("the exported model takes any input size: give --img-size or --cfg")
    return int(read_cfg(cfg).width)
