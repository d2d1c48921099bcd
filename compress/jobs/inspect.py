"""Jobs that read a model or a dataset and write no model: info, eval, detect, anchors."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Mapping

from compress.base.checks import check_img_size, check_range
from compress.base.errors import CfgError
from compress.base.guard import Output
from compress.darknet.cfg import read_cfg
from compress.darknet.persist import load
from compress.darknet.summary import bn_gammas, file_size_mb, gamma_stats, plot_gamma_histogram, summarize
from compress.data.dataset import read_names
from compress.deploy.latency_table import model_fingerprint, read_tables
from compress.deploy.runtimes import inference_size, load_for_inference
from compress.detection.anchors import AnchorConfig, compute_anchors
from compress.detection.detect import DetectConfig, check_names, detect_to_dir, detect_to_file, is_image_file
from compress.detection.evaluate import EvalConfig, evaluate, save_detections
from compress.train.config import DistConfig
from compress.jobs.ranks import process_device
from compress.jobs.base import Job, PathLike, Report, as_str, files, paths, register_job
from compress.jobs.training import data_path, dataset_files

__all__ = ["InfoJob", "EvalJob", "DetectJob", "AnchorsJob"]


@register_job
@dataclass(frozen=True)
class InfoJob(Job):
    """Layers, params, FLOPs at `img_size` (None: the cfg's), BN-gamma statistics (+ a PNG histogram); with
    `latency_table`, the per-layer latency tables that file holds for this cfg's structure."""

    command: ClassVar[str] = "info"

    cfg: PathLike
    weights: PathLike | None = None
    img_size: int | None = None
    gamma_plot: PathLike | None = None
    cutoff: int | None = None
    latency_table: PathLike | None = None

    def __post_init__(self) -> None:
        check_img_size(self.img_size, error=CfgError)
        check_range("--cutoff", self.cutoff, 1, error=CfgError)

    def inputs(self) -> tuple[Path, ...]:
        return paths(self.cfg, self.weights, self.latency_table)

    def outputs(self) -> tuple[Output, ...]:
        return files(("--gamma-plot", self.gamma_plot))

    def latency_tables(self, model) -> list[dict]:  # type: ignore[no-untyped-def]
        """The tables in --latency-table measured on this cfg's structure: key, whole-model ms, per-layer rows."""
        tables = read_tables(self.latency_table)
        mine = [t for t in tables if t.key.model == model_fingerprint(model.cfg)]
        if not mine:
            raise CfgError(f"--latency-table {self.latency_table}: none of its {len(tables)} table(s) was measured on "
                           f"{self.cfg}; measure one with `prune --target-latency R --latency-table "
                           f"{self.latency_table}`")
        return [{"key": t.to_dict()["key"], "describe": t.key.describe(), "model_ms": t.model_ms,
                 "per_melem": t.per_melem, "conv_scale": t.conv_scale, "measured": t.measured, "rows": t.rows()} for t in mine]

    def run(self, dist: DistConfig | None = None) -> Report:
        model = load(self.cfg, self.weights, cutoff=self.cutoff)
        summary = summarize(model, (self.img_size, self.img_size) if self.img_size else None)
        if self.gamma_plot:
            plot_gamma_histogram(bn_gammas(model), self.gamma_plot)
        tables = {"latency_tables": self.latency_tables(model)} if self.latency_table else {}
        return self.report({**summary.to_dict(), "gamma": gamma_stats(bn_gammas(model)), "cfg": str(self.cfg),
                            "weights": None if self.weights is None else str(self.weights),
                            "weights_mb": file_size_mb(self.weights) if self.weights else None, **tables})


@register_job
@dataclass(frozen=True)
class EvalJob(Job):
    """mAP of cfg/weights (Darknet, .pt, or an exported .onnx/.xml/.param) on `data`'s valid split; `img_size`
    None: the exported model's fixed size, else the cfg's width. `json_path` (--json): COCO detections."""

    command: ClassVar[str] = "eval"
    in_summary: ClassVar[bool] = True   # a recipe's stage table adds its mAP
    flags: ClassVar[Mapping[str, str]] = {"json_path": "--json"}

    cfg: PathLike | None
    weights: PathLike | None
    data: PathLike
    img_size: int | None = None
    batch_size: int = 8
    conf_thres: float = 0.001
    iou_thres: float = 0.6
    workers: int | None = None      # None: EvalConfig's default
    json_path: PathLike | None = None
    no_progress: bool = False
    letterbox: bool | None = None
    device: str = "auto"      # resolved when it runs (auto: a GPU if one is visible)

    def __post_init__(self) -> None:
        self.eval_config(self.img_size or 416)  # EvalConfig's rules and messages

    def eval_config(self, img_size: int) -> EvalConfig:
        return EvalConfig(img_size=img_size, batch_size=self.batch_size, conf_thres=self.conf_thres,
                          iou_thres=self.iou_thres, progress=not self.no_progress, letterbox=self.letterbox,
                          **({} if self.workers is None else {"workers": self.workers}))

    def inputs(self) -> tuple[Path, ...]:
        return paths(self.cfg, self.weights, data_path(self.data))

    def data_files(self) -> tuple[Path, ...]:
        return dataset_files(self.data)

    def outputs(self) -> tuple[Output, ...]:
        return files(("--json", self.json_path))

    def run(self, dist: DistConfig | None = None) -> Report:
        device = process_device(self.device, dist)
        model = load_for_inference(self.cfg, self.weights, device)
        config = self.eval_config(inference_size(model, self.cfg, self.img_size))
        result = evaluate(model, self.data, config, device=device)
        if self.json_path:
            save_detections(result, self.json_path)
        return self.report({"cfg": as_str(self.cfg), "weights": as_str(self.weights), "data": as_str(self.data),
                            "img_size": config.img_size, **result.to_dict(), "pr_conf": config.pr_conf,
                            "detections_json": as_str(self.json_path)})


@register_job
@dataclass(frozen=True)
class DetectJob(Job):
    """Boxes drawn on `source` (an image or a folder) by cfg/weights (Darknet, .pt, or an exported .onnx/.xml/
    .param, as `eval`): into the folder `out` + detections.json, or, for one image, into the image file `out`
    (PNG or JPEG by its name). `names`: a class-names file (one per class of the model; default: class ids)."""

    command: ClassVar[str] = "detect"

    cfg: PathLike
    weights: PathLike | None
    source: PathLike
    out: PathLike
    img_size: int | None = None
    conf_thres: float = 0.25
    iou_thres: float = 0.45
    names: PathLike | None = None
    letterbox: bool | None = None
    device: str = "auto"      # resolved when it runs (auto: a GPU if one is visible)

    def __post_init__(self) -> None:
        # DetectConfig's rules now (run() builds it again with the model's width when img_size is None)
        DetectConfig(img_size=self.img_size or 416, conf_thres=self.conf_thres, iou_thres=self.iou_thres,
                     letterbox=self.letterbox)

    def inputs(self) -> tuple[Path, ...]:
        return paths(self.cfg, self.weights, self.source, self.names)

    def data_files(self) -> tuple[Path, ...]:
        return dataset_files(None, sources=(self.source,))

    def data_dirs(self, files: tuple[Path, ...]) -> tuple[Path, ...]:
        """A source folder is read recursively (outputs inside it would be detected next time); a single
        image's folder is not data."""
        return (Path(self.source),) if Path(self.source).is_dir() else ()

    def outputs(self) -> tuple[Output, ...]:
        return (Output(Path(self.out), "file" if is_image_file(self.out) else "dir", "--out"),)

    def out_dir(self) -> Path | None:
        return None if is_image_file(self.out) else Path(self.out)   # one image file: --report only

    def run(self, dist: DistConfig | None = None) -> Report:
        device = process_device(self.device, dist)
        model = load_for_inference(self.cfg, self.weights, device)
        config = DetectConfig(img_size=inference_size(model, self.cfg, self.img_size), conf_thres=self.conf_thres,
                              iou_thres=self.iou_thres, letterbox=self.letterbox)
        nc = getattr(model, "num_classes", None) or (read_cfg(self.cfg).classes if self.cfg else None)
        names = read_names(self.names) if self.names else [str(i) for i in range(nc or 0)]
        check_names(names, nc, f"--names {self.names}")
        write = detect_to_file if is_image_file(self.out) else detect_to_dir
        records = write(model, self.source, self.out, names, config, device=device)
        return self.report({
            "cfg": as_str(self.cfg), "weights": as_str(self.weights), "source": as_str(self.source),
            "out": as_str(self.out), "images": len(records), "boxes": sum(len(r["detections"]) for r in records),
            "per_image": [{"image": r["image"], "boxes": len(r["detections"]),
                           "classes": sorted({d["name"] for d in r["detections"]})} for r in records]})


@register_job
@dataclass(frozen=True)
class AnchorsJob(Job):
    """k-means anchors of `data`'s label boxes (`split`), for `img_size` inputs."""

    command: ClassVar[str] = "anchors"

    data: PathLike
    n: int = AnchorConfig.n                 # the library config's defaults, stated once
    img_size: int = AnchorConfig.img_size
    split: str = AnchorConfig.split
    seed: int = AnchorConfig.seed

    def __post_init__(self) -> None:
        self.anchor_config()

    def anchor_config(self) -> AnchorConfig:
        return AnchorConfig(n=self.n, img_size=self.img_size, seed=self.seed, split=self.split)

    def inputs(self) -> tuple[Path, ...]:
        return paths(data_path(self.data))

    def data_files(self) -> tuple[Path, ...]:
        return dataset_files(self.data)

    def run(self, dist: DistConfig | None = None) -> Report:
        config = self.anchor_config()
        result = compute_anchors(self.data, config)
        return self.report({"data": as_str(self.data), "n": config.n, "img_size": config.img_size,
                            **result.to_dict()})
