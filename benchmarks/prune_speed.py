"""Prune wall time per method on a cfg (default yolov3.cfg at 416, random BN statistics; evaluation excluded),
plus CPU latency ratio pruned/original next to the FLOPs ratio.

    .venv/bin/python benchmarks/prune_speed.py --cfg ../shared/assets/cfg/yolov3.cfg --out prune_speed.json
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from tabulate import tabulate

from compress.cfg import read_cfg
from compress.model import build_model
from compress.prune import METHODS, PruneConfig, prune
from compress.report import measure_latency, summarize

DEFAULT_CFG = Path(__file__).resolve().parents[2] / "shared" / "assets" / "cfg" / "yolov3.cfg"


def _random_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.05
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.1
    return model


def bench(cfg: Path, size: int, methods: list[str], percent: float, shortcuts: int, runs: int) -> list[dict]:
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
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    rows = bench(args.cfg, args.img_size, args.methods.split(","), args.percent, args.shortcuts, args.runs)
    print(tabulate(rows, headers="keys", tablefmt="github"))
    if args.out:
        args.out.write_text(json.dumps({"cfg": str(args.cfg), "img_size": args.img_size, "percent": args.percent,
                                        "shortcuts": args.shortcuts, "threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
