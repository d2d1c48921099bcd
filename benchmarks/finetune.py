"""Fine-tuning official Darknet weights must not make them worse: mAP before vs after `train --weights`.

For each model, runs the issue's command with the train command's defaults (only --loss varies if asked):
    train --cfg M.cfg --weights M.weights --data coco128 --epochs 2 --img-size S --batch-size 8
(S: the cfg's own [net] width unless --img-size is given) and compares the mAP@.5 / mAP@.5:.95 of the trained
model (the last epoch's and the reported best) with the pretrained model's, both measured by
`compress.detection.evaluate` on COCO128 (the training images) at the same size.

    python benchmarks/finetune.py --out finetune.json [--models yolov4-tiny yolov3-tiny] [--loss darknet v5]
    # a shorter check: the first 64 images, 320 px, evaluated once after training
    python benchmarks/finetune.py --limit 64 --img-size 320 --out ft.json --extra --eval-every 2
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from click.testing import CliRunner
from tabulate import tabulate

from compress import load, read_cfg
from compress.cli import cli
from compress.data.dataset import load_data_spec
from compress.detection.evaluate import EvalConfig, evaluate
from compress.base.fileio import write_text_atomic

ASSETS = Path(os.environ.get("YOLO_COMPRESS_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
MODELS = ("yolov4-tiny", "yolov3-tiny", "yolo-fastest-1.1")


def score(cfg: Path, weights: Path, data: Path, img_size: int) -> tuple[float, float, str]:
    """mAP@.5, mAP@.5:.95 and the input geometry evaluate used (the cfg's: plain resize unless letter_box=1)."""
    r = evaluate(load(cfg, weights), load_data_spec(data), EvalConfig(img_size=img_size, progress=False))
    return round(float(r.map50), 4), round(float(r.map50_95), 4), "letterbox" if r.letterbox else "plain resize"


def run_one(name: str, loss: str | None, data: Path, img_size: int | None, epochs: int, batch: int, work: Path,
            extra: list[str]) -> dict:
    cfg, weights = ASSETS / "weights" / f"{name}.cfg", ASSETS / "weights" / f"{name}.weights"
    img_size = img_size or read_cfg(cfg).width  # the size the official weights were trained at
    before = score(cfg, weights, data, img_size)
    out = work / f"{name}-{loss or 'default'}"
    args = ["train", "--cfg", str(cfg), "--weights", str(weights), "--data", str(data), "--out", str(out),
            "--epochs", str(epochs), "--img-size", str(img_size), "--batch-size", str(batch), *extra]
    if loss:
        args += ["--loss", loss]
    t0 = time.perf_counter()
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    if res.exit_code:
        raise SystemExit(f"{name}: train failed\n{res.output}")
    report = json.loads((out / "report.json").read_text())
    final = report["history"][-1]  # the last epoch, evaluated by train itself (= out/last.weights)
    last = round(final["map50"], 4), round(final["map50_95"], 4)
    tc = report["train_config"]
    return {"model": name, "data": str(data), "loss": tc["loss"], "img_size": img_size, "epochs": epochs,
            "lr0": tc["lr0"],
            "freeze_bn_stats": tc["freeze_bn_stats"], "map50_before": before[0], "map50_95_before": before[1],
            "map50_last": last[0], "map50_95_last": last[1], "map50_best": report["map50"],
            "map50_95_best": report["map50_95"], "d_map50": round(last[0] - before[0], 4),
            "d_map50_95": round(last[1] - before[1], 4), "train_s": round(time.perf_counter() - t0),
            "geometry": before[2]}


def subset(data: Path, limit: int, work: Path) -> Path:
    """A .data file whose train and valid lists are the first `limit` images of the folder `data`."""
    images = sorted(load_data_spec(data).train)[:limit]
    names = data.parents[1] / "coco.names"
    work.mkdir(parents=True, exist_ok=True)
    (work / "subset.txt").write_text("".join(f"{p}\n" for p in images))
    (work / "subset.data").write_text(f"classes = 80\ntrain = {work / 'subset.txt'}\nvalid = {work / 'subset.txt'}\n"
                                      f"names = {names}\n")
    return work / "subset.data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--loss", nargs="+", default=[None], help="Losses to compare (default: train's default).")
    ap.add_argument("--data", type=Path, default=ASSETS / "data" / "coco128" / "images" / "train2017")
    ap.add_argument("--limit", type=int, help="Use only the first N images (train = valid).")
    ap.add_argument("--img-size", type=int, help="Train/eval size (default: each cfg's own [net] width).")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--work", type=Path, default=Path("runs/finetune"))
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="More train options (after the rest).")
    ap.add_argument("--out", type=Path, help="Write the rows as JSON here.")
    args = ap.parse_args()
    data = subset(args.data, args.limit, args.work) if args.limit else args.data
    rows = []
    for name in args.models:
        for loss in args.loss:
            rows.append(run_one(name, loss, data, args.img_size, args.epochs, args.batch_size, args.work,
                                args.extra))
            print(tabulate([rows[-1].values()], headers=list(rows[-1].keys()), tablefmt="github"), flush=True)
            if args.out:
                write_text_atomic(args.out, json.dumps(rows, indent=2) + "\n")
    print(tabulate([r.values() for r in rows], headers=list(rows[0].keys()), tablefmt="github"))


if __name__ == "__main__":
    main()
