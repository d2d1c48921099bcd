"""Prune speed on a cfg (default yolov3.cfg at 416, random BN gammas), two tables:

1. whole process: `yolo-compress prune` per method (default, i.e. without `--latency`, and with it) against
   `yolo-compress info` on the same pair, run right before it (wall and CPU time ratios; on a loaded machine
   the CPU ratio is the stable one); goal: prune <= 2x info by default;
2. in process: `prune()` wall time per method, with the CPU latency ratio pruned/original next to the FLOPs ratio.

    .venv/bin/python benchmarks/prune_speed.py --cfg ../shared/assets/cfg/yolov3.cfg --out prune_speed.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from compress.darknet.cfg import read_cfg
from compress.darknet.model import build_model
from compress.darknet.persist import save
from compress.prune import METHODS, PruneConfig, prune
from compress.darknet.summary import measure_latency, summarize

ASSETS = Path(os.environ.get("YOLO_COMPRESS_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
DEFAULT_CFG = ASSETS / "cfg" / "yolov3.cfg"


def _random_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.05
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.1
    return model


def _method_args(method: str, percent: float, shortcuts: int) -> list[str]:
    kind = METHODS[method].kind
    args = ["--method", method, "--min-keep", "0.01"]
    if kind in ("channel", "model"):
        args += ["--percent", str(percent)]
    if kind in ("layer", "model"):
        args += ["--shortcuts", str(shortcuts)]
    return args


def _run(argv: list[str], threads: int) -> tuple[float, float]:
    """(wall s, CPU s) of one child process; CPU = user + system time of the child (its threads summed),
    which the other processes' load on the machine inflates far less than wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compress", *argv], check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def bench_process(cfg: Path, methods: list[str], percent: float, shortcuts: int, threads: int,
                  tmp: Path, with_latency: bool = True) -> list[dict]:
    """Whole-process times (python start, imports, load, prune, save, report) vs `info`, which runs right
    before each method so that both see the same machine load; ratios of wall and of CPU time."""
    pair = (tmp / "in.cfg", tmp / "in.weights")
    save(_random_bn(build_model(read_cfg(cfg))), *pair)
    model_args = ["--cfg", str(pair[0]), "--weights", str(pair[1])]
    _run(["info", *model_args], threads)  # page cache and import caches warm for every pair below
    rows = []
    for method in methods:
        info_s, info_cpu = _run(["info", *model_args], threads)
        argv = ["prune", *model_args, "--out", str(tmp / method), *_method_args(method, percent, shortcuts)]
        plain, plain_cpu = _run(argv, threads)
        row = {"method": method, "info_s": round(info_s, 2), "prune_s": round(plain, 2),
               "prune/info": round(plain / info_s, 2), "info_cpu_s": round(info_cpu, 2),
               "prune_cpu_s": round(plain_cpu, 2), "prune/info (CPU)": round(plain_cpu / info_cpu, 2)}
        if with_latency:
            timed, _ = _run(argv + ["--out", str(tmp / f"{method}-latency"), "--latency"], threads)
            row.update({"prune_latency_s": round(timed, 2), "with --latency / info": round(timed / info_s, 2)})
        rows.append(row)
        logging.info("%s", row)
    return rows


def bench_inprocess(cfg: Path, size: int, methods: list[str], percent: float, shortcuts: int,
                    runs: int) -> list[dict]:
    model = _random_bn(build_model(read_cfg(cfg))).eval()
    base = summarize(model, (size, size))
    base_ms = measure_latency(model, (size, size), runs=runs, warmup=1)
    rows = []
    for method in methods:
        config = PruneConfig(method=method, percent=percent, shortcuts=shortcuts, min_keep=0.01)
        t0 = time.perf_counter()
        result = prune(model, config)
        wall = time.perf_counter() - t0
        s = summarize(result.model, (size, size))
        ms = measure_latency(result.model, (size, size), runs=runs, warmup=1)
        rows.append({"method": method, "prune_s": round(wall, 3), "params_ratio": round(s.params / base.params, 4),
                     "flops_ratio": round(s.gflops / base.gflops, 4), "latency_ratio": round(ms / base_ms, 4),
                     "latency_ms": round(ms, 1), "latency_ms_before": round(base_ms, 1)})
        logging.info("%s done in %.2f s", method, wall)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cfg", type=Path, default=DEFAULT_CFG)
    ap.add_argument("--img-size", type=int, default=416)
    ap.add_argument("--methods", default=",".join(sorted(METHODS)))
    ap.add_argument("--percent", type=float, default=0.5)
    ap.add_argument("--shortcuts", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3, help="latency repetitions (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", choices=["process", "inprocess"], help="run only the other table")
    ap.add_argument("--no-latency-runs", action="store_true", help="process table: skip the `--latency` runs")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    result: dict = {"cfg": str(args.cfg), "img_size": args.img_size, "percent": args.percent,
                    "shortcuts": args.shortcuts, "threads": args.threads}
    if args.skip != "process":
        with tempfile.TemporaryDirectory() as tmp:
            result["process"] = bench_process(args.cfg, methods, args.percent, args.shortcuts, args.threads,
                                              Path(tmp), not args.no_latency_runs)
        print("whole process (wall s), random-BN pair written from the cfg:")
        print(tabulate(result["process"], headers="keys", tablefmt="github"))
    if args.skip != "inprocess":
        result["rows"] = bench_inprocess(args.cfg, args.img_size, methods, args.percent, args.shortcuts, args.runs)
        print(tabulate(result["rows"], headers="keys", tablefmt="github"))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
