"""ONNX plumbing in one place: torch -> ONNX bytes, onnxruntime sessions, a predictor and a latency probe.

Every exporter (float `export`, int8 QDQ `quant.onnx_qdq`, end-to-end NMS graphs) and every runtime check goes
through here, so the exporter choice, the silenced tracer notes and the session options are decided once.

torch 2.13 offers two exporters. The torch.export-based one (`dynamo=True`, the default) needs the `onnxscript`
package, which is not a dependency; the TorchScript-based one (`dynamo=False`) works with plain torch and supports
every Darknet layer here. It emits a deprecation notice and tracer notes about the decode's constants; those are
expected and logged at debug level instead of shown.
"""
from __future__ import annotations

import io
import logging
import os
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from compress.base.errors import ExportError

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "OPTIMIZATION_LEVELS", "torch_to_onnx", "session", "OnnxPredictor", "as_numpy",
           "onnx_latency", "median_ms", "input_hw", "simplify", "fp16_graph", "set_metadata"]

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "images", "output"
# onnxruntime graph optimisation levels by name ("disable" is what int8 QDQ graphs need on AVX2 CPUs without
# VNNI, where the fused u8s8 kernels saturate; see issue 11).
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


def torch_to_onnx(model: nn.Module, example: torch.Tensor | tuple, opset: int = 17,
                  input_names: Sequence[str] = (INPUT_NAME,), output_names: Sequence[str] = (OUTPUT_NAME,),
                  dynamic_axes: Mapping[str, Mapping[int, str]] | None = None, what: str = "model") -> bytes:
    """Trace `model` on `example` with the TorchScript exporter and return the ONNX file's bytes.

    Raises:
        ExportError: naming `what` (e.g. the cfg path) and the exporter's first message line.
    """
    args = example if isinstance(example, tuple) else (example,)
    buf = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        try:
            torch.onnx.export(model, args, buf, dynamo=False, opset_version=opset, input_names=list(input_names),
                              output_names=list(output_names), dynamic_axes=dict(dynamic_axes or {}) or None,
                              do_constant_folding=True)
        except Exception as exc:  # the exporter raises many types; name the model so the user knows which failed
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise ExportError(f"{what}: ONNX export failed ({exc.__class__.__name__}: {first}); "
                              f"try another --opset") from exc
    for w in caught:
        log.debug("torch.onnx: %s", str(w.message).splitlines()[0] if str(w.message) else "")
    return buf.getvalue()


def _ort():  # type: ignore[no-untyped-def]
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("onnxruntime is not installed; pip install onnxruntime") from None
    return ort


def session(path: str | os.PathLike | bytes, threads: int = 1, optimized_path: str | os.PathLike | None = None,
            optimization: str = "all"):  # type: ignore[no-untyped-def]
    """A CPU onnxruntime InferenceSession: `threads` intra-op threads, one inter-op thread, warnings only.

    `optimization` is one of OPTIMIZATION_LEVELS; `optimized_path` makes onnxruntime write the graph it actually
    runs (after its fusions) there. `path` may also be the model's bytes.
    """
    if optimization not in OPTIMIZATION_LEVELS:
        raise ExportError(f"optimization={optimization!r}: use one of {', '.join(OPTIMIZATION_LEVELS)}")
    ort = _ort()
    level = ort.GraphOptimizationLevel
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = {"disable": level.ORT_DISABLE_ALL, "basic": level.ORT_ENABLE_BASIC,
                                     "extended": level.ORT_ENABLE_EXTENDED, "all": level.ORT_ENABLE_ALL}[optimization]
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    opts.log_severity_level = 3
    model = path if isinstance(path, bytes) else str(path)
    try:
        return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        name = "<bytes>" if isinstance(path, bytes) else path
        raise ExportError(f"{name}: onnxruntime cannot load it ({str(exc).splitlines()[0]}); "
                          f"is it an ONNX file written by `export` or `quantize`?") from exc


def input_hw(shape: Sequence[Any]) -> tuple[int, int] | None:
    """(H, W) of an (N, 3, H, W) input shape when both are fixed numbers, else None (dynamic axes)."""
    h, w = shape[-2], shape[-1]
    return (int(h), int(w)) if isinstance(h, (int, np.integer)) and isinstance(w, (int, np.integer)) else None


