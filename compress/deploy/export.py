"""Export the decoded (eval-mode) model to ONNX, OpenVINO IR or ncnn, and check it in its own runtime.

Every format starts from the same traced ONNX graph (`onnx_io.torch_to_onnx`): input `images` (N, 3, H, W) float
RGB in [0, 1], output `output` (N, boxes, 5 + C): cx, cy, w, h in input pixels, sigmoid objectness, sigmoid class
scores -- exactly what `model.eval()(x)` returns, so the same NMS and `evaluate()` run on any of them. With `nms`
the ONNX graph ends in NonMaxSuppression instead (see `onnx_nms`). OpenVINO IR is converted from it with
`openvino.convert_model`, ncnn with pnnx.

`half`: ONNX becomes a float16 graph (`onnx_io.fp16_graph`: float16 weights and activations through every conv
layer, float32 input/output and YOLO decode, so box coordinates keep float32 resolution); OpenVINO stores fp16
weights (compress_to_fp16) and ncnn fp16 weights (pnnx fp16=1), whose runtimes pick fp16 arithmetic where the
hardware has it. On x86 CPUs the fp16 ONNX graph runs (onnxruntime) but slower than fp32.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from compress.detection.boxes import box_iou, non_max_suppression
from compress.base.checks import check_img_size
from compress.base.errors import ExportError
from compress.base.fileio import write_bytes_atomic, write_text_atomic
from compress.darknet.model import DarknetModel
from compress.deploy.onnx_io import INPUT_NAME, OUTPUT_NAME, fp16_graph, session, set_metadata, simplify, torch_to_onnx
from compress.deploy.onnx_nms import NMS_OUTPUTS, EndToEnd, NmsConfig
from compress.deploy.runtimes import METADATA_NAME, load_predictor
from compress.deploy.runtimes.ncnn import to_ncnn          # both import their runtime package only when called
from compress.deploy.runtimes.openvino import to_openvino
from compress.data.dataset import letterbox, load_image
from compress.data.imageio import cfg_letterbox

__all__ = ["FORMATS", "ExportConfig", "ExportResult", "ParityResult", "NmsConfig", "export", "export_onnx",
           "check_export", "check_onnx", "onnx_session", "fp16_arithmetic_diff"]

log = logging.getLogger(__name__)

SUPPORTED_OPSETS = range(11, 21)
FORMATS = ("onnx", "openvino", "ncnn")
_FILES = {"openvino": ("model.xml", "model.bin"), "ncnn": ("model.param", "model.bin")}


@dataclass(frozen=True)
class ExportConfig:
    """What to export. `img_size` None = the cfg's width/height. `dynamic`: batch, height and width axes free;
    `dynamic_batch`: only the batch. `check` compares the written model, run in its runtime, with torch and
    raises ExportError beyond `box_tol` pixels or `score_tol`."""

    format: str = "onnx"
    img_size: int | None = None
    dynamic: bool = False
    dynamic_batch: bool = False
    opset: int = 17
    simplify: bool = False
    half: bool = False
    nms: NmsConfig | None = None
    check: bool = False
    check_images: tuple[str, ...] = ()   # real images checked besides the seeded random one (see --nms)
    box_tol: float | None = None     # None: 1 px (fp32) / 3 px (--half)
    score_tol: float | None = None   # None: 0.01 (fp32) / 0.05 (--half)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ExportError(f"--format {self.format}: use one of {', '.join(FORMATS)}")
        if self.opset not in SUPPORTED_OPSETS:
            raise ExportError(f"opset={self.opset} is not supported; use one of {SUPPORTED_OPSETS.start}.."
                              f"{SUPPORTED_OPSETS.stop - 1} (13 and 17 are tested)")
        check_img_size(self.img_size, error=ExportError)
        if any(t is not None and t <= 0 for t in (self.box_tol, self.score_tol)):
            raise ExportError(f"box_tol={self.box_tol} and score_tol={self.score_tol} must be > 0")
        if self.format == "ncnn" and (self.dynamic or self.dynamic_batch or self.nms):
            raise ExportError("--format ncnn takes one image of the exported size and has no NonMaxSuppression "
                              "layer: drop --dynamic/--dynamic-batch/--nms (or use --format onnx/openvino)")

    @property
    def tolerances(self) -> tuple[float, float]:
        """(box px, score). fp32: 1 px / 0.01. --half: float16 keeps 11 significant bits, and the check compares
        every box, also the large low-confidence ones (w, h = exp(t) * anchor): measured worst over 18 real
        images + 1 random, fp16 ONNX graph: yolov4-tiny @416 2.76 px / 0.021, yolo-fastest-1.1 @320 1.73 px /
        0.024 (boxes with objectness > 0.1: <= 0.66 px / 0.014); ncnn fp16 up to 1.07 px / 0.032 -- hence
        3 px / 0.05. A broken artifact (wrong weights, float16 overflow: inf/NaN) is far beyond that."""
        box, score = (3.0, 0.05) if self.half else (1.0, 0.01)
        return self.box_tol or box, self.score_tol or score

    @property
    def batch_free(self) -> bool:
        return self.dynamic or self.dynamic_batch


@dataclass(frozen=True)
class ParityResult:
    """The exported model in its runtime vs torch on the same inputs (worst case over all inputs)."""

    max_abs_diff: float      # over every compared value, in its own units (box columns in pixels)
    max_box_diff: float      # box coordinates, pixels
    max_score_diff: float    # objectness and class scores (with nms: detection scores)
    inputs: int
    unmatched: int = 0       # with nms: detections found by only one side
    detections: int = 0      # with nms: torch's detections compared (a random image may have none)
    fp16_box_diff: float | None = None    # --half: torch float16 arithmetic vs float32 (fp16_arithmetic_diff)
    fp16_score_diff: float | None = None

    def to_dict(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "max_box_diff": self.max_box_diff,
                "max_score_diff": self.max_score_diff, "check_inputs": self.inputs, "unmatched": self.unmatched,
                "check_detections": self.detections, "fp16_box_diff": self.fp16_box_diff,
                "fp16_score_diff": self.fp16_score_diff}


@dataclass(frozen=True)
class ExportResult:
    path: Path                       # the .onnx / .xml / .param to load (load_predictor)
    format: str
    opset: int
    img_size: tuple[int, int]
    dynamic: bool
    dynamic_batch: bool
    size_mb: float                   # every file the format needs (e.g. .xml + .bin)
    files: tuple[Path, ...] = ()
    half: bool = False
    nms: NmsConfig | None = None
    parity: ParityResult | None = field(default=None)
    letterbox: bool = False    # input geometry the model expects (cfg [net] letter_box; False: plain resize)

    def to_dict(self) -> dict:
        out = {"format": self.format, "path": str(self.path), "files": [str(f) for f in self.files],
               "opset": self.opset, "img_size": list(self.img_size), "dynamic": self.dynamic,
               "dynamic_batch": self.dynamic_batch, "half": self.half, "size_mb": round(self.size_mb, 4),
               "nms": None if self.nms is None else vars(self.nms), "letterbox": self.letterbox}
        if self.format == "onnx":
            out["onnx"] = str(self.path)
        return {**out, **(self.parity.to_dict() if self.parity else {})}


def export(model: DarknetModel, out: str | os.PathLike, config: ExportConfig = ExportConfig(),
           check_inputs: Sequence[torch.Tensor] = ()) -> ExportResult:
    """Write `model` in `config.format` to `out` (the .onnx file, or the folder for openvino/ncnn), atomically.

    Example:
        >>> export(compress.load("yolo-fastest-1.1.cfg", "yolo-fastest-1.1.weights"), "fast-ov",
        ...        ExportConfig(format="openvino", check=True))
    Raises:
        ExportError: the size is not a multiple of the model stride, tracing or conversion failed, a runtime
            is missing, or (with `check`) the runtime's output differs from torch beyond the tolerances.
    """
    model = model.cpu().eval()
    hw = _input_hw(model, config.img_size)
    graph = _onnx_graph(model, hw, config)
    if config.half and config.format == "onnx":
        graph = fp16_graph(graph, _fp32_node(model))
    use_letterbox = bool(cfg_letterbox(model))
    meta = {"format": config.format, "cfg": str(model.cfg.path), "classes": model.num_classes,
            "letterbox": use_letterbox, "img_size": list(hw), "dynamic": config.dynamic,
            "dynamic_batch": config.dynamic_batch, "half": config.half,
            "nms": None if config.nms is None else vars(config.nms)}
    files = WRITERS[config.format](graph, Path(out), hw, config, meta)
    log.info("%s (%dx%d) -> %s", config.format, hw[1], hw[0], files[0])
    parity = None
    if config.check:
        inputs = [*check_inputs, *(_image_tensor(p, hw) for p in config.check_images)]
        parity = check_export(model, files[0], inputs, img_size=hw, nms=config.nms)
        if config.half:
            seeded = torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(0))  # check_export's
            fp16 = fp16_arithmetic_diff(model, [seeded, *inputs])
            parity = replace(parity, fp16_box_diff=fp16[0], fp16_score_diff=fp16[1])
        _enforce_tolerance(parity, config, files[0])
    size = sum(f.stat().st_size for f in files) / 1e6
    return ExportResult(files[0], config.format, config.opset, hw, config.dynamic, config.dynamic_batch, size,
                        tuple(files), config.half, config.nms, parity, use_letterbox)


def export_onnx(model: DarknetModel, path: str | os.PathLike, config: ExportConfig = ExportConfig(),
                check_inputs: Sequence[torch.Tensor] = ()) -> ExportResult:
    """`export` to one ONNX file (whatever `config.format` says)."""
    return export(model, path, replace(config, format="onnx"), check_inputs)


def _input_hw(model: DarknetModel, img_size: int | None) -> tuple[int, int]:
    hw = (img_size, img_size) if img_size else (model.cfg.height, model.cfg.width)
    stride = model.stride
    if hw[0] % stride or hw[1] % stride:
        raise ExportError(f"--img-size {hw[1]}x{hw[0]} is not a multiple of the model stride {stride}; "
                          f"use e.g. {max(stride, round(hw[0] / stride) * stride)}")
    return hw


def _image_tensor(path: str | os.PathLike, hw: tuple[int, int]) -> torch.Tensor:
    """(1, 3, H, W) float in [0, 1]: letterboxed like `evaluate` does (resized when H != W)."""
    from PIL import Image

    try:
        img = load_image(Path(path))
    except OSError as exc:
        raise ExportError(f"--check-image {path}: cannot read it as an image ({exc})") from exc
    if hw[0] == hw[1]:
        img = letterbox(img, hw[0])[0]
    else:
        img = np.asarray(Image.fromarray(img).resize((hw[1], hw[0]), Image.BILINEAR))
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 255.0


def _onnx_graph(model: DarknetModel, hw: tuple[int, int], config: ExportConfig) -> bytes:
    module = EndToEnd(model, config.nms).eval() if config.nms else model  # export restores its train flag
    outputs = NMS_OUTPUTS if config.nms else (OUTPUT_NAME,)
    axes: dict[str, dict[int, str]] = {}
    if config.batch_free:
        axes = {name: {0: "batch"} for name in (INPUT_NAME, *outputs)}
    if config.dynamic:
        axes[INPUT_NAME].update({2: "height", 3: "width"})
        if not config.nms:
            axes[OUTPUT_NAME][1] = "boxes"
    graph = torch_to_onnx(module, torch.rand(1, 3, *hw), config.opset, output_names=outputs, dynamic_axes=axes,
                          what=str(model.cfg.path))
    return simplify(graph, str(model.cfg.path)) if config.simplify else graph


def _fp32_node(model: DarknetModel) -> Callable[[str], bool]:
    """Nodes kept float32 in a --half ONNX graph: all but those of the non-head layers (traced node names are
    scoped `/layers.<i>/`, or `/model/layers.<i>/` inside the NMS wrapper): the [yolo]/[region] decode, the
    concatenation of the heads and NMS, whose pixel coordinates need more than float16's 11 bits."""
    heads = {i for i, section in enumerate(model.graph.sections) if section.head}

    def keep(name: str) -> bool:
        found = re.search(r"/layers\.(\d+)/", name)
        return found is None or int(found.group(1)) in heads
    return keep


