"""`yolo-compress export`: the decoded model as ONNX, optionally checked against torch with onnxruntime."""
from __future__ import annotations

import click
from tabulate import tabulate

from ..export import SUPPORTED_OPSETS, ExportConfig, export_onnx
from ..persist import load
from . import cli
from .common import check_not_input, model_options, report_option, write_report


@cli.command("export")
@model_options()
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="ONNX file to write (model.onnx).")
@click.option("--img-size", type=click.IntRange(32, 4096), help="Input size (square); default: the cfg's.")
@click.option("--dynamic-batch", is_flag=True, help="Make the batch axis dynamic (H, W stay fixed).")
@click.option("--opset", type=click.IntRange(SUPPORTED_OPSETS.start, SUPPORTED_OPSETS.stop - 1), default=17,
              show_default=True, help="ONNX opset (13 and 17 are tested).")
@click.option("--check", is_flag=True, help="Compare onnxruntime with torch on a random input; fail if they differ.")
@report_option
def export_command(cfg: str, weights: str | None, out: str, img_size: int | None, dynamic_batch: bool, opset: int,
                   check: bool, report_path: str | None) -> None:
    """Export the eval-mode model (boxes in pixels, sigmoid scores) to ONNX: input `images`, output `output`."""
    check_not_input([out], [cfg, weights])
    config = ExportConfig(img_size=img_size, dynamic_batch=dynamic_batch, opset=opset, check=check)
    result = export_onnx(load(cfg, weights), out, config)
    figures = {"cfg": cfg, "weights": weights, **result.to_dict()}
    click.echo(tabulate([(k, v) for k, v in figures.items() if v is not None], tablefmt="github",
                        headers=["export", "value"]))
    write_report(report_path, figures)
