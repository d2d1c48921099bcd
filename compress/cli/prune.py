"""`yolo-compress prune` and `yolo-compress sparse-train`."""
from __future__ import annotations

import json
from typing import Any

import click
from tabulate import tabulate

from compress.cli.common import (DATA_HELP, device_option, exist_ok_option, fit_options, hyp_option,
                                 letterbox_option, model_options, out_option, report_option, run, val_option)
from compress.cli.group import cli
from compress.darknet.summary import format_stage_table
from compress.jobs import PruneJob, Report, SparseTrainJob
from compress.jobs.prune import SPARSITY
from compress.deploy.latency import LATENCY_RUNTIMES
from compress.prune import METHODS
from compress.prune.registry import LAYER_KEEP
from compress.prune.fade import IMPORTANCE
from compress.prune.sparsity import SCHEDULES, UPDATES

# --layer-keep's default depends on the kind of plan (registry.LAYER_KEEP): not given is None, resolved there
_LAYER_KEEP_DEFAULT = f"default {LAYER_KEEP.target} with a --target-*, else {LAYER_KEEP.percent}"

_ROWS = [("params", "params"), ("gflops", "GFLOPs"), ("size_mb", "weights MB"), ("latency_ms", "CPU latency ms"),
         ("map50", "mAP@.5"), ("map50_95", "mAP@.5:.95")]


_SPARSE_KEYS = [("params", "params"), ("gflops", "GFLOPs"), ("map50", "mAP@.5"), ("s_final", "final s"),
                ("safe_percent", "safe --percent (no layer emptied)"),
                ("near_zero_percent", "near-zero --percent (|gamma| < 1e-2 only)"),
                ("near_zero_percent_reached_epoch", "target reached (epoch)"),
                ("gflops_ratio_after_prune", "GFLOPs ratio after the planned prune"),
                ("prune_max_abs_diff", "pruned vs sparse max |diff|"), ("prune_with", "prune with")]


def _target_lines(report: Report) -> list[str]:
    """The target and, for latency, the table and the predicted / measured latency of the result."""
    target, lat = report.get("target"), report.get("latency")
    if not target:
        return []
    asked = f"{target['ratio']} x" if target["ratio"] is not None else f"{target['value']} {target['unit']}"
    lines = [f"target {target['metric']} {asked}: predicted {target['predicted_ratio']:.3f} of the unpruned model"
             + ("" if target["achieved_ratio"] is None else f", achieved {target['achieved_ratio']:.3f}")
             + f" (channel multiple {target['multiple']})"]
    if lat:
        measured = "" if lat["measured_ms"] is None else (f"; measured {lat['measured_ms']:.3f} ms vs "
                                                          f"{lat['base_ms']:.3f} ms unpruned")
        lines.append(f"{lat['runtime']} {lat['runtime_version']}, {lat['threads']} thread(s), {lat['img_size']}: "
                     f"predicted {lat['predicted_ms']:.3f} ms of {lat['table_model_ms']:.3f}{measured}; table "
                     f"{lat['table'] or '(not kept)'}{' (measured now)' if lat['table_measured'] else ''}")
    return lines


def _before_after(report: Report) -> str:
    rows = [{"figure": head, "before": report[f"{k}_before"], "after": report[f"{k}_after"]} for k, head in _ROWS]
    return format_stage_table(rows, [("figure", "figure"), ("before", "before"), ("after", "after")])


@cli.command("prune")
@model_options(weights_required=False)
@out_option()
@click.option("--method", type=click.Choice(sorted(METHODS)), default="slim", show_default=True,
              help="Pruning method (see README).")
@click.option("--percent", "--global_percent", "percent", type=click.FloatRange(0, 1, max_open=True), default=0.5,
              show_default=True, help="Share of prunable BN channels to cut (global |gamma| threshold).")
@click.option("--shortcuts", type=click.IntRange(0), default=0, help="Residual blocks to remove (layer methods).")
@click.option("--round-to", type=click.IntRange(1), help="Round kept channels up to a multiple (default 8: SIMD-friendly widths; 1: the "
              "reference's exact widths).")
