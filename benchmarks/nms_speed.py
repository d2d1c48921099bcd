"""NMS time as a share of inference: yolov4-tiny @416 on COCO128 at conf 0.001 (the mAP setting).

    .venv/bin/python benchmarks/nms_speed.py [--images 16] [--img-size 416] [--threads 2] [--out nms_speed.json]
Times the model forward pass and `non_max_suppression` per image (batch 1, best of --repeat), and the previous
per-class NMS (a greedy loop per class, kept here as the baseline) on the same outputs; with the trained
weights and with random init (an untrained model: 10000 candidates per image). Uses the shared assets
(../shared/assets or $YOLO_COMPRESS_ASSETS).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tabulate import tabulate

from compress.detection.boxes import box_iou, non_max_suppression, xywh2xyxy
from compress.darknet.persist import load

ASSETS = Path(os.environ.get("YOLO_COMPRESS_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))


def per_class_loop_nms(pred: torch.Tensor, conf_thres: float, iou_thres: float, max_det: int = 300,
                       max_nms: int = 10000) -> list:
    """The previous implementation: one overlap matrix per class, then a Python loop over its boxes."""
    out = []
    for p in pred:
        p = p[p[:, 4] > conf_thres]
        scores = p[:, 5:] * p[:, 4:5]
        i, j = (scores > conf_thres).nonzero(as_tuple=True)
        if len(i) > max_nms:
            top = scores[i, j].topk(max_nms).indices
            i, j = i[top], j[top]
        boxes, conf, keep = xywh2xyxy(p[i, :4]), scores[i, j], []
        for c in j.unique():
            idx = (j == c).nonzero(as_tuple=True)[0]
            order = conf[idx].argsort(descending=True)
            b = boxes[idx][order]
            over = (box_iou(b, b) > iou_thres).numpy()
            alive = np.ones(len(b), dtype=bool)
            for k in range(len(b)):
                if alive[k]:
                    alive[k + 1:] &= ~over[k, k + 1:]
            keep.append(idx[order[torch.from_numpy(alive)]])
        keep = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long)
        keep = keep[conf[keep].argsort(descending=True)][:max_det]
        out.append(torch.cat((boxes[keep], conf[keep, None], j[keep, None].float()), 1))
    return out


def best_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1000


def measure(model: torch.nn.Module, paths: list[Path], args: argparse.Namespace) -> dict:
    infer, new, old, cands, same = [], [], [], [], True
    for path in paths:
        img = Image.open(path).convert("RGB").resize((args.img_size, args.img_size))
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            infer.append(best_ms(lambda: model(x), args.repeat))
            pred = model(x)
        new.append(best_ms(lambda: non_max_suppression(pred, args.conf_thres, args.iou_thres), args.repeat))
        old.append(best_ms(lambda: per_class_loop_nms(pred, args.conf_thres, args.iou_thres), args.repeat))
        a = non_max_suppression(pred, args.conf_thres, args.iou_thres)[0]
        b = per_class_loop_nms(pred, args.conf_thres, args.iou_thres)[0]
        same &= a.shape == b.shape and torch.equal(a[a[:, 4].argsort()], b[b[:, 4].argsort()])
        cands.append(int(((pred[0, :, 5:] * pred[0, :, 4:5]) > args.conf_thres).sum()))
    mean = lambda v: round(float(np.mean(v)), 2)  # noqa: E731
    return {"candidates_per_image": mean(cands), "inference_ms": mean(infer), "nms_ms": mean(new),
            "nms_share_of_inference": round(float(np.sum(new) / np.sum(infer)), 4), "previous_nms_ms": mean(old),
            "previous_nms_share_of_inference": round(float(np.sum(old) / np.sum(infer)), 4),
            "max_nms_ms": round(max(new), 2), "previous_max_nms_ms": round(max(old), 2),
            "same_detections": bool(same)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--img-size", type=int, default=416)
    ap.add_argument("--conf-thres", type=float, default=0.001)
    ap.add_argument("--iou-thres", type=float, default=0.6)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ASSETS / "weights/yolov4-tiny.cfg"
    paths = sorted((ASSETS / "data/coco128/images/train2017").glob("*.jpg"))[:args.images]
    torch.manual_seed(0)
    figures = {"model": "yolov4-tiny", "img_size": args.img_size, "conf_thres": args.conf_thres,
               "images": len(paths), "threads": args.threads,
               # trained weights: a few hundred candidates; random init (an untrained model's first evals):
               # every anchor passes conf 0.001 for every class, capped at max_nms = 10000
               "trained": measure(load(cfg, ASSETS / "weights/yolov4-tiny.weights"), paths, args),
               "random_init": measure(load(cfg), paths[:max(1, len(paths) // 4)], args)}
    rows = [(k, v) for k, v in figures.items() if not isinstance(v, dict)]
    rows += [(f"{case}.{k}", v) for case in ("trained", "random_init") for k, v in figures[case].items()]
    print(tabulate(rows, tablefmt="github", headers=["nms_speed", "value"]))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
