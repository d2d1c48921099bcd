"""`yolo-compress export`: the decoded model as ONNX, OpenVINO IR or ncnn, checked in its runtime against torch."""
from __future__ import annotations

from typing import Any

import click
from tabulate import tabulate

from compress.cli.common import exist_ok_option, model_options, report_option, run
from compress.cli.group import cli
from compress.deploy.export import FORMATS, SUPPORTED_OPSETS
from compress.jobs import ExportJob


@cli.command("export")
@model_options()
@click.option("--format", "format", type=click.Choice(FORMATS), default="onnx", show_default=True,
              help="onnx: one file; openvino (model.xml + .bin) and ncnn (model.param + .bin): a folder.")
@click.option("--out", type=click.Path(), required=True, help="model.onnx, or the folder for openvino/ncnn.")
@click.option("--img-size", type=click.IntRange(32, 4096), help="Input size (square); default: the cfg's.")
@click.option("--dynamic", is_flag=True, help="Batch, height and width free (onnx, openvino).")
@click.option("--dynamic-batch", is_flag=True, help="Only the batch axis free (H, W fixed).")
@click.option("--simplify", is_flag=True, help="Simplify the ONNX graph with onnxslim first.")
@click.option("--half", is_flag=True, help="fp16: ONNX a float16 graph (fp32 input/output and decode; for GPUs/ARM, "
              "slower than fp32 on x86 CPUs); openvino/ncnn fp16 weights.")
@click.option("--nms", is_flag=True, help="End-to-end graph: NonMaxSuppression inside; outputs boxes (x1y1x2y2 "
              "px), scores, classes, num_dets (onnx, openvino).")
@click.option("--iou-thres", type=click.FloatRange(0, 1), default=0.45, show_default=True, help="--nms IoU.")
@click.option("--score-thres", type=click.FloatRange(0, 1), default=0.25, show_default=True,
              help="--nms: smallest objectness * class score kept.")
@click.option("--max-det", type=click.IntRange(1), default=100, show_default=True, help="--nms: boxes per image.")
@click.option("--opset", type=click.IntRange(SUPPORTED_OPSETS.start, SUPPORTED_OPSETS.stop - 1), default=17,
              show_default=True, help="ONNX opset (13 and 17 are tested).")
@click.option("--check/--no-check", "runtime_check", default=True, show_default=True,
              help="Run the written model in its runtime and fail if it differs from torch "
                   "(boxes > 1 px or scores > 0.01; with --half 3 px / 0.05).")
@click.option("--check-image", "check_images", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Also check on this image (repeatable); a random image rarely has detections for --nms.")
@report_option
@exist_ok_option
def export_command(report_path: str | None, exist_ok: bool, **options: Any) -> None:
    """Export the eval-mode model (boxes in pixels, sigmoid scores): input `images`, output `output`."""
    figures = run(ExportJob, options, report_path, exist_ok).to_dict()
    shown = {k: v for k, v in figures.items() if v is not None and k not in ("files", "onnx")}
    click.echo(tabulate(list(shown.items()), tablefmt="github", headers=["export", "value"]))
