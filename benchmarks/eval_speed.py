"""Eval throughput of yolov3-tiny on CPU: images/s and the share of time spent waiting for data.

    .venv/bin/python benchmarks/eval_speed.py [--images 32] [--img-size 416] [--workers 2] [--out eval_speed.json]
Uses the shared assets (../shared/assets or $YOLO_COMPRESS_ASSETS): yolov3-tiny + COCO128.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from tabulate import tabulate

from compress.detection.evaluate import EvalConfig, evaluate
from compress.darknet.persist import load

ASSETS = Path(os.environ.get("YOLO_COMPRESS_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--img-size", type=int, default=416)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    images = sorted((ASSETS / "data/coco128/images/train2017").glob("*.jpg"))[:args.images]
    model = load(ASSETS / "weights/yolov3-tiny.cfg", ASSETS / "weights/yolov3-tiny.weights")
    config = EvalConfig(img_size=args.img_size, batch_size=args.batch_size, workers=args.workers, progress=False)
    t0 = time.perf_counter()
    result = evaluate(model, images, config)
    wall = time.perf_counter() - t0
    t = result.timing_ms
    figures = {"model": "yolov3-tiny", "device": "cpu", "threads": args.threads, "workers": args.workers,
               "img_size": args.img_size, "images": result.images, "wall_s": round(wall, 2),
               "images_per_s": round(result.images / wall, 2),
               "pipeline_images_per_s": round(1000 / t["total"], 2),
               "ms_per_image": {k: round(v, 2) for k, v in t.items()},
               "data_wait_share": round(t["preprocess"] / t["total"], 4),
               "map50": round(result.map50, 4), "cpu": platform.processor() or platform.machine()}
    print(tabulate([(k, v) for k, v in figures.items() if k != "ms_per_image"]
                   + [(f"ms/img {k}", v) for k, v in figures["ms_per_image"].items()], tablefmt="github",
                   headers=["eval_speed", "value"]))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
