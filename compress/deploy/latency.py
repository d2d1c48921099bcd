"""Latency on a named runtime (onnxruntime, openvino, ncnn, torch): one conv alone, and whole models.

`measure_table` times each conv of a model as a one-layer model at its own input shape, on a small grid of
(input, output) widths the caller chooses (pruning knows which widths can change), and returns a
`LatencyTable`. Each runtime builds its one-layer model its own way: onnxruntime and OpenVINO from an ONNX
graph written here directly (Conv with BN folded into its bias, then the activation's ops: what their graph
optimisers make of the exported conv; tracing took ~0.5 s per grid point, which made tables minutes long;
an activation without a rule here is traced), ncnn from a .param/.bin written here directly (pnnx takes about
a second per conversion; the layer is one `Convolution`/`ConvolutionDepthWise` with its activation fused,
which is what pnnx makes of a Darknet conv), torch from the module itself.
`measure_models` times whole models round-robin (one run of each per round), so that a load change on a shared
machine hits all of them alike; ratios between them are what pruning to a latency target needs.
Every figure is the QUANTILE (a low quantile, 0.25, rather than the median) of the timed runs after a warm-up:
on a shared machine a run is only ever made slower, by preemption, so the low quantile is the steadier
estimate of what the runtime needs; on a quiet machine it is within noise of the median. With one thread the
clock is the process's CPU time (`clock_name`): a one-thread run computes in the calling thread, so its CPU
time is its latency on an idle core, and time spent waiting for a core on a shared machine is not counted
(wall time is used with more threads, where CPU time would add the threads up).
The runtime packages are optional extras, imported only when their runtime is used.
"""
from __future__ import annotations

import importlib
import logging
import os
import struct
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from compress.base.errors import ExportError
from compress.base.latency import clock_name, pinned_threads, quantile_ms
from compress.darknet.model import DarknetModel
from compress.deploy.export import ExportConfig, export
from compress.deploy.latency_table import LatencyTable, LayerTiming, TableKey, machine_id, model_fingerprint
from compress.deploy.onnx_io import session, torch_to_onnx
from compress.deploy.runtimes import load_predictor

__all__ = ["LatencyRuntime", "LATENCY_RUNTIMES", "LayerGrid", "runtime_version", "table_key", "layer_module",
           "measure_table", "measure_models", "quantile_ms", "clock_name", "QUANTILE"]

log = logging.getLogger(__name__)
Timer = Callable[[], object]
QUANTILE = 0.25
WARMUP = 5      # untimed runs first (ncnn and onnxruntime allocate on their first runs)


@dataclass(frozen=True)
class LayerGrid:
    """The widths at which conv `layer` is timed; `tied`: a depthwise conv, whose input width is its output
    width (in_widths then holds the full width only)."""

    in_widths: tuple[int, ...]
    out_widths: tuple[int, ...]
    tied: bool = False


def _act_nodes(act: nn.Module, x: str, y: str) -> list | None:
    """The activation as ONNX nodes from value `x` to `y` (None: no rule here; the layer is then traced)."""
    import onnx.helper as oh  # onnx is a dependency; imported where graphs are built, as in onnx_io

    simple = {nn.ReLU: ("Relu", {}), nn.Sigmoid: ("Sigmoid", {}), nn.Tanh: ("Tanh", {}),
              nn.Hardswish: ("HardSwish", {}), nn.ELU: ("Elu", {}),
              nn.LeakyReLU: ("LeakyRelu", {"alpha": float(getattr(act, "negative_slope", 0.01))})}
    if isinstance(act, nn.Identity):
        return [oh.make_node("Identity", [x], [y])]
    if type(act) in simple:
        op, attrs = simple[type(act)]
        return [oh.make_node(op, [x], [y], **attrs)]
    if isinstance(act, nn.SiLU):
        return [oh.make_node("Sigmoid", [x], ["s"]), oh.make_node("Mul", [x, "s"], [y])]
    if isinstance(act, nn.Mish):
        return [oh.make_node("Softplus", [x], ["sp"]), oh.make_node("Tanh", ["sp"], ["t"]),
                oh.make_node("Mul", [x, "t"], [y])]
    return None


