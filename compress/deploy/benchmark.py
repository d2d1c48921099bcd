"""`benchmark`: one model in several deployment formats, each scored (mAP on the data) and timed.

Per format, the model is exported into a temporary folder (`FORMATS`: pytorch = the torch model itself, onnx,
openvino, ncnn here; int8 is registered by `compress.quant.int8_format`), loaded in its runtime with `threads`
threads, timed by `base.latency.measure` (batch 1, forward only: no NMS, no image decoding) and evaluated by
`detection.evaluate` (the same code as `eval`). A format that cannot be built or loaded (a runtime not
installed, a conversion the runtime refuses) gets a row with its error and the others still run, as in
Ultralytics' `yolo benchmark`.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from tabulate import tabulate

from compress.base.checks import check_img_size, check_range
from compress.base.errors import CompressError, ExportError
from compress.base.latency import DEFAULT_RUNS, DEFAULT_THREADS, DEFAULT_WARMUP, measure, pinned_threads
from compress.darknet.model import DarknetModel
from compress.data.dataset import load_data_spec, make_loader
from compress.deploy.export import ExportConfig, export
from compress.deploy.runtimes import RUNTIMES, load_predictor
from compress.detection.evaluate import EvalConfig, evaluate, input_letterbox

__all__ = ["BenchmarkConfig", "BenchmarkResult", "Artifact", "BuildContext", "FORMATS", "register_format",
           "benchmark_model", "benchmark_exported", "exported_format", "check_formats"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchmarkConfig:
    formats: tuple[str, ...] = ("pytorch", "onnx")
    img_size: int = 416
    threads: int = DEFAULT_THREADS
    runs: int = DEFAULT_RUNS
    warmup: int = DEFAULT_WARMUP
    letterbox: bool | None = None   # input geometry of the mAP runs; None: the model's (as eval)
    calib_images: int = 32          # int8: calibration images from the data's train split (random without data)
    workers: int = 0

    def __post_init__(self) -> None:
        check_img_size(self.img_size, multiple_of=32, error=ExportError)
        check_range("--threads", self.threads, 1, error=ExportError)
        check_range("--runs", self.runs, 1, error=ExportError)
        check_range("--warmup", self.warmup, 0, error=ExportError)
        check_formats(self.formats)


@dataclass(frozen=True)
class BuildContext:
    """What a format builder gets besides the model: the input size and calibration batches (uint8 images)."""

    img_size: int
    threads: int
    calibration: Callable[[], Iterable[torch.Tensor]]
    source_files: tuple[Path, ...] = ()   # the model's own files (the pytorch row's size)


@dataclass(frozen=True)
class Artifact:
    """A built format: the callable that maps (N,3,S,S) floats in [0,1] to eval-mode output, its files."""

    predictor: Callable[[torch.Tensor], Any]
    files: tuple[Path, ...] = ()


FORMATS: dict[str, Callable[[DarknetModel, Path, BuildContext], Artifact]] = {}


def register_format(name: str) -> Callable:
    def deco(fn: Callable[[DarknetModel, Path, BuildContext], Artifact]) -> Callable:
        FORMATS[name] = fn
        return fn
    return deco


def check_formats(formats: tuple[str, ...], option: str = "--formats") -> None:
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ExportError(f"{option}: unknown format(s) {', '.join(unknown) or '(none given)'}; use a "
                          f"comma-separated list of {', '.join(FORMATS)}")


@register_format("pytorch")
def _pytorch(model: DarknetModel, folder: Path, ctx: BuildContext) -> Artifact:
    return Artifact(model, ctx.source_files)


def _exported(fmt: str) -> Callable[[DarknetModel, Path, BuildContext], Artifact]:
    def build(model: DarknetModel, folder: Path, ctx: BuildContext) -> Artifact:
        out = folder / "model.onnx" if fmt == "onnx" else folder   # openvino/ncnn: model.xml/.param in it
        result = export(model, out, ExportConfig(format=fmt, img_size=ctx.img_size))
        return Artifact(load_predictor(result.path, threads=ctx.threads), result.files)
    return build


for _fmt in ("onnx", "openvino", "ncnn"):
    register_format(_fmt)(_exported(_fmt))


@dataclass
class BenchmarkResult:
    img_size: int
    threads: int
    rows: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"img_size": self.img_size, "threads": self.threads, "formats": [r["format"] for r in self.rows],
                "rows": self.rows}

    def table(self) -> str:
        body = [[r["format"], _f(r["size_mb"], ".2f"), _f(r["map50"], ".4f"), _f(r["map50_95"], ".4f"),
                 _f(r["latency_ms"], ".2f"), _f(r["latency_iqr_ms"], ".2f"),
                 "-" if r["latency_min_ms"] is None else f"{r['latency_min_ms']:.2f}-{r['latency_max_ms']:.2f}",
                 r["error"] or ""] for r in self.rows]
        return tabulate(body, headers=["format", "size MB", "mAP@0.5", "mAP@0.5:0.95", "ms median", "ms IQR",
                                       "ms min-max", "error"], tablefmt="github", disable_numparse=True)


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _row(fmt: str, build: Callable[[], Artifact], data: Any, config: BenchmarkConfig, letterbox: bool) -> dict:
    row: dict[str, Any] = {"format": fmt, "size_mb": None, "map50": None, "map50_95": None, "latency_ms": None,
                           "latency_iqr_ms": None, "latency_min_ms": None, "latency_max_ms": None, "error": None}
    try:
        artifact = build()
        x = torch.rand(1, 3, config.img_size, config.img_size, generator=torch.Generator().manual_seed(0))
        lat = measure(lambda: artifact.predictor(x), config.runs, config.warmup, config.threads)
        row.update(size_mb=round(sum(f.stat().st_size for f in artifact.files) / 1e6, 4) if artifact.files
                   else None, latency_ms=round(lat.median_ms, 3), latency_iqr_ms=round(lat.iqr_ms, 3),
                   latency_min_ms=round(lat.min_ms, 3), latency_max_ms=round(lat.max_ms, 3))
        if data is not None:
            with pinned_threads(config.threads):
                result = evaluate(artifact.predictor, data, EvalConfig(
                    img_size=config.img_size, progress=False, workers=config.workers, letterbox=letterbox))
            row.update(map50=round(result.map50, 5), map50_95=round(result.map50_95, 5))
    except CompressError as exc:  # this format only: the others still run (a missing runtime, a refused graph)
        row["error"] = str(exc)
    except ModuleNotFoundError as exc:  # a converter's optional package (openvino, pnnx) imported by the export
        package = (exc.name or "?").split(".")[0]
        row["error"] = f"{package} is not installed; pip install {package}"
    if row["error"]:
        log.warning("benchmark %s: %s", fmt, row["error"])
    return row


def _calibration(data: Any, img_size: int, n: int, letterbox: bool) -> Callable[[], Iterator[torch.Tensor]]:
    """uint8 batches for int8 calibration: the first `n` train images of `data`, else seeded random images."""
    def batches() -> Iterator[torch.Tensor]:
        if data is None:
            g = torch.Generator().manual_seed(0)
            yield from ((torch.rand(4, 3, img_size, img_size, generator=g) * 255).to(torch.uint8) for _ in range(2))
            return
        spec = load_data_spec(data)
        images = (spec.train or spec.valid)[:n]
        for imgs, *_ in make_loader(images, img_size, batch_size=8, workers=0, letterbox=letterbox):
            yield imgs
    return batches


def benchmark_model(model: DarknetModel, data: Any, config: BenchmarkConfig,
                    source_files: Iterable[str | os.PathLike] = ()) -> BenchmarkResult:
    """Every format of `config.formats` built from `model` (read from `source_files`: the pytorch row's size),
    scored on `data` (None: latency only), timed."""
    model = model.cpu().eval()
    letterbox = input_letterbox(model, config.letterbox)
    ctx = BuildContext(config.img_size, config.threads,
                       _calibration(data, config.img_size, config.calib_images, letterbox),
                       tuple(Path(p) for p in source_files))
    result = BenchmarkResult(config.img_size, config.threads)
    with tempfile.TemporaryDirectory(prefix="yc-bench-") as tmp:
        for fmt in config.formats:
            folder = Path(tmp) / fmt
            folder.mkdir()
            result.rows.append(_row(fmt, lambda: FORMATS[fmt](model, folder, ctx), data, config, letterbox))
            log.info("benchmark %s: %s", fmt, result.rows[-1])
    return result


def exported_format(path: str | os.PathLike) -> str:
    """The benchmark format name of an exported file (.onnx -> onnx, .xml -> openvino, .param -> ncnn)."""
    entry = RUNTIMES.get(Path(path).suffix.lower())
    if entry is None:
        raise ExportError(f"{path}: unknown model format; use one of {', '.join(RUNTIMES)}")
    return {"ort": "onnx"}.get(entry[0], entry[0])


def benchmark_exported(path: str | os.PathLike, predictor: Callable[[torch.Tensor], Any], data: Any,
                       config: BenchmarkConfig) -> BenchmarkResult:
    """One row: the exported model at `path` (already loaded as `predictor` with `config.threads` threads, e.g.
    by `load_predictor`) in its own runtime; an int8 QDQ .onnx from `quantize` included."""
    path = Path(path)
    files = tuple(p for p in (path, path.with_suffix(".bin")) if p.is_file())
    result = BenchmarkResult(config.img_size, config.threads)
    letterbox = input_letterbox(predictor, config.letterbox)
    result.rows.append(_row(exported_format(path), lambda: Artifact(predictor, files), data, config, letterbox))
    return result
