"""ONNX export of the decoded (eval-mode) model, and an onnxruntime parity check.

The exported graph maps `images` (N, 3, H, W) float RGB in [0, 1] to `output` (N, boxes, 5 + C): cx, cy, w, h in
input pixels, sigmoid objectness, sigmoid class scores -- exactly what `model.eval()(x)` returns, so the same NMS
and `evaluate()` code runs on either.

torch 2.13 offers two exporters. The torch.export-based one (`dynamo=True`, the default) needs the `onnxscript`
package, which is not a dependency; the TorchScript-based one (`dynamo=False`) works with plain torch and supports
every Darknet layer here (replicate-padded maxpool, grouped route, SE/CBAM/ECA, yolo decode). It emits a
deprecation notice and tracer notes about the decode's spatial constants (the input H, W are fixed at export;
only the batch axis can be dynamic); those are expected and logged at debug level instead of shown.
"""
from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import ExportError
from .fileio import write_bytes_atomic
from .model import DarknetModel

__all__ = ["ExportConfig", "ExportResult", "ParityResult", "export_onnx", "check_onnx", "onnx_session"]

log = logging.getLogger(__name__)

SUPPORTED_OPSETS = range(11, 21)
INPUT_NAME, OUTPUT_NAME = "images", "output"


@dataclass(frozen=True)
class ExportConfig:
    """What to export. `img_size` None = the cfg's width/height; `check` runs `check_onnx` after writing.

    `tolerance`: largest accepted onnxruntime-vs-torch difference, relative (box columns are divided by the
    input size, score columns are compared as they are). Exceeding it raises ExportError.
    """

    img_size: int | None = None
    dynamic_batch: bool = False
    opset: int = 17
    check: bool = False
    tolerance: float = 1e-4

    def __post_init__(self) -> None:
        if self.opset not in SUPPORTED_OPSETS:
            raise ExportError(f"opset={self.opset} is not supported; use one of {SUPPORTED_OPSETS.start}.."
                              f"{SUPPORTED_OPSETS.stop - 1} (13 and 17 are tested)")
        if self.img_size is not None and self.img_size < 32:
            raise ExportError(f"img_size={self.img_size} is too small; use at least 32")
        if self.tolerance <= 0:
            raise ExportError(f"tolerance={self.tolerance} must be > 0")


@dataclass(frozen=True)
class ParityResult:
    """onnxruntime vs torch on the same inputs (worst case over all inputs)."""

    max_abs_diff: float      # over every output column, in the output's own units (box columns in pixels)
    max_box_diff: float      # cx, cy, w, h columns, pixels
    max_score_diff: float    # objectness and class scores
    inputs: int

    def to_dict(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "max_box_diff": self.max_box_diff,
                "max_score_diff": self.max_score_diff, "check_inputs": self.inputs}


@dataclass(frozen=True)
class ExportResult:
    path: Path
    opset: int
    img_size: tuple[int, int]
    dynamic_batch: bool
    size_mb: float
    parity: ParityResult | None = None
    letterbox: bool = False    # input geometry the model expects (cfg [net] letter_box; False: plain resize)

    def to_dict(self) -> dict:
        out = {"onnx": str(self.path), "opset": self.opset, "img_size": list(self.img_size),
               "dynamic_batch": self.dynamic_batch, "size_mb": round(self.size_mb, 4),
               "letterbox": self.letterbox}
        return {**out, **(self.parity.to_dict() if self.parity else {})}


