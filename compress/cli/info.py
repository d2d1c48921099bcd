"""`yolo-compress info`: layers, params, FLOPs, BN-gamma statistics."""
from __future__ import annotations

import click

from ..persist import load
from ..report import bn_gammas, file_size_mb, gamma_stats, plot_gamma_histogram, summarize
from . import cli
from .common import model_options, report_option, write_report


@cli.command("info")
@model_options()
@click.option("--img-size", type=click.IntRange(32, 4096), help="Input size (square); default: the cfg's.")
@click.option("--gamma-plot", type=click.Path(dir_okay=False), help="Write a BN-gamma histogram PNG here.")
@click.option("--cutoff", type=click.IntRange(1), help="Load weights of the first N layers only.")
@report_option
def info_command(cfg: str, weights: str | None, img_size: int | None, gamma_plot: str | None,
                 cutoff: int | None, report_path: str | None) -> None:
    """Per-layer table, totals (params, GFLOPs, size) and BN-gamma summary of a model."""
    model = load(cfg, weights, cutoff=cutoff)
    summary = summarize(model, (img_size, img_size) if img_size else None)
    stats = gamma_stats(bn_gammas(model))
    click.echo(summary.table())
    h, w = summary.img_size
    click.echo(f"\n{len(summary.rows)} layers, {summary.params:,} params, {summary.gflops:.3f} GFLOPs at {w}x{h}"
               + (f", weights {file_size_mb(weights):.2f} MB" if weights else ""))
    if stats["count"]:
        click.echo("BN |gamma|: " + ", ".join(f"{k}={v:.4g}" for k, v in stats.items() if k != "count")
                   + f" over {stats['count']} channels")
    if gamma_plot:
        plot_gamma_histogram(bn_gammas(model), gamma_plot)
        click.echo(f"gamma histogram -> {gamma_plot}")
    write_report(report_path, {**summary.to_dict(), "gamma": stats, "cfg": cfg, "weights": weights,
                               "weights_mb": file_size_mb(weights) if weights else None})