def as_numpy(imgs: "torch.Tensor | np.ndarray") -> np.ndarray:
    """A predictor's input as a contiguous float32 (N,3,H,W) array: a torch tensor (any device) or a numpy
    array (what OpenCV/PIL users hold; issue #26: numpy input used to fail on `.detach`)."""
    if isinstance(imgs, torch.Tensor):
        imgs = imgs.detach().cpu().float().numpy()
    x = np.ascontiguousarray(imgs, dtype=np.float32)
    if x.ndim == 3:  # one (3,H,W) image
        x = x[None]
    if x.ndim != 4:
        raise ExportError(f"predictor input has shape {x.shape}; expected (N, 3, H, W) floats in [0, 1]")
    return x


class OnnxPredictor:
    """Callable (N,3,H,W) float tensor in [0,1] -> the model's first output as a tensor (e.g. decoded
    (N, boxes, 5+C)), for `compress.detection.evaluate.evaluate`. A graph exported with a fixed batch of 1 is run image
    by image, so any batch size works."""

    def __init__(self, path: str | os.PathLike, threads: int = 1, optimization: str = "all") -> None:
        self.path = path
        self.session = session(path, threads, optimization=optimization)
        first = self.session.get_inputs()[0]
        self.input = first.name
        self.img_hw = input_hw(first.shape)
        self.fixed_batch = first.shape[0] if isinstance(first.shape[0], int) else None
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, imgs: "torch.Tensor | np.ndarray") -> list[np.ndarray]:
        """Every output of the graph for `imgs` (numpy arrays, batch concatenated)."""
        x = as_numpy(imgs)
        if self.fixed_batch is None or self.fixed_batch == len(x):
            return self.session.run(None, {self.input: x})
        parts = [self.session.run(None, {self.input: x[i:i + 1]}) for i in range(len(x))]
        return [np.concatenate(outs) for outs in zip(*parts)]

    def __call__(self, imgs: "torch.Tensor | np.ndarray") -> torch.Tensor:
        return torch.from_numpy(self.run(imgs)[0])


def median_ms(fn: Callable[[], Any], runs: int = 20, warmup: int = 3) -> float:
    """Median wall time of `fn()` in ms over `runs` calls after `warmup` untimed ones."""
    times = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def onnx_latency(path: str | os.PathLike, img_size: tuple[int, int], runs: int = 20, warmup: int = 3,
                 threads: int = 1, optimization: str = "all") -> float:
    """Median ms per batch-1 run with onnxruntime on CPU."""
    sess = session(path, threads, optimization=optimization)
    x = {sess.get_inputs()[0].name: np.random.default_rng(0).random((1, 3, *img_size), dtype=np.float32)}
    return median_ms(lambda: sess.run(None, x), runs, warmup)


def simplify(model: bytes, what: str = "model") -> bytes:
    """onnxslim's graph simplification (constant folding, dead-node and redundant-reshape removal)."""
    try:
        import onnx
        import onnxslim
    except ImportError:
        raise ExportError("--simplify needs onnxslim; pip install onnxslim") from None
    try:
        return onnxslim.slim(onnx.load_from_string(model)).SerializeToString()
    except Exception as exc:  # onnxslim raises whatever its passes raise
        raise ExportError(f"{what}: onnxslim failed ({exc.__class__.__name__}: {exc}); export without "
                          f"--simplify") from exc


def fp16_graph(model: bytes, keep_fp32: Callable[[str], bool] = lambda name: False) -> bytes:
    """A float16 graph: float16 initializers and activations, float32 inputs and outputs (a Cast at each end),
    nodes for which `keep_fp32(node name)` holds (and ops without float16 kernels: NonMaxSuppression, TopK,
    Range, ...) left in float32 behind Casts.

    The converter is onnxruntime's copy of onnxconverter-common's (`onnxruntime.transformers.float16`), so no
    extra dependency. onnxruntime's CPU provider runs the result (x86 CPUs have no fast float16 arithmetic: it
    is slower there than float32); it is meant for GPUs (CUDA/TensorRT/DirectML) and ARM.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m = onnx.load_from_string(model)
    blocked = [n.name for n in m.graph.node if keep_fp32(n.name)]
    with warnings.catch_warnings(record=True) as caught:  # "values clamped to the float16 range" notes
        warnings.simplefilter("always")
        half = convert_float_to_float16(m, keep_io_types=True, node_block_list=blocked)
    for w in caught:
        log.debug("float16 conversion: %s", w.message)
    return half.SerializeToString()


def set_metadata(model: bytes, values: Mapping[str, Any]) -> bytes:
    """Add `values` (JSON-encoded) as ONNX metadata_props, e.g. the source cfg, classes and input size."""
    import json

    import onnx

    m = onnx.load_from_string(model)
    for key, value in values.items():
        m.metadata_props.add(key=key, value=json.dumps(value))
    return m.SerializeToString()