def export_onnx(model: DarknetModel, path: str | os.PathLike, config: ExportConfig = ExportConfig(),
                check_inputs: Sequence[torch.Tensor] = ()) -> ExportResult:
    """Write `model` (decoded eval-mode output) as ONNX to `path`, atomically.

    Example:
        >>> export_onnx(compress.load("yolov4-tiny.cfg", "yolov4-tiny.weights"), "v4t.onnx",
        ...             ExportConfig(dynamic_batch=True, check=True))
    Raises:
        ExportError: the size is not a multiple of the model stride, tracing failed, or the check failed.
    """
    path = Path(path)
    hw = _input_hw(model, config.img_size)
    data = _trace_to_bytes(model.cpu().eval(), hw, config)
    write_bytes_atomic(path, data)
    log.info("ONNX (opset %d, %dx%d%s) -> %s", config.opset, hw[1], hw[0],
             ", dynamic batch" if config.dynamic_batch else "", path)
    parity = None
    if config.check:
        parity = check_onnx(model, path, check_inputs, img_size=hw)
        _enforce_tolerance(parity, hw, config.tolerance, path)
    from .imageio import cfg_letterbox
    return ExportResult(path, config.opset, hw, config.dynamic_batch, len(data) / 1e6, parity,
                        letterbox=bool(cfg_letterbox(model)))


def _input_hw(model: DarknetModel, img_size: int | None) -> tuple[int, int]:
    hw = (img_size, img_size) if img_size else (model.cfg.height, model.cfg.width)
    stride = model.stride
    if hw[0] % stride or hw[1] % stride:
        raise ExportError(f"--img-size {hw[1]}x{hw[0]} is not a multiple of the model stride {stride}; "
                          f"use e.g. {max(stride, round(hw[0] / stride) * stride)}")
    return hw


def _trace_to_bytes(model: DarknetModel, hw: tuple[int, int], config: ExportConfig) -> bytes:
    dummy = torch.rand(1, 3, *hw)
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if config.dynamic_batch else None
    buf = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        try:
            torch.onnx.export(model, (dummy,), buf, dynamo=False, opset_version=config.opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes,
                              do_constant_folding=True)
        except Exception as exc:  # torch raises many types; name the cfg so the user knows which model failed
            raise ExportError(f"{model.cfg.path}: ONNX export failed ({exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); try another --opset") from exc
    for w in caught:
        log.debug("torch.onnx: %s", str(w.message).splitlines()[0])
    return buf.getvalue()


def onnx_session(path: str | os.PathLike):
    """A CPU onnxruntime session (single-threaded intra-op, like the torch side of the check)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("onnxruntime is not installed; pip install onnxruntime (or drop --check)") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def check_onnx(model: DarknetModel, path: str | os.PathLike, inputs: Sequence[torch.Tensor] = (),
               img_size: tuple[int, int] | None = None, seed: int = 0) -> ParityResult:
    """Run the ONNX file in onnxruntime and the torch model on the same inputs; report the largest differences.

    `inputs` are extra (N, 3, H, W) tensors in [0, 1] (e.g. real letterboxed images); a seeded random image is
    always checked too.
    """
    hw = img_size or (model.cfg.height, model.cfg.width)
    gen = torch.Generator().manual_seed(seed)
    batch = [torch.rand(1, 3, *hw, generator=gen), *inputs]
    session = onnx_session(path)
    model = model.cpu().eval()
    expected = session.get_inputs()[0].shape  # ints for fixed axes, names for dynamic ones
    box, score = 0.0, 0.0
    for x in batch:
        if any(isinstance(e, int) and e != d for e, d in zip(expected, x.shape)):
            raise ExportError(f"{path}: expects input {expected}, got {tuple(x.shape)}; re-export with "
                              f"--dynamic-batch or the matching --img-size")
        ref = model(x.float()).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.float().numpy()})[0]
        diff = np.abs(got.astype(np.float64) - ref)
        box, score = max(box, float(diff[..., :4].max())), max(score, float(diff[..., 4:].max()))
    return ParityResult(max(box, score), box, score, len(batch))


def _enforce_tolerance(parity: ParityResult, hw: tuple[int, int], tol: float, path: Path) -> None:
    rel_box = parity.max_box_diff / max(hw)
    if rel_box > tol or parity.max_score_diff > tol:
        raise ExportError(f"{path}: onnxruntime differs from torch (boxes {parity.max_box_diff:.3g} px, scores "
                          f"{parity.max_score_diff:.3g}) beyond tolerance {tol:g}; try another --opset")