def _onnx_layer(module: nn.Module, x: torch.Tensor) -> bytes:
    """The conv (+ folded BN) and its activation as an ONNX graph, built directly (traced when the activation
    has no rule in _act_nodes)."""
    import onnx
    import onnx.helper as oh
    import onnx.numpy_helper as nh

    conv = module.conv
    nodes = _act_nodes(module.act, "conv", "y")
    if nodes is None:
        return torch_to_onnx(module, x, what="one-layer model")
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    weight = nh.from_array(conv.weight.detach().float().numpy(), "w")
    bias = nh.from_array(np.zeros(conv.out_channels, np.float32), "b")
    node = oh.make_node("Conv", ["x", "w", "b"], ["conv"], kernel_shape=[kh, kw], strides=[sh, sw],
                        pads=[ph, pw, ph, pw], dilations=[dh, dw], group=conv.groups)
    graph = oh.make_graph([node, *nodes], "layer", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                list(x.shape))],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [weight, bias])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()


def _ort_layer(module: nn.Module, x: torch.Tensor, threads: int, tmp: Path) -> Timer:
    sess = session(_onnx_layer(module, x), threads)
    feed = {sess.get_inputs()[0].name: x.numpy()}
    return lambda: sess.run(None, feed)


@lru_cache(maxsize=1)
def _ov_core():  # type: ignore[no-untyped-def]
    import openvino as ov  # optional extra: only the openvino runtime needs it
    return ov.Core()


def _ov_layer(module: nn.Module, x: torch.Tensor, threads: int, tmp: Path) -> Timer:
    import openvino as ov  # optional extra: only the openvino runtime needs it

    path = tmp / "layer.onnx"
    path.write_bytes(_onnx_layer(module, x))
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    request = _ov_core().compile_model(ov.convert_model(str(path)), "CPU", config).create_infer_request()
    data = x.numpy()
    return lambda: request.infer({0: data})


# ncnn's fused activations (Convolution 9=type, -23310=params) by torch module type; others are a layer of their own
_NCNN_FUSED: dict[type, Callable[[nn.Module], str]] = {
    nn.Identity: lambda m: "9=0", nn.ReLU: lambda m: "9=1",
    nn.LeakyReLU: lambda m: f"9=2 -23310=1,{m.negative_slope:g}", nn.ReLU6: lambda m: "9=3 -23310=2,0,6",
    nn.Sigmoid: lambda m: "9=4", nn.Mish: lambda m: "9=5", nn.Hardswish: lambda m: "9=6 -23310=2,0.166667,0.5"}
_NCNN_LAYERS: dict[type, str] = {nn.SiLU: "Swish", nn.Tanh: "TanH", nn.ELU: "ELU", nn.GELU: "GELU"}


