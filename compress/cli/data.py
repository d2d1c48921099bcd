"""`yolo-compress eval | detect | anchors | data synth | data convert`: accuracy, inference, anchors, data."""
from __future__ import annotations

import click
from tabulate import tabulate

from ..anchors import AnchorConfig, compute_anchors
from ..convert import CONVERTERS, ConvertConfig, convert
from ..data import read_names
from ..detect import DetectConfig, check_names, detect_to_dir
from ..evaluate import EvalConfig, evaluate, save_detections
from ..persist import load
from ..runtimes import inference_size, load_for_inference
from ..synth import synthesize
from . import cli
from .common import check_not_input, device_option, letterbox_option, model_options, report_option, write_report

_DATA = click.option("--data", required=True, type=click.Path(exists=True),
                     help="Darknet .data, Ultralytics data.yaml (its valid split is used) or a folder of images "
                          "+ labels.")


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


@cli.command("eval")
@model_options()
@_DATA
@click.option("--img-size", type=click.IntRange(32, 4096), help="Square input size; default: the cfg's width.")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--conf-thres", type=click.FloatRange(0, 1), default=0.001, show_default=True)
@click.option("--iou-thres", type=click.FloatRange(0, 1), default=0.6, show_default=True, help="NMS IoU.")
@click.option("--workers", type=click.IntRange(0), help="Data-loading processes (default: min(2, CPUs)).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write COCO-format detections here.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@letterbox_option
@report_option
@device_option
def eval_command(cfg, weights, data, img_size, batch_size, conf_thres, iou_thres, workers, json_path,
                 no_progress, letterbox, report_path, device) -> None:
    """mAP@0.5, mAP@0.5:0.95 (pycocotools), P/R at conf 0.25 and per-class AP on a dataset."""
    check_not_input([p for p in (json_path, report_path) if p], [cfg, weights])
    model = load_for_inference(cfg, weights, device)  # Darknet/.pt, or .onnx/.xml/.param in their runtime
    config = EvalConfig(img_size=inference_size(model, cfg, img_size), batch_size=batch_size,
                        conf_thres=conf_thres, iou_thres=iou_thres, progress=not no_progress, letterbox=letterbox,
                        **({} if workers is None else {"workers": workers}))
    result = evaluate(model, data, config, device=device)
    click.echo(tabulate([[n, i, _fmt(a), _fmt(b)] for n, i, a, b in result.table()], tablefmt="github",
                        headers=["class", "instances", "AP@0.5", "AP@0.5:0.95"]))
    t = result.timing_ms
    click.echo(f"\n{result.images} images at {config.img_size}: mAP@0.5 {result.map50:.4f}, mAP@0.5:0.95 "
               f"{result.map50_95:.4f}, P {result.precision:.3f} R {result.recall:.3f} (conf {config.pr_conf}); "
               f"ms/img: pre {t['preprocess']:.1f}, infer {t['inference']:.1f}, nms {t['nms']:.1f}")
    if json_path:
        click.echo(f"detections -> {save_detections(result, json_path)}")
    write_report(report_path, {"cfg": cfg, "weights": weights, "data": data, "img_size": config.img_size,
                               **result.to_dict()})


@cli.command("detect")
@model_options()
@click.option("--source", required=True, type=click.Path(exists=True), help="An image or a folder of images.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder for drawn images + detections.json.")
@click.option("--img-size", type=click.IntRange(32, 4096), help="Square input size; default: the cfg's width.")
@click.option("--conf-thres", type=click.FloatRange(0, 1), default=0.25, show_default=True)
@click.option("--iou-thres", type=click.FloatRange(0, 1), default=0.45, show_default=True, help="NMS IoU.")
@click.option("--names", type=click.Path(exists=True, dir_okay=False),
              help="Class names file, one line per class of the model (default: class ids).")
@letterbox_option
@report_option
@device_option
def detect_command(cfg, weights, source, out, img_size, conf_thres, iou_thres, names, letterbox, report_path,
                   device) -> None:
    """Draw labelled boxes on images; writes the images and detections.json to --out."""
    model = load(cfg, weights, device=device)
    config = DetectConfig(img_size=img_size or model.cfg.width, conf_thres=conf_thres, iou_thres=iou_thres,
                          letterbox=letterbox)
    class_names = read_names(names) if names else [str(i) for i in range(model.num_classes)]
    check_names(class_names, model.num_classes, f"--names {names}")
    records = detect_to_dir(model, source, out, class_names, config, device=device)
    click.echo(tabulate([[r["image"], len(r["detections"]),
                          ", ".join(sorted({d["name"] for d in r["detections"]}))] for r in records],
                        tablefmt="github", headers=["image", "boxes", "classes"]))
    click.echo(f"\n{len(records)} images -> {out}")
    write_report(report_path, {"cfg": cfg, "weights": weights, "source": source, "out": out,
                               "images": len(records), "boxes": sum(len(r["detections"]) for r in records)})


@cli.command("anchors")
@_DATA
@click.option("--n", type=click.IntRange(1), default=9, show_default=True, help="Number of anchors.")
@click.option("--img-size", type=click.IntRange(32, 4096), default=416, show_default=True)
@click.option("--split", type=click.Choice(["train", "valid"]), default="train", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@report_option
def anchors_command(data, n, img_size, split, seed, report_path) -> None:
    """k-means anchors (1 - IoU distance) of the label boxes, printed in cfg syntax."""
    result = compute_anchors(data, AnchorConfig(n=n, img_size=img_size, seed=seed, split=split))
    click.echo(tabulate([[i, f"{w:.1f}", f"{h:.1f}"] for i, (w, h) in enumerate(result.anchors)],
                        tablefmt="github", headers=["anchor", "w", "h"]))
    click.echo(f"\n{result.cfg_line()}\nmean best IoU {result.mean_iou:.4f} over {result.boxes} boxes")
    write_report(report_path, {"data": data, "n": n, "img_size": img_size, **result.to_dict()})


@cli.group("data")
def data_group() -> None:
    """Dataset tools."""


@data_group.command("synth")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output folder.")
@click.option("--n-train", type=click.IntRange(1), default=192, show_default=True)
@click.option("--n-valid", type=click.IntRange(1), default=48, show_default=True)
@click.option("--img-size", type=click.IntRange(32, 4096), default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@report_option
def synth_command(out, n_train, n_valid, img_size, seed, report_path) -> None:
    """Write a deterministic synthetic dataset (circle, square, triangle) with a synth.data file."""
    data = synthesize(out, n_train=n_train, n_valid=n_valid, img_size=img_size, seed=seed)
    click.echo(tabulate([["train", n_train], ["valid", n_valid], ["img_size", img_size], ["data", data]],
                        tablefmt="github", headers=["synth", "value"]))
    write_report(report_path, {"data": str(data), "n_train": n_train, "n_valid": n_valid, "img_size": img_size,
                               "seed": seed, "names": ["circle", "square", "triangle"]})


@data_group.command("convert")
@click.option("--from", "source", type=click.Choice(sorted(CONVERTERS)), required=True, help="Input format.")
@click.option("--src", type=click.Path(exists=True), required=True,
              help="COCO: the instances json; VOC: the year folder (Annotations/, JPEGImages/, ImageSets/).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output dataset folder.")
@click.option("--split", type=click.Choice(["train", "valid"]), default="train", show_default=True,
              help="Which split this source is (run again with the other one to add it).")
@click.option("--images", type=click.Path(exists=True, file_okay=False),
              help="COCO: the image folder (default: images/ beside the json, or the json's folder).")
@click.option("--names", type=click.Path(exists=True, dir_okay=False),
              help="Class order (one name a line); default: COCO categories by id, VOC names sorted.")
@click.option("--copy", is_flag=True, help="Copy the images instead of symlinking them.")
@report_option
def convert_command(source, src, out, split, images, names, copy, report_path) -> None:
    """Convert a COCO json or Pascal VOC xml dataset into images/ + labels/ + a .data file."""
    from pathlib import Path
    config = ConvertConfig(source, Path(src), Path(out), split, Path(images) if images else None,
                           Path(names) if names else None, copy)
    result = convert(config)
    click.echo(tabulate([["images", result.images], ["boxes", result.boxes], ["classes", len(result.names)]]
                        + [[f"skipped {k}", v] for k, v in sorted(result.skipped.items())],
                        tablefmt="github", headers=[split, "count"]))
    click.echo(f"\n-> {result.data}")
    write_report(report_path, result.to_dict())
