"""`yolo-compress eval | detect | anchors | data synth | data convert`: accuracy, inference, anchors, data."""
from __future__ import annotations

from typing import Any

import click
from tabulate import tabulate

from compress.base.checks import SEED
from compress.cli.common import (DATA_HELP, device_option, exist_ok_option, letterbox_option, model_options,
                                 report_option, run)
from compress.cli.group import cli
from compress.data.convert import CONVERTERS
from compress.jobs import AnchorsJob, ConvertJob, DetectJob, EvalJob, SplitJob, SynthJob

_DATA = click.option("--data", required=True, type=click.Path(exists=True),
                     help=f"{DATA_HELP} (eval: its valid split).")


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
def eval_command(report_path: str | None, **options: Any) -> None:
    """mAP@0.5, mAP@0.5:0.95 (pycocotools), P/R at conf 0.25 and per-class AP on a dataset."""
    r = run(EvalJob, options, report_path)
    rows = [[c["name"], c["instances"], _fmt(c["ap50"]), _fmt(c["ap50_95"])] for c in r["per_class"] if c["instances"]]
    click.echo(tabulate(rows + [["all", r["instances"], _fmt(r["map50"]), _fmt(r["map50_95"])]], tablefmt="github",
                        headers=["class", "instances", "AP@0.5", "AP@0.5:0.95"]))
    t = r["timing_ms"]
    click.echo(f"\n{r['images']} images at {r['img_size']}: mAP@0.5 {r['map50']:.4f}, mAP@0.5:0.95 "
               f"{r['map50_95']:.4f}, P {r['precision']:.3f} R {r['recall']:.3f} (conf {r['pr_conf']}); "
               f"ms/img: pre {t['preprocess']:.1f}, infer {t['inference']:.1f}, nms {t['nms']:.1f}")
    if options["json_path"]:
        click.echo(f"detections -> {options['json_path']}")


@cli.command("detect")
@model_options()
@click.option("--source", required=True, type=click.Path(exists=True), help="An image or a folder of images.")
@click.option("--out", type=click.Path(), required=True,
              help="Folder for drawn images + detections.json, or (one --source image) an image file: PNG or "
                   "JPEG by its name (.png, .jpg, .jpeg).")
@click.option("--img-size", type=click.IntRange(32, 4096), help="Square input size; default: the cfg's width.")
@click.option("--conf-thres", type=click.FloatRange(0, 1), default=0.25, show_default=True)
@click.option("--iou-thres", type=click.FloatRange(0, 1), default=0.45, show_default=True, help="NMS IoU.")
@click.option("--names", type=click.Path(exists=True, dir_okay=False),
              help="Class names file, one line per class of the model (default: class ids).")
@letterbox_option
@report_option
@device_option
@exist_ok_option
def detect_command(report_path: str | None, exist_ok: bool, **options: Any) -> None:
    """Draw labelled boxes on images (Darknet pair or an exported model, as eval); writes the images and
    detections.json to --out, or one image file."""
    r = run(DetectJob, options, report_path, exist_ok)
    click.echo(tabulate([[i["image"], i["boxes"], ", ".join(i["classes"])] for i in r["per_image"]],
                        tablefmt="github", headers=["image", "boxes", "classes"]))
    click.echo(f"\n{r['images']} images -> {options['out']}")


@cli.command("anchors")
@_DATA
@click.option("--n", type=click.IntRange(1), default=9, show_default=True, help="Number of anchors.")
@click.option("--img-size", type=click.IntRange(32, 4096), default=416, show_default=True)
@click.option("--split", type=click.Choice(["train", "valid"]), default="train", show_default=True)
@click.option("--seed", type=click.IntRange(*SEED), default=0, show_default=True)
@report_option
def anchors_command(report_path: str | None, **options: Any) -> None:
    """k-means anchors (1 - IoU distance) of the label boxes, printed in cfg syntax."""
    r = run(AnchorsJob, options, report_path)
    click.echo(tabulate([[i, f"{w:.1f}", f"{h:.1f}"] for i, (w, h) in enumerate(r["anchors"])],
                        tablefmt="github", headers=["anchor", "w", "h"]))
    click.echo(f"\nanchors = {r['anchors_cfg']}\nmean best IoU {r['mean_iou']:.4f} over {r['boxes']} boxes")


@cli.group("data")
def data_group() -> None:
    """Dataset tools."""


@data_group.command("synth")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output folder.")
@click.option("--n-train", type=click.IntRange(1), default=192, show_default=True)
@click.option("--n-valid", type=click.IntRange(1), default=48, show_default=True)
@click.option("--img-size", type=click.IntRange(32, 4096), default=128, show_default=True)
@click.option("--seed", type=click.IntRange(*SEED), default=0, show_default=True)
@report_option
@exist_ok_option
def synth_command(report_path: str | None, exist_ok: bool, **options: Any) -> None:
    """Write a deterministic synthetic dataset (circle, square, triangle) with a synth.data file."""
    r = run(SynthJob, options, report_path, exist_ok)
    click.echo(tabulate([["train", r["n_train"]], ["valid", r["n_valid"]], ["img_size", r["img_size"]],
                         ["data", r["data"]]], tablefmt="github", headers=["synth", "value"]))


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
@exist_ok_option
def convert_command(report_path: str | None, exist_ok: bool, **options: Any) -> None:
    """Convert a COCO json or Pascal VOC xml dataset into images/ + labels/ + a .data file."""
    r = run(ConvertJob, options, report_path, exist_ok)
    click.echo(tabulate([["images", r["images"]], ["boxes", r["boxes"]], ["classes", r["classes"]]]
                        + [[f"skipped {k}", v] for k, v in r["skipped"].items()]
                        + [[f"kept {k}", v] for k, v in r["kept"].items()],
                        tablefmt="github", headers=[options["split"], "count"]))
    click.echo(f"\n-> {r['data']}")


@data_group.command("split")
@click.option("--data", required=True, type=click.Path(exists=True),
              help="The images to split: a folder of images + labels, a .data or a data.yaml (its train split).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output folder.")
@click.option("--holdout-every", type=click.IntRange(2), default=4, show_default=True,
              help="Hold out every N-th image (sorted by file name, index % N == 0): 4 = COCO128 96/32.")
@report_option
@exist_ok_option
def split_command(report_path: str | None, exist_ok: bool, **options: Any) -> None:
    """A fixed hold-out split: OUT/split.data (train on the rest, validate on the held-out images), OUT/all.data."""
    r = run(SplitJob, options, report_path, exist_ok)
    click.echo(tabulate([["train", r["n_train"]], ["held out (valid)", r["n_valid"]]], tablefmt="github",
                        headers=["split", "images"]))
    click.echo(f"\n-> {r['data']} (all images: {r['data_all']})")
