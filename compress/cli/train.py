"""`yolo-compress train`: plain training / fine-tuning (single process or under torchrun)."""
from __future__ import annotations

import os
from typing import Any

import click
from click.core import ParameterSource

from compress.darknet.cfg import read_cfg
from compress.jobs import TrainJob
from compress.detection.losses import LOSSES
from compress.darknet.summary import format_stage_table
from compress.train import DistConfig
from compress.train.hyp import resolve_train_config
from compress.train.optim import SCHEDULERS
from compress.cli import cli
from compress.cli.common import val_option
from compress.cli.common import (FIT_OPTION_NAMES, device_option, exist_ok_option, fit_options, model_options, out_option,
                     report_option, run)

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
@click.option("--loss", type=click.Choice(sorted(LOSSES)), help="Detection loss: darknet (the cfg's [yolo] keys, as "
              "Darknet trains) or v5 (Ultralytics). Default: darknet when fine-tuning --weights, else v5.")
@click.option("--hyp", "hyp_path", type=click.Path(exists=True, dir_okay=False),
              help="YAML of hyper-parameters (Ultralytics keys: lr0, lrf, momentum, weight_decay, warmup_epochs, "
                   "box, obj, cls, hsv_h, scale, mosaic, ...; also freeze_bn_stats, bn_momentum).")
@report_option
@exist_ok_option
def train_command(cfg: str, weights: str | None, data: str, val: str | None, out: str, scheduler: str, device: str,
                  resume: bool, no_ema: bool, amp: bool, accumulate: int, no_augment: bool, eval_every: int,
                  cutoff: int | None, loss: str | None, hyp_path: str | None, report_path: str | None,
                  exist_ok: bool, **fit: Any) -> None:
    """Train or fine-tune a Darknet model; the best model (by mAP@0.5) is OUT/best.cfg + best.weights.

    With --weights (fine-tuning) the defaults change to protect the pretrained model: a small lr0, no
    warm-up, BatchNorm statistics frozen (see the README); options you type and --hyp keys win over them."""
    values = {k: fit.pop(k) for k in FIT_OPTION_NAMES}
    values["img_size"] = values["img_size"] or read_cfg(cfg).width
    mosaic = fit.pop("mosaic")
    if mosaic is not None:
        values["mosaic"] = mosaic
    values.update(scheduler=scheduler, resume=resume, ema=not no_ema, amp=amp, accumulate=accumulate,
                  augment=not no_augment, eval_every=eval_every)
    if loss:
        values["loss"] = loss
    ctx = click.get_current_context()
    explicit = {k for k in ctx.params if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
    config = resolve_train_config(values, explicit, hyp_path, pretrained=weights is not None and cutoff is None)
    dist, device = dist_from_env(device)
    report = run(TrainJob(cfg, weights, data, out, config, device, cutoff, dist, val=val, hyp=hyp_path),
                 report_path, exist_ok)
    if report:
        click.echo(format_stage_table([report], TABLE_KEYS))

