"""`yolo-compress benchmark`: mAP and batch-1 latency of a model in each deployment format, one table."""
from __future__ import annotations

from typing import Any

import click

from compress.base.latency import DEFAULT_RUNS, DEFAULT_THREADS, DEFAULT_WARMUP
from compress.cli.common import DATA_HELP, letterbox_option, report_option, run
from compress.cli.group import cli
from compress.deploy.benchmark import FORMATS, BenchmarkResult
from compress.jobs import BenchmarkJob


@cli.command("benchmark")
@click.option("--cfg", type=click.Path(exists=True, dir_okay=False),
              help="Darknet .cfg of the model (optional with an exported --weights).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False),
              help="Darknet .weights / .pt, or an exported .onnx / .xml / .param (benchmarked in its own runtime).")
@click.option("--data", type=click.Path(exists=True), help=f"{DATA_HELP}: mAP on its valid split, int8 "
              "calibration on its train split; omit for latency only.")
@click.option("--formats", help=f"Comma-separated, from {','.join(FORMATS)} (default: all of them; an exported "
              "--weights: its own).")
@click.option("--threads", type=click.IntRange(1), default=DEFAULT_THREADS, show_default=True,
              help="CPU threads of every runtime (torch pinned to the same).")
@click.option("--img-size", type=click.IntRange(32, 4096), help="Square input size; default: the cfg's width "
              "(an exported model: its fixed size).")
@click.option("--runs", type=click.IntRange(1), default=DEFAULT_RUNS, show_default=True,
              help="Timed batch-1 forwards per format (median and spread reported).")
@click.option("--warmup", type=click.IntRange(0), default=DEFAULT_WARMUP, show_default=True,
              help="Untimed forwards before timing.")
@letterbox_option
@report_option
def benchmark_command(report_path: str | None, **options: Any) -> None:
    """Per format: size, mAP@0.5, mAP@0.5:0.95 and latency (model forward only, no NMS; batch 1)."""
    r = run(BenchmarkJob, options, report_path)
    click.echo(BenchmarkResult(r["img_size"], r["threads"], r["rows"]).table())
    cpu = r["cpu"]
    flags = ", ".join(k.upper() for k in ("avx2", "avx512", "vnni", "amx") if cpu.get(k))
    click.echo(f"\n{r['img_size']}x{r['img_size']}, batch 1, {r['threads']} thread(s), median of {r['runs']} runs "
               f"after {r['warmup']} warm-up; CPU: {cpu.get('model') or cpu.get('machine')} "
               f"({flags or 'no flags read'})")