def _ncnn_param(conv: nn.Conv2d, act: nn.Module, chw: tuple[int, int, int]) -> str:
    """A one-conv ncnn .param (BN folded into weights + bias, as pnnx writes it)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    kind = "ConvolutionDepthWise" if conv.groups > 1 else "Convolution"
    fused = _NCNN_FUSED.get(type(act), lambda m: "9=0")(act)
    extra = _NCNN_LAYERS.get(type(act))
    args = (f"0={conv.out_channels} 1={kw} 11={kh} 2={dw} 12={dh} 3={sw} 13={sh} 4={pw} 14={ph} 5=1 "
            f"6={conv.weight.numel()}" + (f" 7={conv.groups}" if conv.groups > 1 else "") + f" {fused}")
    lines = [f"Input in0 0 1 in0 0={chw[2]} 1={chw[1]} 2={chw[0]}",
             f"{kind} conv 1 1 in0 {'c0' if extra else 'out0'} {args}"]
    if extra:
        lines.append(f"{extra} act 1 1 c0 out0")
    return f"7767517\n{len(lines)} {len(lines)}\n" + "\n".join(lines) + "\n"


def _ncnn_layer(module: nn.Module, x: torch.Tensor, threads: int, tmp: Path) -> Timer:
    import ncnn  # optional extra: only the ncnn runtime needs it

    conv = module.conv
    param, weights = tmp / "layer.param", tmp / "layer.bin"
    param.write_text(_ncnn_param(conv, module.act, tuple(x.shape[1:])))
    w = conv.weight.detach().float().numpy().ravel()
    weights.write_bytes(struct.pack("<I", 0) + w.tobytes() + np.zeros(conv.out_channels, np.float32).tobytes())
    net = ncnn.Net()
    net.opt.num_threads = threads
    net.opt.use_vulkan_compute = False
    net.opt.openmp_blocktime = 0  # no spin-waiting (see deploy/runtimes/ncnn.py)
    if net.load_param(str(param)) or net.load_model(str(weights)):
        raise ExportError(f"ncnn cannot load the one-layer model {param}")
    mat = ncnn.Mat(np.ascontiguousarray(x[0].numpy())).clone()

    def run() -> object:
        with net.create_extractor() as ex:
            ex.input("in0", mat)
            return ex.extract("out0")
    return run


def _torch_layer(module: nn.Module, x: torch.Tensor, threads: int, tmp: Path) -> Timer:
    def run() -> object:
        with torch.no_grad(), pinned_threads(threads):
            return module(x)
    return run


def _exported_model(fmt: str) -> Callable[[DarknetModel, int, int, Path], Timer]:
    """Export the model as `export --format fmt` does and time its predictor (the runtime's own file)."""
    def build(model: DarknetModel, img_size: int, threads: int, tmp: Path) -> Timer:
        out = export(model, tmp / ("model.onnx" if fmt == "onnx" else fmt), ExportConfig(fmt, img_size=img_size))
        predictor = load_predictor(out.path, threads=threads)
        x = torch.rand(1, 3, img_size, img_size)
        return lambda: predictor(x)
    return build


def _torch_model(model: DarknetModel, img_size: int, threads: int, tmp: Path) -> Timer:
    model = model.eval()
    return _torch_layer(model, torch.rand(1, 3, img_size, img_size), threads, tmp)


@dataclass(frozen=True)
class LatencyRuntime:
    """A runtime we can time: `package` gives its version; `multiple`: the channel multiple its fast x86
    kernels work in (blocked NCHW8c / pack8 layouts), the default `--round-to` of a latency target."""

    name: str
    package: str
    layer: Callable[[nn.Module, torch.Tensor, int, Path], Timer]
    model: Callable[[DarknetModel, int, int, Path], Timer]
    multiple: int = 8


LATENCY_RUNTIMES: dict[str, LatencyRuntime] = {r.name: r for r in (
    LatencyRuntime("onnxruntime", "onnxruntime", _ort_layer, _exported_model("onnx")),
    LatencyRuntime("openvino", "openvino", _ov_layer, _exported_model("openvino")),
    LatencyRuntime("ncnn", "ncnn", _ncnn_layer, _exported_model("ncnn")),
    LatencyRuntime("torch", "torch", _torch_layer, _torch_model),
)}


def _runtime(name: str) -> LatencyRuntime:
    if name not in LATENCY_RUNTIMES:
        raise ExportError(f"--runtime {name!r} is unknown; choose one of {', '.join(LATENCY_RUNTIMES)}")
    return LATENCY_RUNTIMES[name]


def runtime_version(name: str) -> str:
    """The installed version of runtime `name` (ExportError naming the pip package when it is missing)."""
    package = _runtime(name).package
    try:
        return str(importlib.import_module(package).__version__)
    except ModuleNotFoundError:
        raise ExportError(f"--runtime {name}: {package} is not installed; pip install {package}") from None


def table_key(model: DarknetModel, runtime: str, threads: int, img_size: int) -> TableKey:
    return TableKey(machine_id(), runtime, runtime_version(runtime), threads, (img_size, img_size),
                    model_fingerprint(model.cfg))


def layer_module(model: DarknetModel, i: int, c_in: int, c_out: int) -> nn.Module:
    """Conv `i` rebuilt alone with `c_in` inputs and `c_out` outputs (random weights, eval mode), as its section
    builds it after pruning (a depthwise conv keeps groups == channels)."""
    graph = model.graph
    section = graph.sections[i]
    block = section.resize(graph.cfg.blocks[i], c_out)
    return section.build(block, [c_in], graph.ctx(i)).eval()


PASSES = 3   # a layer's grid is timed in this many interleaved passes; each point keeps its fastest pass


def _layer_grid_ms(model: DarknetModel, i: int, points: list[tuple[int, int]], hw: tuple[int, int],
                   rt: LatencyRuntime, threads: int, runs: int) -> list[float]:
    """ms of conv i at each (c_in, c_out) point: the points are timed in turn, PASSES times, so that a burst of
    load on a shared machine spoils one pass of every point rather than every pass of one point."""
    with tempfile.TemporaryDirectory(prefix="latency-") as tmp:
        timers = []
        for n, (c_in, c_out) in enumerate(points):
            (Path(tmp) / str(n)).mkdir()
            timers.append(rt.layer(layer_module(model, i, c_in, c_out), torch.rand(1, c_in, *hw), threads,
                                   Path(tmp) / str(n)))
        passes = [[quantile_ms(fn, max(1, runs // PASSES), threads=threads) for fn in timers] for _ in range(PASSES)]
    return [min(p[k] for p in passes) for k in range(len(points))]


def measure_table(model: DarknetModel, runtime: str, threads: int, img_size: int, grid: Mapping[int, LayerGrid],
                  runs: int = 10, model_runs: int = 20) -> LatencyTable:
    """Time every conv in `grid` at its grid widths, and the whole model, on `runtime` with `threads`."""
    rt, key = _runtime(runtime), table_key(model, runtime, threads, img_size)
    shapes = model.graph.shapes(img_size, img_size)
    load_before, start = os.getloadavg()[0], time.time()
    layers = []
    for i, g in sorted(grid.items()):
        src = model.graph.inputs[i][0]
        hw = (img_size, img_size) if src < 0 else shapes[src][1:]
        points = [(o if g.tied else c, o) for c in g.in_widths for o in g.out_widths]
        flat = iter(_layer_grid_ms(model, i, points, hw, rt, threads, runs))
        ms = tuple(tuple(next(flat) for _ in g.out_widths) for _ in g.in_widths)
        layers.append(LayerTiming(i, model.graph.cfg.blocks[i].type, g.in_widths, g.out_widths, ms))
    whole = measure_models([model], runtime, threads, img_size, model_runs)[0]
    notes = {"loadavg_1min_before": round(load_before, 2), "loadavg_1min_after": round(os.getloadavg()[0], 2),
             "seconds": round(time.time() - start, 1), "cores": os.cpu_count(), "clock": clock_name(threads),
             "quantile": QUANTILE}
    log.info("latency table %s: model %.2f ms, %d convs timed in %.0f s", key.describe(), whole, len(layers),
             notes["seconds"])
    return LatencyTable(key, whole, tuple(layers), runs, str(model.cfg.path),
                        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), notes)


def measure_models(models: Sequence[DarknetModel], runtime: str, threads: int, img_size: int, rounds: int = 20,
                   warmup: int = WARMUP) -> list[float]:
    """QUANTILE ms per model on `runtime`, timed round-robin (one run of each model per round)."""
    rt = _runtime(runtime)
    runtime_version(runtime)  # a missing package is named before any export
    with tempfile.TemporaryDirectory(prefix="latency-") as tmp:
        timers = []
        for n, m in enumerate(models):
            (Path(tmp) / str(n)).mkdir()
            timers.append(rt.model(m, img_size, threads, Path(tmp) / str(n)))
        for fn in timers:
            quantile_ms(fn, 1, warmup, threads=threads)
        times: list[list[float]] = [[] for _ in timers]
        for _ in range(rounds):
            for k, fn in enumerate(timers):
                times[k].append(quantile_ms(fn, 1, 0, threads=threads))
    return [float(np.quantile(t, QUANTILE)) for t in times]
