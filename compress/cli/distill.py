"""`yolo-compress distill`: fine-tune a student with knowledge distilled from a teacher (strategies 1-5)."""
from __future__ import annotations

from typing import Any

import click

from compress.cli.common import (DATA_HELP, device_option, exist_ok_option, fit_options, hyp_option, model_options, out_option,
                                 report_option, run, val_option)
from compress.cli.group import cli
from compress.darknet.summary import format_stage_table
from compress.distill import DEFAULT_RATIOS, DEFAULT_STRATEGY, STRATEGIES, TERMS
from compress.distill.config import FEATURE_MODES, LOGIT_MODES
from compress.jobs import DistillJob, Report

ROWS = [("run", "run"), ("map50", "mAP@0.5"), ("map50_95", "mAP@0.5:0.95")]
SHARE_ROWS = [("epoch", "epoch"), ("det", "detection"), *[(k, k) for k in TERMS]]


@cli.command("distill")
@model_options()
@click.option("--t_cfg", "--t-cfg", "t_cfg", type=click.Path(exists=True, dir_okay=False), required=True,
              help="Teacher cfg (same classes as the student).")
@click.option("--t_weights", "--t-weights", "t_weights", type=click.Path(exists=True, dir_okay=False),
              required=True, help="Teacher weights (.weights or .pt).")
@click.option("--data", type=click.Path(exists=True), required=True, help=f"{DATA_HELP}.")
@val_option
@out_option()
@click.option("--kd", "--KDstr", "kd", type=click.Choice([str(k) for k in sorted(STRATEGIES)]),
              default=str(DEFAULT_STRATEGY), show_default=True, callback=lambda ctx, param, value: int(value),  # DistillJob.kd: an int
              help="1 logits, 2 +teacher-bounded box, 3 +box mimic, 4 +feature imitation, 5 +GT-masked "
              "feature imitation.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True),
              help="Temperature of the logit terms [default: 1; 3 with --reference].")
@click.option("--ratio-soft", type=click.FloatRange(0), help="Logit term / detection loss at the start "
              f"(calibrated weight) [default: {DEFAULT_RATIOS[0]:g}].")
@click.option("--ratio-box", type=click.FloatRange(0),
              help=f"Box term / detection loss at the start [default: {DEFAULT_RATIOS[1]:g}].")
@click.option("--ratio-feat", type=click.FloatRange(0), help="Feature term / detection loss at the start "
              f"[default: {DEFAULT_RATIOS[2]:g}].")
@click.option("--logit-kd", type=click.Choice(LOGIT_MODES), help="sigmoid: per-element binary KL (default); "
              "softmax: the reference's softmax over [obj, classes].")
@click.option("--feature-kd", type=click.Choice(FEATURE_MODES), help="fitnet: neck features through a "
              "least-squares 1x1 adapter (default); at: L2-normalised attention maps; softmax: the reference's.")
@click.option("--reference", is_flag=True, help="The reference's formulation: softmax terms at T=3, its "
              "absolute weights (no calibration) and its attention (channel sum of |F| on every conv block), for "
              "comparison.")
@fit_options(DistillJob)
@hyp_option
@click.option("--baseline", is_flag=True, help="Also train without KD (same epochs and seed) and report both.")
@click.option("--pairs", help="Feature pairs 'student:teacher,...' for --kd 4/5 (default: one per stride).")
@click.option("--w-soft", type=click.FloatRange(0), help="Fixed logit-KD weight (instead of calibration).")
@click.option("--w-box", type=click.FloatRange(0), help="Fixed box-KD weight (instead of calibration).")
@click.option("--w-feat", type=click.FloatRange(0), help="Fixed feature-KD weight (instead of calibration).")
@click.option("--reference-kd1", is_flag=True, help="--kd 1 softmaxes box logits too, like the reference.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out (OUT/kd/last.pt).")
@device_option
@report_option
@exist_ok_option
def distill_command(report_path: str | None, exist_ok: bool, **options: Any) -> None:
    """Fine-tune --cfg/--weights with a --t_cfg/--t_weights teacher; writes OUT/distilled.cfg/.weights."""
    report = run(DistillJob, options, report_path, exist_ok)
    if report.is_main:  # torchrun ranks > 0 print nothing
        _echo(report)


def _echo(d: Report) -> None:
    rows = [{"run": f"KD strategy {d['strategy']}", "map50": d["map50_kd"], "map50_95": d["map50_95_kd"]}]
    if d["map50_baseline"] is not None:
        rows.append({"run": "no KD (baseline)", "map50": d["map50_baseline"], "map50_95": d["map50_95_baseline"]})
    click.echo(format_stage_table(rows, ROWS))
    click.echo("\nKD weights: " + ", ".join(f"{k}={v:.4g}" for k, v in d["kd_weights"].items()))
    shares = [s for s in (d["kd_shares"]["first_epoch"], d["kd_shares"]["last_epoch"]) if s]
    if shares:
        click.echo("share of the training loss (first and last epoch):")
        click.echo(format_stage_table([{k: (f"{v:.1%}" if k != "epoch" else v) for k, v in s.items()}
                                       for s in shares], SHARE_ROWS))
    click.echo(f"\ndistilled student -> {d['cfg']}, {d['weights']}")
