"""`yolo-compress train`: plain training / fine-tuning (single process or under torchrun)."""
from __future__ import annotations

from typing import Any

import click

from compress.cli.common import (DATA_HELP, device_option, exist_ok_option, fit_options, hyp_option, model_options, out_option,
                                 report_option, run, val_option)
from compress.cli.group import cli
from compress.darknet.summary import format_stage_table
from compress.jobs import TrainJob
from compress.train.optim import SCHEDULERS

TABLE_KEYS = [("epochs", "epochs"), ("final_loss", "final loss"), ("map50", "mAP@0.5"),
              ("map50_95", "mAP@0.5:0.95"), ("params", "params"), ("gflops", "GFLOPs"), ("size_mb", "MB"),
              ("weights", "weights")]


@cli.command("train")
@model_options()
@click.option("--data", required=True, type=click.Path(exists=True), help=f"{DATA_HELP}.")
@val_option
@out_option(help="Output directory: best/last .cfg+.weights, last.pt, results.csv/png, report.json.")
@fit_options(TrainJob)
@click.option("--scheduler", default="cosine", show_default=True, type=click.Choice(sorted(SCHEDULERS)))
@device_option
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out from last.pt.")
@click.option("--no-ema", is_flag=True, help="Save/evaluate the raw weights instead of their moving average.")
@click.option("--amp", is_flag=True, help="Mixed precision (CUDA only; ignored on CPU).")
@click.option("--accumulate", default=1, show_default=True, type=click.IntRange(1), help="Batches per step.")
@click.option("--no-augment", is_flag=True, help="Train on un-augmented images (input geometry only).")
@click.option("--eval-every", default=1, show_default=True, type=click.IntRange(1), help="Epochs between evals.")
@click.option("--cutoff", type=click.IntRange(1), help="Load weights of the first N layers only (transfer).")
@hyp_option
@report_option
@exist_ok_option
def train_command(report_path: str | None, exist_ok: bool, **options: Any) -> None:
    """Train or fine-tune a Darknet model; the best model (by mAP@0.5) is OUT/best.cfg + best.weights.

    With --weights (fine-tuning) the defaults change to protect the pretrained model: a small lr0, no
    warm-up, BatchNorm statistics frozen (see the README); options you type and --hyp keys win over them."""
    report = run(TrainJob, options, report_path, exist_ok)
    if report.is_main:
        click.echo(format_stage_table([report.to_dict()], TABLE_KEYS))
