"""`yolo-compress distill`: fine-tune a student with knowledge distilled from a teacher (strategies 1-5)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..distill import STRATEGIES, DistillConfig, DistillResult, distill, parse_pairs
from ..persist import load
from ..report import format_stage_table
from . import cli
from .common import training_data, val_option
from .common import (check_not_input, device_option, fit_config, fit_options, model_options, out_option,
                     report_option, write_report)

ROWS = [("run", "run"), ("map50", "mAP@0.5"), ("map50_95", "mAP@0.5:0.95")]


@cli.command("distill")
@model_options()
@click.option("--t_cfg", "--t-cfg", "t_cfg", type=click.Path(exists=True, dir_okay=False), required=True,
              help="Teacher cfg (same classes as the student).")
@click.option("--t_weights", "--t-weights", "t_weights", type=click.Path(exists=True, dir_okay=False),
              required=True, help="Teacher weights (.weights or .pt).")
@click.option("--data", type=click.Path(exists=True), required=True, help="Darknet .data file or image folder.")
@val_option
@out_option()
@click.option("--kd", "--KDstr", "kd", type=click.Choice([str(k) for k in sorted(STRATEGIES)]), default="3",
              show_default=True, help="1 logits, 2 +teacher-bounded box, 3 +box mimic, 4 +attention, 5 +GT-masked.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=3.0, show_default=True)
@fit_options(epochs=30)
@click.option("--baseline", is_flag=True, help="Also train without KD (same epochs and seed) and report both.")
@click.option("--pairs", help="Feature pairs 'student:teacher,...' for --kd 4/5 (default: one per stride).")
@click.option("--w-soft", type=click.FloatRange(0), help="Logit-KD weight (default: the strategy's reference).")
@click.option("--w-box", type=click.FloatRange(0), help="Box-KD weight (default: the strategy's reference).")
@click.option("--w-feat", type=click.FloatRange(0), help="Feature-KD weight (default: the strategy's reference).")
@click.option("--reference-kd1", is_flag=True, help="--kd 1 softmaxes box logits too, like the reference.")
@device_option
@report_option
def distill_command(cfg: str, weights: str | None, t_cfg: str, t_weights: str, data: str, val: str | None,
                    out: str, kd: str,
                    temperature: float, baseline: bool, pairs: str | None, w_soft: float | None,
                    w_box: float | None, w_feat: float | None, reference_kd1: bool, device: str,
                    report_path: str | None, **fit: Any) -> None:
    """Fine-tune --cfg/--weights with a --t_cfg/--t_weights teacher; writes OUT/distilled.cfg/.weights."""
    check_not_input([Path(out) / "distilled.cfg", Path(out) / "distilled.weights"], [cfg, weights, t_cfg, t_weights])
    config = DistillConfig(strategy=int(kd), temperature=temperature, w_soft=w_soft, w_box=w_box, w_feat=w_feat,
                           pairs=parse_pairs(pairs), baseline=baseline, reference_kd1=reference_kd1)
    student, teacher = load(cfg, weights, device=device), load(t_cfg, t_weights, device=device)
    train = fit_config(cfg, fit)
    result = distill(student, teacher, training_data(data, val), config, train, device, out)
    _echo(result)
    figures = result.to_dict()
    write_report(Path(out) / "report.json", figures)
    write_report(report_path, figures)


def _echo(result: DistillResult) -> None:
    d = result.to_dict()
    rows = [{"run": f"KD strategy {d['strategy']}", "map50": d["map50_kd"], "map50_95": d["map50_95_kd"]}]
    if result.baseline is not None:
        rows.append({"run": "no KD (baseline)", "map50": d["map50_baseline"], "map50_95": d["map50_95_baseline"]})
    click.echo(format_stage_table(rows, ROWS))
    click.echo(f"\ndistilled student -> {d['cfg']}, {d['weights']}")
