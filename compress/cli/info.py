"""`yolo-compress info`: layers, params, FLOPs, BN-gamma statistics."""
from __future__ import annotations

from typing import Any

import click
from tabulate import tabulate

from compress.cli.common import model_options, report_option, run
from compress.cli.group import cli
from compress.darknet.summary import LayerRow, ModelSummary
from compress.jobs import InfoJob


@cli.command("info")
@model_options()
@click.option("--img-size", type=click.IntRange(32, 4096), help="Input size (square); default: the cfg's.")
@click.option("--gamma-plot", type=click.Path(dir_okay=False), help="Write a BN-gamma histogram PNG here.")
@click.option("--cutoff", type=click.IntRange(1), help="Load weights of the first N layers only.")
@click.option("--latency-table", type=click.Path(exists=True, dir_okay=False),
              help="Print the per-layer latency tables in this file (from prune --target-latency) for this cfg.")
@report_option
def info_command(report_path: str | None, **options: Any) -> None:
    """Per-layer table, totals (params, GFLOPs, size) and BN-gamma summary of a model."""
    r = run(InfoJob, options, report_path)
    rows = tuple(LayerRow(**row) for row in r["layers"])
    click.echo(ModelSummary(rows, r["params"], r["gflops"], tuple(r["img_size"])).table())
    h, w = r["img_size"]
    click.echo(f"\n{len(rows)} layers, {r['params']:,} params, {r['gflops']:.3f} GFLOPs at {w}x{h}"
               + (f", weights {r['weights_mb']:.2f} MB" if options["weights"] else ""))
    stats = r["gamma"]
    if stats["count"]:
        click.echo("BN |gamma|: " + ", ".join(f"{k}={v:.4g}" for k, v in stats.items() if k != "count")
                   + f" over {stats['count']} channels")
    if options["gamma_plot"]:
        click.echo(f"gamma histogram -> {options['gamma_plot']}")
    _echo_latency_tables(r.get("latency_tables") or [])


def _echo_latency_tables(tables: list[dict]) -> None:
    """Per table: its key, the whole model's ms, then per conv its ms at full width and share of the model."""
    for table in tables:
        click.echo(f"\nlatency table: {table['describe']}; whole model {table['model_ms']:.3f} ms "
                   f"(measured {table['measured']})")
        click.echo(tabulate([["" if row["layer"] is None else row["layer"], row["type"], row["ms"], row["share"]]
                             for row in table["rows"]], headers=["#", "type", "ms", "share"], tablefmt="github"))
