"""`yolo-compress benchmark`: a model in each deployment format, mAP on the data and batch-1 latency."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from compress.base.checks import check_img_size
from compress.base.errors import ExportError
from compress.base.latency import DEFAULT_RUNS, DEFAULT_THREADS, DEFAULT_WARMUP
from compress.darknet.persist import is_exported, load
from compress.deploy.benchmark import FORMATS, BenchmarkConfig, benchmark_exported, benchmark_model, exported_format
from compress.deploy.runtimes import inference_size, load_predictor
from compress.quant.int8_format import int8_artifact  # noqa: F401  (registers the int8 format)
from compress.quant.cpuinfo import cpu_flags
from compress.train.config import DistConfig
from compress.jobs.base import Job, PathLike, Report, as_str, paths, register_job
from compress.jobs.training import data_path

__all__ = ["BenchmarkJob"]


@register_job
@dataclass(frozen=True)
class BenchmarkJob(Job):
    """`formats` (comma-separated; None: every registered format for a Darknet model, the file's own format for
    an exported one) built from cfg/weights, or the exported model `weights` (.onnx/.xml/.param) as it is; mAP on
    `data`'s valid split (None: latency only); latency over `runs` timed forwards after `warmup`, `threads`
    threads, batch 1."""

    command: ClassVar[str] = "benchmark"

    cfg: PathLike | None              # None: only with an exported `weights` (as eval; a recipe fills it)
    weights: PathLike | None = None
    data: PathLike | None = None
    formats: str | None = None
    threads: int = DEFAULT_THREADS
    img_size: int | None = None
    runs: int = DEFAULT_RUNS
    warmup: int = DEFAULT_WARMUP
    letterbox: bool | None = None

    def __post_init__(self) -> None:
        if self.cfg is None and not is_exported(self.weights):
            raise ExportError("benchmark needs --cfg (with --weights) or --weights of an exported model "
                              "(.onnx, .xml, .param)")
        check_img_size(self.img_size, multiple_of=32, error=ExportError)
        self.bench_config(self.img_size or 416)
        if is_exported(self.weights) and self.formats is not None \
                and self.format_list() != (exported_format(self.weights),):
            raise ExportError(f"--formats {self.formats}: {self.weights} is an exported model and runs in its own "
                              f"format only ({exported_format(self.weights)}); pass --cfg/--weights of the Darknet "
                              "model to benchmark other formats")

    def format_list(self) -> tuple[str, ...]:
        if self.formats is None:
            return (exported_format(self.weights),) if is_exported(self.weights) else tuple(FORMATS)
        return tuple(f.strip() for f in str(self.formats).split(",") if f.strip())

    def bench_config(self, img_size: int) -> BenchmarkConfig:
        return BenchmarkConfig(formats=self.format_list(), img_size=img_size,
                               threads=self.threads, runs=self.runs, warmup=self.warmup, letterbox=self.letterbox)

    def inputs(self) -> tuple[Path, ...]:
        return paths(self.cfg, self.weights, data_path(self.data))

    def run(self, dist: DistConfig | None = None) -> Report:
        if is_exported(self.weights):
            predictor = load_predictor(self.weights, threads=self.threads)
            config = self.bench_config(inference_size(predictor, self.cfg, self.img_size))
            result = benchmark_exported(self.weights, predictor, self.data, config)
        else:
            model = load(self.cfg, self.weights)
            config = self.bench_config(self.img_size or model.cfg.width)
            result = benchmark_model(model, self.data, config, paths(self.weights))
        return self.report({"cfg": as_str(self.cfg), "weights": as_str(self.weights), "data": as_str(self.data),
                            **result.to_dict(), "runs": config.runs, "warmup": config.warmup, "batch": 1,
                            "cpu": cpu_flags()})
