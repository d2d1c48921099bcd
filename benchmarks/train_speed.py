"""Training throughput of the training loop (`compress.train.fit`: data loading, warm-up, loss, backward,
clipping, optimizer step, EMA, hooks) against a bare forward + loss + backward + SGD step of the same model on
the same images (decoded and augmented beforehand, in memory); prints the ratio loop/bare (goal >= 0.8). Default: yolov3-tiny at 416 on
CPU over COCO128 from the shared assets.

Steps alternate in rounds (bare steps, then a short `fit` epoch, ...) so the other processes' load affects both
sides alike; the ratio uses median step times (mean-based figures are in the JSON too). The first step of each
round (worker start, allocator warm-up) is not counted.

    python benchmarks/train_speed.py --rounds 2 --steps 3 --threads 1 --out train_speed.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from tabulate import tabulate

from compress import load
from compress.data.dataset import DetectionDataset, collate, to_input
from compress.data.dataspec import DataSpec
from compress.base.fileio import write_text_atomic
from compress.detection.losses import LOSSES, build_loss
from compress.train import TrainConfig, fit
from compress.train.hooks import Hook
from compress.train.optim import build_optimizer

ASSETS = Path(os.environ.get("YOLO_COMPRESS_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))


class StepTimer(Hook):
    """Wall time between consecutive optimizer steps of `fit` (a whole loop iteration each)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_fit_start(self, state) -> None:
        self._last = None

    def after_step(self, state) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def loop_round(model, images: list[Path], nc: int, config: TrainConfig, device: str, timer: StepTimer) -> None:
    """One `fit` epoch over `images` (no validation split: no evaluation, no files)."""
    fit(model, DataSpec(images, [], [str(i) for i in range(nc)], "bench"), config, hooks=[timer], device=device)


def bare_round(model, batches: list[tuple[torch.Tensor, torch.Tensor]], loss_name: str, config: TrainConfig,
               device: str) -> list[float]:
    """forward + loss + backward + SGD step on in-memory batches (the loop's images, already decoded and
    augmented); per-step wall times after the first."""
    model.train()
    loss_fn = build_loss(loss_name, model, config)
    opt = build_optimizer(model, "sgd", 1e-4, 0.9, 5e-4)
    times = []
    for step, (imgs, targets) in enumerate(batches):
        imgs, targets = to_input(imgs, device), targets.to(device)
        t0 = time.perf_counter()
        total, _ = loss_fn(model(imgs), targets, tuple(imgs.shape[-2:]))
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t0)
    return times


def measure(cfg: Path, weights: Path | None, images: Path, img_size: int, batch: int, steps: int, rounds: int,
            workers: int, device: str, loss: str = "darknet") -> dict:
    files = sorted(images.glob("*.jpg"))[:(steps + 1) * batch]
    model = load(cfg, weights, device=device)
    config = TrainConfig(epochs=1, batch_size=batch, img_size=img_size, workers=workers, loss=loss, lr0=1e-4,
                         eval_every=1, seed=0)
    ds = DetectionDataset(files, img_size, augment=True, num_classes=model.num_classes, aug=config.augment_config())
    batches = [collate([ds[i] for i in range(k * batch, (k + 1) * batch)])[:2] for k in range(steps + 1)]
    timer, bare = StepTimer(), []
    for _ in range(rounds):
        bare += bare_round(model, batches, loss, config, device)
        loop_round(model, files, model.num_classes, config, device, timer)
    loop = timer.times
    n_loop, n_bare = statistics.median(loop), statistics.median(bare)
    return {"cfg": str(cfg), "loss": loss, "img_size": img_size, "batch_size": batch, "workers": workers,
            "device": device, "threads": torch.get_num_threads(), "steps_loop": len(loop), "steps_bare": len(bare),
            "loop_images_per_s": round(batch / n_loop, 3), "bare_images_per_s": round(batch / n_bare, 3),
            "loop/bare": round(n_bare / n_loop, 3),
            "loop/bare (means)": round(statistics.mean(bare) / statistics.mean(loop), 3),
            "loop_step_s": [round(t, 3) for t in loop], "bare_step_s": [round(t, 3) for t in bare]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cfg", type=Path, default=ASSETS / "weights" / "yolov3-tiny.cfg")
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--images", type=Path, default=ASSETS / "data" / "coco128" / "images" / "train2017")
    ap.add_argument("--img-size", type=int, default=416)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="counted steps per round and side")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is steadier on a loaded CPU")
    ap.add_argument("--loss", default="darknet", choices=sorted(LOSSES))
    ap.add_argument("--out", type=Path, help="Write the figures as JSON here.")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    row = measure(args.cfg, args.weights, args.images, args.img_size, args.batch_size, args.steps, args.rounds,
                  args.workers, args.device, args.loss)
    shown = {k: v for k, v in row.items() if not isinstance(v, list)}
    print(tabulate([shown.values()], headers=list(shown.keys()), tablefmt="github"))
    if args.out:
        write_text_atomic(args.out, json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
