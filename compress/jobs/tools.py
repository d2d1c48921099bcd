"""Jobs of the other commands: info, eval, detect, export, anchors, data synth, data convert, run (recipes)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from compress.detection.anchors import AnchorConfig
from compress.data.convert import ConvertConfig
from compress.base.errors import DataError
from compress.detection.evaluate import EvalConfig
from compress.deploy.export import ExportConfig
from compress.base.guard import Output
from compress.jobs.contract import JobKind, register_job
from compress.jobs.training import _data_path

__all__ = ["InfoJob", "EvalJob", "DetectJob", "ExportJob", "AnchorsJob", "SynthJob", "ConvertConfig", "RecipeJob"]


def _files(*pairs: tuple[str, Any]) -> tuple[Output, ...]:
    return tuple(Output(Path(p), "file", opt) for opt, p in pairs if p)


@dataclass(frozen=True)
class InfoJob:
    """`yolo-compress info`: layers, params, FLOPs at `img_size` (None: the cfg's), BN-gamma statistics."""

    cfg: str | os.PathLike
    weights: str | os.PathLike | None = None
    img_size: int | None = None
    gamma_plot: str | os.PathLike | None = None   # PNG histogram of |BN gamma|
    cutoff: int | None = None


def _run_info(job: InfoJob) -> dict:
    from compress.darknet.persist import load
    from compress.darknet.summary import bn_gammas, file_size_mb, gamma_stats, plot_gamma_histogram, summarize
    model = load(job.cfg, job.weights, cutoff=job.cutoff)
    summary = summarize(model, (job.img_size, job.img_size) if job.img_size else None)
    if job.gamma_plot:
        plot_gamma_histogram(bn_gammas(model), job.gamma_plot)
    return {**summary.to_dict(), "gamma": gamma_stats(bn_gammas(model)), "cfg": str(job.cfg),
            "weights": None if job.weights is None else str(job.weights),
            "weights_mb": file_size_mb(job.weights) if job.weights else None}


register_job(InfoJob, JobKind("info", _run_info, inputs=lambda j: (j.cfg, j.weights),
                              outputs=lambda j: _files(("--gamma-plot", j.gamma_plot))))


@dataclass(frozen=True)
class EvalJob:
    """`yolo-compress eval`: mAP of cfg/weights (Darknet, .pt, or an exported .onnx/.xml/.param) on `data`'s
    valid split; `img_size` None: the exported model's fixed size, else the cfg's width."""

    cfg: str | os.PathLike | None
    weights: str | os.PathLike | None
    data: Any
    img_size: int | None = None
    batch_size: int = 8
    conf_thres: float = 0.001
    iou_thres: float = 0.6
    workers: int | None = None      # None: EvalConfig's default
    progress: bool = True
    letterbox: bool | None = None
    json_path: str | os.PathLike | None = None   # COCO-format detections
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.eval_config(self.img_size or 416)  # EvalConfig's rules and messages

    def eval_config(self, img_size: int) -> EvalConfig:
        return EvalConfig(img_size=img_size, batch_size=self.batch_size, conf_thres=self.conf_thres,
                          iou_thres=self.iou_thres, progress=self.progress, letterbox=self.letterbox,
                          **({} if self.workers is None else {"workers": self.workers}))


def _run_eval(job: EvalJob) -> dict:
    from compress.detection.evaluate import evaluate, save_detections
    from compress.deploy.runtimes import inference_size, load_for_inference
    model = load_for_inference(job.cfg, job.weights, job.device)
    config = job.eval_config(inference_size(model, job.cfg, job.img_size))
    result = evaluate(model, job.data, config, device=job.device)
    if job.json_path:
        save_detections(result, job.json_path)
    return {"cfg": _str(job.cfg), "weights": _str(job.weights), "data": _str(job.data), "img_size": config.img_size,
            **result.to_dict(), "pr_conf": config.pr_conf, "detections_json": _str(job.json_path)}


def _str(p: Any) -> Any:
    return str(p) if isinstance(p, os.PathLike) else p


register_job(EvalJob, JobKind("eval", _run_eval, inputs=lambda j: (j.cfg, j.weights, _data_path(j.data)),
                              outputs=lambda j: _files(("--json", j.json_path))))


@dataclass(frozen=True)
class DetectJob:
    """`yolo-compress detect`: draw boxes on `source` (an image or a folder) into `out` + detections.json.
    `names`: a class-names file (one per class of the model; default: class ids)."""

    cfg: str | os.PathLike
    weights: str | os.PathLike | None
    source: str | os.PathLike
    out: str | os.PathLike
    img_size: int | None = None
    conf_thres: float = 0.25
    iou_thres: float = 0.45
    names: str | os.PathLike | None = None
    letterbox: bool | None = None
    device: str = "cpu"


def _run_detect(job: DetectJob) -> dict:
    from compress.data.dataset import read_names
    from compress.detection.detect import DetectConfig, check_names, detect_to_dir
    from compress.darknet.persist import load
    model = load(job.cfg, job.weights, device=job.device)
    config = DetectConfig(img_size=job.img_size or model.cfg.width, conf_thres=job.conf_thres,
                          iou_thres=job.iou_thres, letterbox=job.letterbox)
    names = read_names(job.names) if job.names else [str(i) for i in range(model.num_classes)]
    check_names(names, model.num_classes, f"--names {job.names}")
    records = detect_to_dir(model, job.source, job.out, names, config, device=job.device)
    return {"cfg": _str(job.cfg), "weights": _str(job.weights), "source": _str(job.source), "out": _str(job.out),
            "images": len(records), "boxes": sum(len(r["detections"]) for r in records),
            "per_image": [{"image": r["image"], "boxes": len(r["detections"]),
                           "classes": sorted({d["name"] for d in r["detections"]})} for r in records]}


register_job(DetectJob, JobKind("detect", _run_detect, inputs=lambda j: (j.cfg, j.weights, j.source, j.names),
                                outputs=lambda j: (Output(Path(j.out), "dir", "--out"),), out_dir=lambda j: j.out))


@dataclass(frozen=True)
class ExportJob:
    """`yolo-compress export`: `out` is the .onnx file, or the folder for openvino/ncnn."""

    cfg: str | os.PathLike
    weights: str | os.PathLike | None
    out: str | os.PathLike
    config: ExportConfig = field(default_factory=ExportConfig)


def _run_export(job: ExportJob) -> dict:
    from compress.deploy.export import export
    from compress.darknet.persist import load
    result = export(load(job.cfg, job.weights), job.out, job.config)
    return {"cfg": _str(job.cfg), "weights": _str(job.weights), **result.to_dict()}


register_job(ExportJob, JobKind(
    "export", _run_export, inputs=lambda j: (j.cfg, j.weights, *j.config.check_images),
    outputs=lambda j: (Output(Path(j.out), "file" if j.config.format == "onnx" else "any", "--out"),)))


@dataclass(frozen=True)
class AnchorsJob:
    """`yolo-compress anchors`: k-means anchors of `data`'s label boxes."""

    data: Any
    config: AnchorConfig = field(default_factory=AnchorConfig)


def _run_anchors(job: AnchorsJob) -> dict:
    from compress.detection.anchors import compute_anchors
    result = compute_anchors(job.data, job.config)
    return {"data": _str(job.data), "n": job.config.n, "img_size": job.config.img_size, **result.to_dict()}


register_job(AnchorsJob, JobKind("anchors", _run_anchors, inputs=lambda j: (_data_path(j.data),),
                                 outputs=lambda j: ()))


@dataclass(frozen=True)
class SynthJob:
    """`yolo-compress data synth`: a deterministic synthetic dataset (circle, square, triangle) in `out`."""

    out: str | os.PathLike
    n_train: int = 192
    n_valid: int = 48
    img_size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_train < 1 or self.n_valid < 1 or self.img_size < 32:
            raise DataError(f"data synth needs n_train, n_valid >= 1 and img_size >= 32, got {self.n_train}, "
                            f"{self.n_valid}, {self.img_size}")


def _run_synth(job: SynthJob) -> dict:
    from compress.data.synth import SYNTH_NAMES, synthesize
    data = synthesize(job.out, n_train=job.n_train, n_valid=job.n_valid, img_size=job.img_size, seed=job.seed)
    return {"data": str(data), "n_train": job.n_train, "n_valid": job.n_valid, "img_size": job.img_size,
            "seed": job.seed, "names": list(SYNTH_NAMES)}


register_job(SynthJob, JobKind("data synth", _run_synth, inputs=lambda j: (),
                               outputs=lambda j: (Output(Path(j.out), "dir", "--out"),), out_dir=lambda j: j.out))


def _run_convert(job: ConvertConfig) -> dict:
    from compress.data.convert import convert
    return convert(job).to_dict()


# ConvertConfig is already the convert command's frozen job (source format, src, out, split, images, names).
register_job(ConvertConfig, JobKind("data convert", _run_convert, inputs=lambda j: (j.src, j.images, j.names),
                                    outputs=lambda j: (Output(Path(j.out), "dir", "--out"),),
                                    out_dir=lambda j: j.out))


@dataclass(frozen=True)
class RecipeJob:
    """`yolo-compress run`: a recipe's steps. `commands` maps a step name to its click command (the CLI passes
    its own tree); the output folder is `config.out`, else the recipe's `out:`, else runs/<recipe name>."""

    config: Any                          # compress.recipe.RunConfig
    commands: Callable[[str], Any]
    context_obj: object = None

    @property
    def dry_run(self) -> bool:
        return bool(self.config.dry_run)

    @property
    def exist_ok(self) -> bool:
        return bool(self.config.exist_ok)


def _run_recipe(job: RecipeJob) -> dict:
    from compress.recipe import Plan, render_commands, run_plan
    result = run_plan(job.config, job.commands, job.context_obj)
    if isinstance(result, Plan):
        return {"dry_run": True, "out": str(result.out), "commands": render_commands(result)}
    from compress.recipe import stage_rows
    return {"out": str(result.plan.out), "wall_s": round(result.seconds, 2), "stages": stage_rows(result),
            "steps": len(result.records)}


def _recipe_out(job: RecipeJob) -> Path:
    from compress.recipe import out_dir
    return out_dir(job.config)


register_job(RecipeJob, JobKind("run", _run_recipe, inputs=lambda j: (j.config.recipe,),
                                outputs=lambda j: (Output(_recipe_out(j), "dir", "--out"),),
                                resume_marker="manifest.json"))
