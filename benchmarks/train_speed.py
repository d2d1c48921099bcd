"""Training throughput: images/s of forward + loss + backward + SGD step, and the share of wall time spent
waiting for the data loader. Default: yolov3-tiny at 416 on CPU over COCO128 from the shared assets.

    python benchmarks/train_speed.py --iters 5 --out train_speed.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tabulate import tabulate

from compress import load
from compress.data import DetectionDataset, collate, to_input
from compress.fileio import write_text_atomic
from compress.losses import LOSSES, build_loss
from compress.train.optim import build_optimizer

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"


def measure(cfg: Path, weights: Path | None, images: Path, img_size: int, batch: int, iters: int, workers: int,
            device: str, loss: str = "darknet") -> dict:
    model = load(cfg, weights, device=device).train()
    ds = DetectionDataset(sorted(images.glob("*.jpg")), img_size, augment=True, num_classes=model.num_classes)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                         collate_fn=collate, drop_last=True)
    loss_fn, opt = build_loss(loss, model), build_optimizer(model, "sgd", 1e-4, 0.9, 5e-4)
    wait = compute = 0.0
    it, n = iter(loader), 0
    for step in range(iters + 1):  # step 0 warms up (worker start, allocator) and is not counted
        t0 = time.perf_counter()
        imgs, targets, _, _ = next(it)
        t1 = time.perf_counter()
        total, _ = loss_fn(model(to_input(imgs, device)), targets.to(device), (img_size, img_size))
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if step:
            wait, compute, n = wait + t1 - t0, compute + t2 - t1, n + len(imgs)
    total = wait + compute
    return {"cfg": str(cfg), "loss": loss, "img_size": img_size, "batch_size": batch, "iters": iters,
            "workers": workers,
            "device": device, "threads": torch.get_num_threads(), "images_per_s": round(n / total, 3),
            "ms_per_image": round(1e3 * total / n, 1), "data_wait_share": round(wait / total, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cfg", type=Path, default=ASSETS / "weights" / "yolov3-tiny.cfg")
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--images", type=Path, default=ASSETS / "data" / "coco128" / "images" / "train2017")
    ap.add_argument("--img-size", type=int, default=416)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--loss", default="darknet", choices=sorted(LOSSES))
    ap.add_argument("--out", type=Path, help="Write the figures as JSON here.")
    args = ap.parse_args()
    row = measure(args.cfg, args.weights, args.images, args.img_size, args.batch_size, args.iters, args.workers,
                  args.device, args.loss)
    print(tabulate([row.values()], headers=list(row.keys()), tablefmt="github"))
    if args.out:
        write_text_atomic(args.out, json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
