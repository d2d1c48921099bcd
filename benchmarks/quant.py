"""Quantization accuracy figures: mAP@.5 of fp32, fake-quant, int8 QDQ ONNX (onnxruntime, this CPU) and the
Darknet pair for a list of named runs, each a `compress.quant.pipeline.quantize` call.

    # demo model (recipes/demo.cfg trained on `yolo-compress data synth`), 4-bit QAT, with and without pow2
    .venv/bin/python benchmarks/quant.py --runs demo-w4 demo-w4-pow2 --demo-weights runs/demo-train/best.weights \
        --demo-data runs/synth/synth.data --epochs 5 --out quant-demo.json
    # yolov4-tiny on COCO128: W8A8 PTQ at 416, 4-bit PTQ (calibration only) and W4A8 QAT at 320
    .venv/bin/python benchmarks/quant.py --runs v4t-w8a8 v4t-w4-google-mse v4t-w4-dorefa v4t-w4-qat \
        v4t-w4-pow2-qat --epochs 4 --out quant-v4t.json

Prints one table and writes the figures (every report key, CPU flags included) as JSON. Runs record the
verification result instead of failing on it. Timing-free: only the mAPs are the point here.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch
from tabulate import tabulate

from compress.base.fileio import write_text_atomic
from compress.quant.config import make_config
from compress.quant.pipeline import QuantOutputs, QuantSettings, quantize
from compress.jobs import QuantizeJob
from compress.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("YOLO_COMPRESS_ASSETS", ROOT.parent / "shared" / "assets"))
V4T = ("yolov4-tiny", 320)
JOB_KEYS = ("bias_correction", "act_drop", "act_drop_after", "rounding", "rounding_iters", "avg_bits")

# name -> (model, img size or None for the cfg's, make_config kwargs (+ QuantSettings' in JOB_KEYS), QAT?)
RUNS: dict[str, tuple[str, int | None, dict, bool]] = {
    "demo-w4": ("demo", None, {"bits": 4}, True),
    "demo-w4-pow2": ("demo", None, {"bits": 4, "pow2": True}, True),
    "demo-w4-google": ("demo", None, {"method": "google", "bits": 4}, True),
    "demo-w8a8": ("demo", None, {"method": "google", "bits": 8}, False),
    "v4t-w8a8": ("yolov4-tiny", 416, {"method": "google", "bits": 8}, False),
    "v4t-w8a8-320": ("yolov4-tiny", 320, {"method": "google", "bits": 8}, False),
    "v4t-w8a8-nobc": ("yolov4-tiny", 416, {"method": "google", "bits": 8, "bias_correction": False}, False),
    "v4t-w8a8-s8": ("yolov4-tiny", 416, {"method": "google", "bits": 8, "act_scheme": "symmetric"}, False),
    "v4t-w8a8-full": ("yolov4-tiny", 416, {"method": "google", "bits": 8, "reduce_range": False}, False),
    "v4t-w8a8-pair": ("yolov4-tiny", 416, {"method": "google", "bits": 8, "safe_range": "pair"}, False),
    "v4t-w8a8-bc": ("yolov4-tiny", 416, {"method": "google", "bits": 8, "safe_range": "pair",
                                         "bias_correction": True}, False),
    "v4t-w8a8-half-bc": ("yolov4-tiny", 416, {"method": "google", "bits": 8, "safe_range": "half",
                                              "bias_correction": True}, False),
    "v4t-w4-google-mse": ("yolov4-tiny", 320, {"method": "google", "bits": 4, "w_clip": "mse"}, False),
    "v4t-w4-google": ("yolov4-tiny", 320, {"method": "google", "bits": 4}, False),
    "v4t-w4-dorefa": ("yolov4-tiny", 320, {"method": "dorefa", "bits": 4}, False),
    "v4t-w4-qat": ("yolov4-tiny", 320, {"bits": 4}, True),
    "v4t-w4-pow2-qat": ("yolov4-tiny", 320, {"bits": 4, "pow2": True}, True),
    "v4t-w4-dorefa-qat": ("yolov4-tiny", 320, {"method": "dorefa", "bits": 4}, True),
    "v4t-w4-qat-416": ("yolov4-tiny", 416, {"bits": 4}, True),
    "v4t-w4-pow2-qat-416": ("yolov4-tiny", 416, {"bits": 4, "pow2": True}, True),
    "v4t-w4-qat-qdrop": ("yolov4-tiny", 320, {"bits": 4, "act_drop": 0.5}, True),
    "v4t-w4-pow2-qat-qdrop": ("yolov4-tiny", 320, {"bits": 4, "pow2": True, "act_drop": 0.5}, True),
    "v4t-w4-pow2-qat-416-qdrop": ("yolov4-tiny", 416, {"bits": 4, "pow2": True, "act_drop": 0.5}, True),
    # issue 24 item 3: pow2 QAT without QDrop (the default, spelled out), and QDrop in the last third only
    "v4t-w4-pow2-qat-nodrop": ("yolov4-tiny", 320, {"bits": 4, "pow2": True, "act_drop": 0.0}, True),
    "v4t-w4-pow2-qat-qdrop-late": ("yolov4-tiny", 320, {"bits": 4, "pow2": True, "act_drop": 0.5,
                                                        "act_drop_after": 8}, True),
    # PTQ with learned rounding (the default at <= 6 bits) and mixed precision (issue 24)
    "v4t-w4-ptq-learned": ("yolov4-tiny", 320, {"bits": 4, "rounding": "learned"}, False),
    "v4t-w4-ptq-learned-416": ("yolov4-tiny", 416, {"bits": 4, "rounding": "learned"}, False),
    "v4t-w4-ptq-learned-nobc": ("yolov4-tiny", 320, {"bits": 4, "rounding": "learned", "bias_correction": False},
                                False),
    "v4t-w4-ptq-nearest": ("yolov4-tiny", 320, {"bits": 4, "rounding": "nearest"}, False),
    "v4t-w4-ptq-mixed": ("yolov4-tiny", 320, {"bits": 4, "avg_bits": 4.5, "rounding": "learned"}, False),
    "v4t-w4-ptq-mixed-416": ("yolov4-tiny", 416, {"bits": 4, "avg_bits": 4.5, "rounding": "learned"}, False),
    "v4t-w4-ptq-mixed-nearest": ("yolov4-tiny", 320, {"bits": 4, "avg_bits": 4.5, "rounding": "nearest"}, False),
    "v4t-w4-ptq-mixed-nearest-416": ("yolov4-tiny", 416, {"bits": 4, "avg_bits": 4.5, "rounding": "nearest"},
                                     False),
    "fastest-w4-ptq-learned": ("yolo-fastest-1.1", 320, {"bits": 4, "rounding": "learned"}, False),
    # block reconstruction (BRECQ): each block's convs fitted jointly to the block's output
    "v4t-w4-ptq-block": ("yolov4-tiny", 320, {"bits": 4, "rounding": "block"}, False),
    "v4t-w4-ptq-block-416": ("yolov4-tiny", 416, {"bits": 4, "rounding": "block"}, False),
    "v4t-w4-ptq-mixed-block": ("yolov4-tiny", 320, {"bits": 4, "avg_bits": 4.5, "rounding": "block"}, False),
    "fastest-w4-ptq-block": ("yolo-fastest-1.1", 320, {"bits": 4, "rounding": "block"}, False),
    "demo-w4-qdrop": ("demo", None, {"bits": 4, "act_drop": 0.5}, True),
    "demo-w4-pow2-qdrop": ("demo", None, {"bits": 4, "pow2": True, "act_drop": 0.5}, True),
}


def _model(name: str, args: argparse.Namespace) -> tuple[str, str, str]:
    if name == "demo":
        return str(ROOT / "recipes" / "demo.cfg"), args.demo_weights, args.demo_data
    w = ASSETS / "weights"
    return str(w / f"{name}.cfg"), str(w / f"{name}.weights"), str(ASSETS / "data" / "coco128" / "images" /
                                                                   "train2017")


def run_one(name: str, args: argparse.Namespace, calib_seed: int = 0) -> dict:
    model, img, kwargs, qat = RUNS[name]
    cfg, weights, data = _model(model, args)
    kw = dict(kwargs)
    job_kw = {k: kw.pop(k) for k in JOB_KEYS if k in kw}
    bits = kw.pop("bits")
    config = make_config(kw.pop("method", None), bits, **kw)
    outputs = QuantOutputs.in_dir(Path(args.work) / name, f"{Path(cfg).stem}-q{bits}")
    if args.rounding_iters:
        job_kw.setdefault("rounding_iters", args.rounding_iters)
    settings = QuantSettings(calib_batches=args.calib_batches, batch_size=args.batch_size, img_size=img,
                             calib_images=args.calib_images, calib_seed=calib_seed, latency_runs=5, verify=False,
                             **job_kw)
    train = _qat_train(cfg, weights, img, args) if qat and args.epochs else None
    t0, c0 = time.perf_counter(), time.process_time()
    figures = quantize(cfg, weights, data, config, outputs, settings, train)
    # process CPU time (all threads): on a shared CPU the wall time says little about a quiet run
    figures.update(run=name, calib_seed=calib_seed, wall_s=round(time.perf_counter() - t0, 1),
                   cpu_s=round(time.process_time() - c0, 1))
    return figures


def _qat_train(cfg: str, weights: str, img: int | None, args: argparse.Namespace) -> TrainConfig:
    """The QAT loop `yolo-compress quantize --epochs N` runs (the job's: its loss from --weights, no BN
    adaptation), so a run measures the command and not a loop of its own."""
    options = {"cfg": cfg, "weights": weights, "batch_size": args.batch_size, "img_size": img}
    return QuantizeJob.make_train(options, {"epochs": args.epochs, "lr0": args.lr0}, set())


def _row(f: dict) -> list:
    v = f.get("verify", {})
    return [f["run"], f.get("calib_seed", 0), f["method"], f["quant_config"].get("bits", f["quant_config"].get("w_bits")),
            f["quant_config"]["pow2"], f["img_size"], f.get("qat_epochs", 0), f["map50_fp32"], f["map50_fakequant"],
            f["map50_int8_onnx"], f["map50_darknet"], v.get("passed"), f.get("rounding"), f.get("avg_w_bits"),
            f["wall_s"], f.get("cpu_s")]


def _mean_rows(results: list[dict]) -> list[list]:
    """One row per run measured with several calibration samplings: the mean of each mAP."""
    rows = []
    for name in dict.fromkeys(f["run"] for f in results):
        fs = [f for f in results if f["run"] == name]
        if len(fs) > 1:
            mean = {k: sum(f[k] for f in fs) / len(fs) for k in ("map50_fp32", "map50_fakequant", "map50_int8_onnx",
                                                                  "map50_darknet", "wall_s", "cpu_s")}
            rows.append(_row({**fs[0], **mean, "calib_seed": f"mean of {len(fs)}", "verify": {}}))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=["demo-w4", "demo-w4-pow2"])
    ap.add_argument("--demo-weights", default=str(ROOT / "runs" / "demo-train" / "best.weights"))
    ap.add_argument("--demo-data", default=str(ROOT / "runs" / "synth" / "synth.data"))
    ap.add_argument("--epochs", type=int, default=5, help="QAT epochs of the runs that train")
    ap.add_argument("--lr0", type=float, help="QAT lr (default: the job's, 1e-4 Adam)")
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--calib-images", type=int, help="calibration images (default: --calib-batches x batch size)")
    ap.add_argument("--calib-seeds", type=int, nargs="+", default=[0],
                    help="calibration samplings: 0 = the first images, N > 0 = a random sample with seed N")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-quant"))
    ap.add_argument("--out", help="write the figures as JSON here")
    ap.add_argument("--rounding-iters", type=int,
                    help="learned rounding: steps per layer (default: the job's, 300; 600 with mixed precision)")
    ap.add_argument("--threads", type=int, help="torch threads (1 is fastest on a busy shared CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    results = []
    for name in args.runs:
        for seed in args.calib_seeds:
            results.append(run_one(name, args, seed))
            print(f"{name} (calib seed {seed}): int8 ONNX {results[-1]['map50_int8_onnx']:.4f}, Darknet "
                  f"{results[-1]['map50_darknet']:.4f}", flush=True)
        if args.out:  # partial results survive a long run being stopped
            write_text_atomic(args.out, json.dumps(results, indent=2, default=str) + "\n")
    print(tabulate([_row(f) for f in results] + _mean_rows(results), tablefmt="github", floatfmt=".4f",
                   headers=["run", "calib seed", "method", "w bits", "pow2", "img", "QAT ep", "fp32", "fake-quant", "int8 ONNX",
                            "Darknet", "verified", "rounding", "avg w bits", "wall s", "cpu s"]))


if __name__ == "__main__":
    main()