@click.option("--min-keep", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Per-layer floor (fraction of width); 0 = normal/shortcut refuse to empty a layer.")
@click.option("--layer-keep", "--layer_keep", "layer_keep", type=click.FloatRange(0, 1), default=None,
              help=f"Per-layer floor of slim / torch-pruning and of a target search (fraction of width; "
                   f"{_LAYER_KEEP_DEFAULT}).")
@click.option("--no-compensate", is_flag=True, help="Do not fold removed channels' act(beta) into consumers.")
@click.option("--data", type=click.Path(exists=True), help=f"Evaluate mAP before/after on this ({DATA_HELP}).")
@click.option("--img-size", type=click.IntRange(32, 4096), help="Size for figures/eval (default: the cfg's).")
@letterbox_option
@click.option("--dry-run", is_flag=True, help="Print the per-layer channel table (a target's plan); write nothing.")
@click.option("--latency", is_flag=True, help="Also measure CPU latency before/after (median of 5 runs each).")
@click.option("--target-latency", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Instead of --percent: prune to this ratio of the latency measured on --runtime.")
@click.option("--target-ms", type=click.FloatRange(0, min_open=True),
              help="Instead of --percent: prune to this many ms on --runtime.")
@click.option("--target-flops", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Instead of --percent: prune to this ratio of the FLOPs.")
@click.option("--target-params", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Instead of --percent: prune to this ratio of the parameters.")
@click.option("--threshold", type=click.FloatRange(0),
              help="Instead of --percent: cut every channel whose score (slim: |gamma|) is <= this; 0 cuts exactly "
                   "what `sparse-train --sparsity fade` zeroed.")
@click.option("--runtime", type=click.Choice(list(LATENCY_RUNTIMES)), default="onnxruntime", show_default=True,
              help="Runtime whose latency a latency target is measured on.")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True,
              help="Threads of --runtime for the latency target.")
@click.option("--latency-table", type=click.Path(dir_okay=False),
              help="Per-layer latency table JSON: reused when it holds this machine/runtime/threads/size/model, "
                   "else measured and added (default: OUT/latency_table.json).")
@click.option("--refine", type=click.IntRange(0), default=2, show_default=True,
              help="Re-plan a latency target up to N times from the measured latency of the result.")
@click.option("--remove-units/--keep-units", default=PruneJob.remove_units, show_default=True,
              help="When channel widths alone cannot reach a latency target, remove the fewest residual units "
                   "(the `layer` method's order) first; --keep-units: widths only (the narrowest plan when out "
                   "of reach).")
@click.option("--bn-adapt", type=click.IntRange(0), default=PruneJob.bn_adapt, show_default=True,
              help="Re-estimate the pruned model's BN statistics on this many batches of --data's training "
                   "images (0: off; without --data: not done).")
@click.option("--reconstruct", type=click.IntRange(0), default=PruneJob.reconstruct, show_default=True,
              help="Refit every conv that lost input channels by least squares so it reproduces the original's "
                   "output, on this many --data training images (e.g. 96; 0: off).")
@device_option
@report_option
@exist_ok_option
def prune_command(report_path: str | None, exist_ok: bool, **options: Any) -> None:
    """Channel or layer pruning of a Darknet model -> DIR/<cfg>-<method>.cfg/.weights + report.json."""
    report = run(PruneJob, options, report_path, exist_ok)
    if report["dry_run"]:
        click.echo(tabulate([[c["layer"], c["type"], c["before"], c["after"]] for c in report["channels"]],
                            headers=["#", "type", "before", "after"], tablefmt="github"))
    click.echo("\n".join(_target_lines(report) + [_before_after(report)]))
    if not report["dry_run"]:
        click.echo(f"-> {report['cfg']}, {report['weights']}")


@cli.command("sparse-train")
@model_options()
@click.option("--data", type=click.Path(exists=True), required=True, help=f"{DATA_HELP}.")
@val_option
@out_option()
@click.option("--s", "--sr", "s", type=click.FloatRange(0), default=1e-3, show_default=True,
              help="L1 strength on BN gammas (reference --s).")
@click.option("-sr", "sr_flag", is_flag=True, hidden=True, help="Accepted for the reference; implied.")
@click.option("--prune", type=click.IntRange(0, 2), default=0, show_default=True,
              help="Layer set: 0 normal/regular, 1 shortcut/slim, 2 layer pruning.")
@click.option("--s-schedule", type=click.Choice(sorted(SCHEDULES)), default="constant", show_default=True)
@click.option("--l1-update", type=click.Choice(["auto", *sorted(UPDATES)]), default="auto", show_default=True,
              help="How the L1 term acts: auto = proximal step for Adam/AdamW, subgradient s*sign(gamma) for SGD.")
@click.option("--target-sparsity", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Raise s (x --s-growth per epoch) until this share of |gamma| is below 1e-2.")
@click.option("--s-growth", type=click.FloatRange(1, 100, min_open=True), default=2.0, show_default=True,
              help="Factor on s per epoch while below --target-sparsity.")
@click.option("--sparsity", type=click.Choice(sorted(SPARSITY)), default="l1", show_default=True,
              help="l1: L1 on BN gammas (network slimming; prune chooses afterwards). fade: plan the prune first "
                   "(--method with --percent / --target-flops / --target-params) and fade exactly those channels "
                   "to zero by --fade-end; then `prune --method M --threshold 0` cuts them exactly.")
@click.option("--method", type=click.Choice(sorted(n for n, p in METHODS.items() if p.kind == "channel")),
              default="slim", show_default=True, help="--sparsity fade: the channel method whose plan is faded.")
@click.option("--percent", type=click.FloatRange(0, 1, max_open=True), default=SparseTrainJob.percent,
              show_default=True, help="--sparsity fade: the share of the method's channels to fade.")
@click.option("--target-flops", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="--sparsity fade: instead of --percent, fade until this ratio of the FLOPs is left.")
@click.option("--target-params", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="--sparsity fade: instead of --percent, fade until this ratio of the parameters is left.")
@click.option("--round-to", type=click.IntRange(1), help="--sparsity fade: kept widths a multiple of this (default "
              "the method's, 8).")
@click.option("--layer-keep", type=click.FloatRange(0, 1), default=SparseTrainJob.layer_keep,
              help=f"--sparsity fade: per-layer floor of the plan (fraction of width; {_LAYER_KEEP_DEFAULT}; e.g. 0.5 "
                   "keeps at least half of every layer, which a pretrained model heals from far better than a few "
                   "layers cut to 8).")
@click.option("--fade-end", type=click.FloatRange(0, 1, min_open=True), default=SparseTrainJob.fade_end,
              show_default=True, help="--sparsity fade: share of training after which the planned channels are "
                                      "zero (the rest trains the pruned structure).")
@click.option("--importance", type=click.Choice(list(IMPORTANCE)), default=SparseTrainJob.importance,
              show_default=True, help="--sparsity fade: what ranks the channels: the --method's own scores, or "
                                      "taylor (first-order loss change of each BN channel on the training images).")
@click.option("--t_cfg", "--t-cfg", "t_cfg", type=click.Path(exists=True, dir_okay=False),
              help="Teacher cfg to distill from while sparsifying (e.g. the input model itself).")
@click.option("--t_weights", "--t-weights", "t_weights", type=click.Path(exists=True, dir_okay=False),
              help="Teacher weights (with --t_cfg).")
@click.option("--kd", type=click.IntRange(1, 5), default=SparseTrainJob.kd, show_default=True,
              help="Distillation strategy with --t_cfg (see distill).")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out from its last.pt.")
@fit_options(SparseTrainJob)
@hyp_option
@device_option
@report_option
@exist_ok_option
def sparse_train_command(report_path: str | None, exist_ok: bool, sr_flag: bool, **options: Any) -> None:
    """Sparse training so that `prune` can cut channels: L1 on BN gammas, or fading a planned cut."""
    report = run(SparseTrainJob, options, report_path, exist_ok)
    if report.is_main:
        click.echo(format_stage_table([report.to_dict()], _SPARSE_KEYS))
        click.echo(json.dumps(report["gamma"], indent=None))
