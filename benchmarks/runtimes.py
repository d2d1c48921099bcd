"""CPU latency of one model in every runtime we export to, before and after slim pruning, next to the FLOPs ratio.

    .venv/bin/python benchmarks/runtimes.py --threads 1 --out runtimes.json
    .venv/bin/python benchmarks/runtimes.py --models yolo-fastest-1.1@320 --runs 50 --threads 1 2

Models: the official yolov4-tiny @416 and yolo-fastest-1.1 @320 weights from ../shared/assets (or
$YOLO_COMPRESS_ASSETS); "slim 0.5" is `yolo-compress prune --method slim --percent 0.5` applied to those real
weights WITHOUT sparse training or fine-tuning (so its accuracy is not meaningful; only its speed is).
Runtimes: torch eager, onnxruntime fp32 / int8 (QDQ from `quantize`'s exporter, calibrated on random images:
latency does not depend on the scales), OpenVINO CPU fp32 / int8 (the same QDQ file), ncnn fp32 / fp16
(fp16 weights; x86 computes fp32). Batch 1, median of --runs after warm-up, the runtimes timed round-robin,
`threads` intra-op threads everywhere. The 1-minute load average is recorded: figures taken on a busy machine are noisy.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tabulate import tabulate

import compress
from compress.deploy.export import ExportConfig, export
from compress.base.fileio import write_text_atomic
from compress.deploy.onnx_io import median_ms
from compress.prune import PruneConfig, prune
from compress.quant import GoogleConfig, calibrate, prepare_qat
from compress.quant.onnx_qdq import export_qdq_onnx
from compress.darknet.summary import summarize
from compress.deploy.runtimes import load_predictor
from compress.deploy.runtimes.openvino import to_openvino

ASSETS = Path(os.environ.get("YOLO_COMPRESS_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
RUNTIMES = ("torch", "ort_fp32", "ort_int8", "ov_fp32", "ov_int8", "ncnn_fp32", "ncnn_fp16")


def _artifacts(model: compress.DarknetModel, size: int, tmp: Path) -> dict[str, Path]:
    """Every exported file of `model` at `size`, keyed by runtime name."""
    hw = (size, size)
    paths = {"ort_fp32": export(model, tmp / "fp32.onnx", ExportConfig(img_size=size, opset=13)).path,
             "ov_fp32": export(model, tmp / "ov", ExportConfig("openvino", img_size=size)).path,
             "ncnn_fp32": export(model, tmp / "nc", ExportConfig("ncnn", img_size=size)).path,
             "ncnn_fp16": export(model, tmp / "nc16", ExportConfig("ncnn", img_size=size, half=True)).path}
    q = prepare_qat(model, GoogleConfig())
    g = torch.Generator().manual_seed(0)
    calibrate(q, [torch.rand(2, 3, *hw, generator=g) for _ in range(2)])
    export_qdq_onnx(q, tmp / "int8.onnx", hw)
    paths["ort_int8"] = tmp / "int8.onnx"
    paths["ov_int8"] = to_openvino(tmp / "int8.onnx", tmp / "int8.xml")
    return paths


def _timers(model: torch.nn.Module, paths: dict[str, Path], threads: int) -> dict[str, Callable[[], object]]:
    x = torch.rand(1, 3, *model_hw(paths))

    def torch_run() -> object:
        with torch.no_grad():
            return model(x)
    timers: dict[str, Callable[[], object]] = {"torch": torch_run}
    for name, path in paths.items():
        predictor = load_predictor(path, threads=threads)
        timers[name] = lambda p=predictor: p(x)
    return timers


def interleaved_medians(timers: dict[str, Callable[[], object]], runs: int, warmup: int = 3) -> dict[str, float]:
    """Median ms per runtime, timing them round-robin (one run of each per round) so that load changes on a
    shared machine hit every runtime alike instead of whichever happened to run then."""
    for fn in timers.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in RUNTIMES}
    for _ in range(runs):
        for k in RUNTIMES:
            times[k].append(median_ms(timers[k], 1, 0))
    return {k: round(float(np.median(v)), 2) for k, v in times.items()}


def model_hw(paths: dict[str, Path]) -> tuple[int, int]:
    return tuple(load_predictor(paths["ort_fp32"]).img_hw)  # type: ignore[return-value]


def bench(name: str, size: int, threads: list[int], runs: int, percent: float) -> list[dict]:
    w = ASSETS / "weights"
    base = compress.load(w / f"{name}.cfg", w / f"{name}.weights").eval()
    pruned = prune(base, PruneConfig(method="slim", percent=percent)).model.eval()
    base_flops = summarize(base, (size, size)).gflops
    rows = []
    for label, model in (("original", base), (f"slim {percent}", pruned)):
        s = summarize(model, (size, size))
        with tempfile.TemporaryDirectory(prefix="rtbench-") as tmp:
            paths = _artifacts(model, size, Path(tmp))
            for t in threads:
                torch.set_num_threads(t)
                timers = _timers(model, paths, t)
                ms = interleaved_medians(timers, runs)
                rows.append({"model": name, "img_size": size, "variant": label, "threads": t,
                             "gflops": round(s.gflops, 3), "flops_ratio": round(s.gflops / base_flops, 3),
                             "params_m": round(s.params / 1e6, 3), "latency_ms": ms})
                logging.info("%s %s threads=%d: %s", name, label, t, ms)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["yolov4-tiny@416", "yolo-fastest-1.1@320"],
                    help="NAME@SIZE with NAME.cfg/.weights in the assets' weights folder")
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--percent", type=float, default=0.5, help="slim pruning ratio")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    load_before = os.getloadavg()[0]
    rows = []
    for spec in args.models:
        name, size = spec.split("@")
        rows += bench(name, int(size), args.threads, args.runs, args.percent)
    table = [[r["model"], r["img_size"], r["variant"], r["threads"], r["flops_ratio"],
              *(r["latency_ms"][k] for k in RUNTIMES)] for r in rows]
    print(tabulate(table, headers=["model", "size", "variant", "threads", "FLOPs ratio", *RUNTIMES],
                   tablefmt="github"))
    figures = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0], "runs": args.runs,
               "weights": "official Darknet weights; slim = pruned without sparse training or fine-tuning",
               "int8_calibration": "random images", "rows": rows}
    print(f"\n1-min load average {load_before:.1f} before, {figures['loadavg_1min_after']:.1f} after "
          f"({os.cpu_count()} cores): figures on a loaded machine are noisy")
    if args.out:
        write_text_atomic(args.out, json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
