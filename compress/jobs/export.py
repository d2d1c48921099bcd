"""`yolo-compress export`: the decoded model as ONNX, OpenVINO IR or ncnn, checked in its runtime."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Mapping

from compress.base.guard import Output
from compress.darknet.persist import load
from compress.deploy.export import ExportConfig, NmsConfig, export
from compress.train.config import DistConfig
from compress.jobs.base import Job, PathLike, Report, as_str, paths, register_job

__all__ = ["ExportJob"]


@register_job
@dataclass(frozen=True)
class ExportJob(Job):
    """`out` is the .onnx file, or the folder for openvino/ncnn. `nms`: NonMaxSuppression inside the graph
    (iou_thres, score_thres, max_det); `runtime_check` (--check): run the written model and compare it with torch."""

    command: ClassVar[str] = "export"
    out_file: ClassVar[str | None] = "model.onnx"  # a recipe step's --out inside its folder
    # `--check` is field `runtime_check`: `check` is the post-report hook every job has
    flags: ClassVar[Mapping[str, str]] = {"check_images": "--check-image", "runtime_check": "--check"}
    false_flags: ClassVar[Mapping[str, str]] = {"runtime_check": "--no-check"}

    cfg: PathLike
    weights: PathLike | None
    out: PathLike
    format: str = "onnx"
    img_size: int | None = None
    dynamic: bool = False
    dynamic_batch: bool = False
    simplify: bool = False
    half: bool = False
    nms: bool = False
    iou_thres: float = 0.45
    score_thres: float = 0.25
    max_det: int = 100
    opset: int = 17
    runtime_check: bool = True
    check_images: tuple[PathLike, ...] = ()

    def __post_init__(self) -> None:
        self.export_config()
        NmsConfig(self.iou_thres, self.score_thres, self.max_det)  # their ranges hold without --nms too, as in click

    def export_config(self) -> ExportConfig:
        nms = NmsConfig(self.iou_thres, self.score_thres, self.max_det) if self.nms else None
        return ExportConfig(format=self.format, img_size=self.img_size, dynamic=self.dynamic,
                            dynamic_batch=self.dynamic_batch, opset=self.opset, simplify=self.simplify,
                            half=self.half, nms=nms, check=self.runtime_check, check_images=tuple(self.check_images))

    def inputs(self) -> tuple[Path, ...]:
        return paths(self.cfg, self.weights, *self.check_images)

    def outputs(self) -> tuple[Output, ...]:
        # openvino/ncnn write a folder: a non-empty one is an earlier run (--exist-ok replaces its files)
        return (Output(Path(self.out), "file" if self.format == "onnx" else "dir", "--out"),)

    def run(self, dist: DistConfig | None = None) -> Report:
        result = export(load(self.cfg, self.weights), self.out, self.export_config())
        return self.report({"cfg": as_str(self.cfg), "weights": as_str(self.weights), **result.to_dict()})
