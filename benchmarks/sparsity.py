"""Does sparse training sparsify? Per variant (optimizer, L1 update, s, target): sparse-train a trained model,
then slim-prune the SAVED (EMA) model at several percents WITHOUT fine-tuning, and report mAP@.5 before/after,
the share of |gamma| < 1e-2, the safe percent and the final s.

    .venv/bin/python benchmarks/sparsity.py --cfg runs/demo/01-train/best.cfg \\
        --weights runs/demo/01-train/best.weights --data runs/demo/00-data/synth.data \\
        --epochs 15 --percents 0.5,0.6,0.7 --out sparsity.json

A variant is `optimizer:update:s[:target]`, e.g. `adam:proximal:0.005:0.6` (update auto|subgradient|proximal;
s=0 = fine-tuning only, the control). The defaults compare the old behaviour (Adam + subgradient, which the
adaptive step normalises away) with the proximal step and with SGD.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from compress.data.dataset import load_data_spec
from compress.detection.evaluate import EvalConfig, evaluate
from compress.darknet.persist import load
from compress.prune import PruneConfig, prune
from compress.prune.sparsity import SparsityConfig, sparse_train
from compress.train import TrainConfig

DEFAULT_VARIANTS = "adam:subgradient:0.01,adam:proximal:0.005:0.6,sgd:subgradient:0.01,sgd:proximal:0.01"


def _variant(text: str) -> dict:
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise SystemExit(f"variant {text!r}: expected optimizer:update:s[:target]")
    return {"optimizer": parts[0], "update": parts[1], "s": float(parts[2]),
            "target": float(parts[3]) if len(parts) == 4 else None}


def _map50(model, data: str, size: int) -> float:
    return float(evaluate(model, data, EvalConfig(img_size=size, progress=False), "cpu").map50)


def run_variant(args: argparse.Namespace, v: dict, percents: list[float], work: Path) -> dict:
    model = load(args.cfg, args.weights)
    spec = load_data_spec(args.data)
    sparsity = SparsityConfig(s=v["s"], mode=1, update=v["update"], target=v["target"], growth=args.growth,
                              schedule=args.schedule)
    lr = args.lr0 if v["optimizer"] != "sgd" else args.lr0_sgd
    train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, img_size=args.img_size, lr0=lr,
                        optimizer=v["optimizer"], warmup_epochs=0, workers=args.workers, progress=False,
                        eval_every=args.epochs, seed=args.seed)
    t0 = time.perf_counter()
    out = work / f"{v['optimizer']}-{v['update']}-{v['s']}-{v['target']}"
    result, hook = sparse_train(model, spec, sparsity, train, "cpu", out)
    saved = load(result.last_cfg, result.last_weights)  # the EMA copy, as sparse-train saves it
    summary = hook.summary(saved)
    row = {"variant": f"{v['optimizer']}:{v['update']}:{v['s']}" + (f":{v['target']}" if v["target"] else ""),
           "l1_update": summary["l1_update"], "s_final": round(summary["s_final"], 6),
           "share<1e-2": round(summary["gamma"]["share_below_1e-2"], 4),
           "safe_percent": summary.get("safe_percent"), "near_zero_percent": summary.get("near_zero_percent"),
           "target_epoch": summary.get("target_reached_epoch"),
           "map50_sparse": round(_map50(saved, args.data, args.img_size), 4),
           "train_s": round(time.perf_counter() - t0, 1)}
    for p in percents:
        pruned = prune(saved, PruneConfig(method="slim", percent=p)).model
        row[f"slim{p}"] = round(_map50(pruned, args.data, args.img_size), 4)
        row[f"drop{p}"] = round(row["map50_sparse"] - row[f"slim{p}"], 4)
    logging.info("%s", row)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cfg", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--percents", default="0.5,0.6,0.7")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr0", type=float, default=0.002, help="Adam/AdamW learning rate")
    ap.add_argument("--lr0-sgd", type=float, default=0.01)
    ap.add_argument("--growth", type=float, default=2.0)
    ap.add_argument("--schedule", default="constant", help="--s-schedule: constant | step | relax")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, help="keep the sparse-train outputs here (default: a temp dir)")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    percents = [float(p) for p in args.percents.split(",")]
    base = _map50(load(args.cfg, args.weights), args.data, args.img_size)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        rows = [run_variant(args, _variant(v), percents, work) for v in args.variants.split(",")]
    print(f"start model mAP@.5 {base:.4f}; slim without fine-tuning on the saved (EMA) sparse model")
    print(tabulate(rows, headers="keys", tablefmt="github"))
    if args.out:
        args.out.write_text(json.dumps({"cfg": args.cfg, "weights": args.weights, "map50_start": base,
                                        "epochs": args.epochs, "lr0": args.lr0, "lr0_sgd": args.lr0_sgd,
                                        "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
