"""`yolo-compress train`: plain training / fine-tuning (single process or under torchrun)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from ..report import format_stage_table
from ..train import DistConfig, train_model
from ..train.optim import SCHEDULERS
from . import cli
from .common import training_data, val_option
from .common import (check_not_input, device_option, fit_config, fit_options, model_options, out_option,
                     report_option, write_report)

TABLE_KEYS = [("epochs", "epochs"), ("final_loss", "final loss"), ("map50", "mAP@0.5"),
              ("map50_95", "mAP@0.5:0.95"), ("params", "params"), ("gflops", "GFLOPs"), ("size_mb", "MB"),
              ("weights", "weights")]


def dist_from_env(device: str) -> tuple[DistConfig | None, str]:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; the CLI is the only env reader."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None, device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    init = f"tcp://{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ.get('MASTER_PORT', '29500')}"
    dist = DistConfig(rank=int(os.environ["RANK"]), world_size=world, local_rank=local, init_method=init)
    return dist, (f"cuda:{local}" if device == "cuda" else device)


@cli.command("train")
@model_options()
@click.option("--data", required=True, type=click.Path(exists=True), help="Darknet .data file or image folder.")
@val_option
@out_option(help="Output directory: best/last .cfg+.weights, last.pt, results.csv/png, report.json.")
@fit_options()
@click.option("--scheduler", default="cosine", show_default=True, type=click.Choice(sorted(SCHEDULERS)))
@device_option
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out from last.pt.")
@click.option("--no-ema", is_flag=True, help="Save/evaluate the raw weights instead of their moving average.")
@click.option("--amp", is_flag=True, help="Mixed precision (CUDA only; ignored on CPU).")
@click.option("--accumulate", default=1, show_default=True, type=click.IntRange(1), help="Batches per step.")
@click.option("--no-augment", is_flag=True, help="Train on un-augmented images (input geometry only).")
@click.option("--eval-every", default=1, show_default=True, type=click.IntRange(1), help="Epochs between evals.")
@click.option("--cutoff", type=click.IntRange(1), help="Load weights of the first N layers only (transfer).")
@report_option
def train_command(cfg: str, weights: str | None, data: str, val: str | None, out: str, scheduler: str, device: str, resume: bool,
                  no_ema: bool, amp: bool, accumulate: int, no_augment: bool, eval_every: int, cutoff: int | None,
                  report_path: str | None, **fit: Any) -> None:
    """Train or fine-tune a Darknet model; the best model (by mAP@0.5) is OUT/best.cfg + best.weights."""
    check_not_input([Path(out) / f"{n}.{e}" for n in ("best", "last") for e in ("cfg", "weights")], [cfg, weights])
    config = fit_config(cfg, fit, scheduler=scheduler, resume=resume, ema=not no_ema, amp=amp,
                        accumulate=accumulate, augment=not no_augment, eval_every=eval_every)
    dist, device = dist_from_env(device)
    result, report = train_model(cfg, weights, training_data(data, val), config, out, device, cutoff, dist)
    if report:
        click.echo(format_stage_table([report], TABLE_KEYS))
        write_report(report_path, report)

