"""int8 QDQ ONNX vs fp32 ONNX latency on CPU (onnxruntime), plus what onnxruntime actually runs.

    .venv/bin/python benchmarks/int8_latency.py --cfg ../shared/assets/weights/yolov4-tiny.cfg \
        --weights ../shared/assets/weights/yolov4-tiny.weights --img-size 416 --out int8_latency.json

Calibrates on random images unless --data is given (latency does not depend on the scales), exports both
models, times batch-1 runs, and counts the op types in onnxruntime's optimized graph (QLinearConv present?
per-channel? LeakyRelu fused as QLinearLeakyRelu? leftover Q/DQ pairs?). `--schemes` compares activation
schemes x weight ranges, e.g. `asymmetric:reduced symmetric:reduced asymmetric:full` (default: the first).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

import onnx
import torch
from tabulate import tabulate

import compress
from compress.deploy.export import ExportConfig, export_onnx
from compress.base.fileio import write_text_atomic
from compress.quant import GoogleConfig, calibrate, prepare_qat
from compress.quant.cpuinfo import cpu_flags
from compress.quant.onnx_qdq import export_qdq_onnx, onnx_latency, optimized_op_counts

ASSETS = Path(os.environ.get("YOLO_COMPRESS_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))


def _batches(data: str | None, img: int, n: int):
    if data is None:
        g = torch.Generator().manual_seed(0)
        return [torch.rand(4, 3, img, img, generator=g) for _ in range(n)]
    from compress.data.dataset import load_data_spec, make_loader, to_input
    loader = make_loader(load_data_spec(data), img, 4, workers=0, split="train")
    return [to_input(b[0]) for _, b in zip(range(n), loader)]


def _per_channel(path: Path) -> bool:
    graph = onnx.load(str(path)).graph
    consts = {n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant"}
    consts.update({t.name: t for t in graph.initializer})
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in consts
          and len(consts[n.input[0]].dims) == 4]
    return bool(dq) and all(len(consts[n.input[1]].dims) == 1 for n in dq)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cfg", default=str(ASSETS / "weights" / "yolov4-tiny.cfg"))
    ap.add_argument("--weights", default=str(ASSETS / "weights" / "yolov4-tiny.weights"))
    ap.add_argument("--data", help="calibration data (.data or image folder); default random images")
    ap.add_argument("--img-size", type=int, default=416)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--schemes", nargs="+", default=["asymmetric:reduced"],
                    help="ACT_SCHEME:reduced|full pairs (activations x weight range)")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    img = args.img_size
    model = compress.load(args.cfg, args.weights)
    tmp = Path(tempfile.mkdtemp(prefix="int8bench-"))
    fp32 = tmp / "fp32.onnx"
    export_onnx(compress.load(args.cfg, args.weights), fp32, ExportConfig(img_size=img, opset=13))
    batches = _batches(args.data, img, 2)
    rows, figures = [], {"cfg": args.cfg, "img_size": img, "runs": args.runs, "cpu": cpu_flags(), "results": []}
    n_conv = sum(1 for b in model.cfg.blocks if b.type == "convolutional")
    for scheme in args.schemes:
        act, _, wrange = scheme.partition(":")
        q = prepare_qat(model, GoogleConfig(act_scheme=act, reduce_range=wrange != "full"))
        calibrate(q, batches)
        int8 = tmp / f"int8-{act}-{wrange}.onnx"
        export_qdq_onnx(q, int8, (img, img))
        ops = optimized_op_counts(int8, tmp / "int8-optimized.onnx")
        for t in args.threads:
            f = onnx_latency(fp32, (img, img), args.runs, threads=t)
            i = onnx_latency(int8, (img, img), args.runs, threads=t)
            rows.append([scheme, t, f"{f:.2f}", f"{i:.2f}", f"{i / f:.2f}", f"{ops.get('QLinearConv', 0)}/{n_conv}"])
            figures["results"].append({"scheme": scheme, "threads": t, "latency_ms_fp32_onnx": f,
                                       "latency_ms_int8_onnx": i, "ratio": i / f, "optimized_ops": ops,
                                       "per_channel_weights": _per_channel(int8),
                                       "size_mb_int8_onnx": int8.stat().st_size / 1e6})
    figures.update(convs=n_conv, size_mb_fp32_onnx=fp32.stat().st_size / 1e6)
    print(tabulate(rows, headers=["scheme", "threads", "fp32 ONNX ms", "int8 QDQ ONNX ms", "int8 / fp32",
                                  "QLinearConv"], tablefmt="github"))
    print(f"\nCPU: {figures['cpu']} (timings are noisy on a shared machine)")
    if args.out:
        write_text_atomic(args.out, json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