def _write_onnx(graph: bytes, out: Path, hw, config: ExportConfig, meta: dict) -> list[Path]:
    if out.suffix.lower() != ".onnx":
        raise ExportError(f"--out {out}: an ONNX export is one file; name it *.onnx")
    write_bytes_atomic(out, set_metadata(graph, meta))
    return [out]


def _write_folder(convert: Callable[[Path], None], out: Path, names: tuple[str, ...], meta: dict) -> list[Path]:
    """Convert into a temporary sibling folder, then move each file into `out` (each move is atomic)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: --format {meta['format']} writes a folder, and this is a file")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as tmp:
        convert(Path(tmp) / names[0])
        write_text_atomic(Path(tmp) / METADATA_NAME, json.dumps(meta, indent=2) + "\n")
        out.mkdir(exist_ok=True)
        for name in (*names, METADATA_NAME):
            os.replace(Path(tmp) / name, out / name)
    return [out / n for n in (*names, METADATA_NAME)]


def _write_openvino(graph: bytes, out: Path, hw, config: ExportConfig, meta: dict) -> list[Path]:
    return _write_folder(lambda xml: to_openvino(graph, xml, config.half), out, _FILES["openvino"], meta)


def _write_ncnn(graph: bytes, out: Path, hw, config: ExportConfig, meta: dict) -> list[Path]:
    return _write_folder(lambda param: to_ncnn(graph, param, hw, config.half), out, _FILES["ncnn"], meta)


WRITERS: dict[str, Callable[..., list[Path]]] = {"onnx": _write_onnx, "openvino": _write_openvino,
                                                 "ncnn": _write_ncnn}


def onnx_session(path: str | os.PathLike):  # type: ignore[no-untyped-def]
    """A CPU onnxruntime session with as many intra-op threads as torch uses (the torch side of the check)."""
    return session(path, threads=torch.get_num_threads())


@torch.no_grad()
def check_export(model: DarknetModel, path: str | os.PathLike, inputs: Sequence[torch.Tensor] = (),
                 img_size: tuple[int, int] | None = None, nms: NmsConfig | None = None,
                 seed: int = 0) -> ParityResult:
    """Run the exported file in its runtime (`load_predictor`) and the torch model on the same inputs.

    `inputs` are extra (N, 3, H, W) tensors in [0, 1] (e.g. real letterboxed images); a seeded random image is
    always checked too. With `nms`, the graph's detections are matched to `non_max_suppression` of torch's.
    """
    hw = img_size or (model.cfg.height, model.cfg.width)
    gen = torch.Generator().manual_seed(seed)
    batch = [torch.rand(1, 3, *hw, generator=gen), *inputs]
    predictor = load_predictor(path, threads=torch.get_num_threads())
    model = model.cpu().eval()
    box, score, unmatched, dets = 0.0, 0.0, 0, 0
    for x in batch:
        x = x.float()
        fixed = getattr(predictor, "img_hw", None)
        if fixed and tuple(x.shape[-2:]) != tuple(fixed):
            raise ExportError(f"{path}: expects {fixed[1]}x{fixed[0]} inputs, got {x.shape[-1]}x{x.shape[-2]}; "
                              f"re-export with --dynamic or the matching --img-size")
        ref = model(x)
        if nms is None:
            got = predictor(x).double()
            if got.shape != ref.shape:
                raise ExportError(f"{path}: output shape {tuple(got.shape)} != torch's {tuple(ref.shape)}")
            diff = (got - ref.double()).abs()
            b, s, u = float(diff[..., :4].max()), float(diff[..., 4:].max()), 0
        else:
            want = non_max_suppression(ref, nms.score_thres, nms.iou_thres, nms.max_det)
            b, s, u = _nms_diff(predictor.run(x), want)
            dets += sum(len(w) for w in want)
        box, score, unmatched = _worst(box, b), _worst(score, s), unmatched + u
    return ParityResult(_worst(box, score), box, score, len(batch), unmatched, dets)


def _worst(*values: float) -> float:
    """max() that keeps NaN (as inf): a NaN difference is a failure, not a zero."""
    return math.inf if any(math.isnan(v) for v in values) else max(values)


@torch.no_grad()
def fp16_arithmetic_diff(model: DarknetModel, inputs: Sequence[torch.Tensor]) -> tuple[float, float]:
    """Worst (box px, score) difference between the model run in float16 arithmetic (torch on CPU: float16
    weights and activations in every layer) and in float32, on `inputs`. It stands for a float16 engine (GPU,
    TensorRT, ncnn on ARM), including overflow past 65504 (inf/NaN): onnxruntime's and OpenVINO's x86 CPU
    kernels compute a --half model in float32, so the runtime check alone cannot show either."""
    half = copy.deepcopy(model).cpu().eval().half()
    box = score = 0.0
    for x in inputs:
        d = (half(x.half()).double() - model(x.float()).double()).abs()
        box, score = _worst(box, float(d[..., :4].max())), _worst(score, float(d[..., 4:].max()))
    return box, score


def check_onnx(model: DarknetModel, path: str | os.PathLike, inputs: Sequence[torch.Tensor] = (),
               img_size: tuple[int, int] | None = None, seed: int = 0) -> ParityResult:
    """`check_export` for a plain (no NMS) ONNX file."""
    return check_export(model, path, inputs, img_size, None, seed)


def _nms_diff(outputs: list[np.ndarray], ref: list[torch.Tensor]) -> tuple[float, float, int]:
    """Worst box / score difference of matched detections (same class, best IoU) and the unmatched count."""
    boxes, scores, classes, nums = outputs
    box = score = 0.0
    unmatched = 0
    for k, want in enumerate(ref):
        n = int(nums[k])
        got = torch.cat((torch.from_numpy(boxes[k, :n]).double(), torch.from_numpy(scores[k, :n, None]).double(),
                         torch.from_numpy(classes[k, :n, None]).double()), 1)
        unmatched += abs(len(got) - len(want))
        if not len(got) or not len(want):
            continue
        iou = box_iou(want[:, :4].double(), got[:, :4]) * (want[:, 5:6].double() == got[None, :, 5])
        best = iou.argmax(1)
        ok = iou.max(1).values > 0.5
        unmatched += int((~ok).sum())
        if ok.any():
            box = max(box, float((want[ok, :4].double() - got[best[ok], :4]).abs().max()))
            score = max(score, float((want[ok, 4].double() - got[best[ok], 4]).abs().max()))
    return box, score, unmatched


def _enforce_tolerance(parity: ParityResult, config: ExportConfig, path: Path) -> None:
    box_tol, score_tol = config.tolerances
    within = parity.max_box_diff <= box_tol and parity.max_score_diff <= score_tol  # False for NaN too
    if not within or parity.unmatched:
        raise ExportError(f"{path}: the {config.format} runtime differs from torch (boxes {parity.max_box_diff:.3g}"
                          f" px, scores {parity.max_score_diff:.3g}, unmatched detections {parity.unmatched}) "
                          f"beyond {box_tol:g} px / {score_tol:g}; the files are "
                          f"written but should not be deployed: try another --opset or without --half")
    fp16 = (parity.fp16_box_diff, parity.fp16_score_diff)
    if fp16[0] is not None and not (fp16[0] <= box_tol and fp16[1] <= score_tol):
        why = " (inf/NaN: activations beyond float16's 65504)" if math.inf in fp16 else ""
        raise ExportError(f"{path}: in float16 arithmetic (as GPU and ARM runtimes compute --half models) the "
                          f"model differs from float32 by {fp16[0]:.3g} px / {fp16[1]:.3g}{why}, beyond "
                          f"{box_tol:g} px / {score_tol:g}; the files are written but should not be deployed: "
                          "export without --half")
