"""Does distillation help? no-KD fine-tuning vs KD strategies 1-5 on a hard-pruned demo model (synthetic set).

Teacher: recipes/demo.cfg trained on `data synth` as the demo recipe's train step does (50 epochs, Adam, lr 0.003,
batch 16; trained once and reused from --work). Student: the teacher pruned with `--prune-method` at `--percent`
(default l1 0.6), so fine-tuning alone stays well below the teacher. Every variant fine-tunes that student on
the whole train set with the same seed, epochs and schedule; mAP is measured on the synthetic valid set after the
last epoch (EMA model). Table: mean +- std over --seeds, the difference to no-KD and the std of the per-seed
(paired) differences.

    python benchmarks/kd.py --work runs/kd-bench --out kd.json   # teacher ~5 min, then 18 runs of ~1-2 min each
    python benchmarks/kd.py --seeds 0 --variants none 3 --epochs 4 --out q.json  # a quick look

Results are cached per (variant, seed) in WORK/results.json, so an interrupted run continues.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch
from tabulate import tabulate

from compress import load, save
from compress.darknet.cfg import read_cfg
from compress.data.dataset import DataSpec, load_data_spec
from compress.distill import DEFAULT_STRATEGY, DistillConfig, distill
from compress.detection.evaluate import EvalConfig, evaluate
from compress.base.fileio import write_text_atomic
from compress.detection.losses import init_head_biases
from compress.darknet.model import build_model
from compress.prune import PruneConfig, prune
from compress.data.synth import synthesize
from compress.train import TrainConfig, fit

ROOT = Path(__file__).resolve().parents[1]
# name -> DistillConfig kwargs (None: plain fine-tuning). "refN": the reference's formulation and weights.
VARIANTS: dict[str, dict | None] = {
    "none": None, **{str(k): {"strategy": k} for k in range(1, 6)},
    **{f"ref{k}": {"strategy": k, "reference": True} for k in range(1, 6)},
}


def variant_kwargs(name: str) -> dict | None:
    """A VARIANTS name, or 'K:key=value,...' = strategy K with DistillConfig overrides (e.g. '3:temperature=2')."""
    if name in VARIANTS:
        return VARIANTS[name]
    k, _, rest = name.partition(":")
    kw: dict = {"strategy": int(k)}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        kw[key] = tuple(float(v) for v in value.split("/")) if "/" in value else _value(value)
    return kw


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def teacher(work: Path, data: Path, epochs: int) -> tuple[Path, Path]:
    out = work / "teacher"
    if not (out / "best.weights").is_file():
        model = build_model(read_cfg(ROOT / "recipes" / "demo.cfg"))
        init_head_biases(model, 128)
        config = TrainConfig(epochs=epochs, batch_size=16, img_size=128, lr0=0.003, optimizer="adam",
                             warmup_epochs=1, eval_every=10, workers=0, progress=False)
        fit(model, load_data_spec(data), config, out_dir=out)
    return out / "best.cfg", out / "best.weights"


def student(work: Path, t_cfg: Path, t_weights: Path, method: str, percent: float) -> tuple[Path, Path]:
    cfg, weights = work / f"student-{method}{percent}.cfg", work / f"student-{method}{percent}.weights"
    if not weights.is_file():
        result = prune(load(t_cfg, t_weights), PruneConfig(method=method, percent=percent))
        save(result.model, cfg, weights)
    return cfg, weights


def score(cfg: Path, weights: Path, data: Path) -> dict:
    spec = load_data_spec(data)
    r = evaluate(load(cfg, weights).eval(), spec.valid, EvalConfig(img_size=128, workers=0, progress=False), "cpu")
    return {"map50": float(r.map50), "map50_95": float(r.map50_95)}


def run_variant(name: str, seed: int, args: argparse.Namespace, paths: dict) -> dict:
    train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, img_size=128, lr0=args.lr0, optimizer="adam",
                        warmup_epochs=0, eval_every=args.epochs, workers=0, seed=seed, progress=False)
    s = load(paths["s_cfg"], paths["s_weights"])
    spec = load_data_spec(paths["data"])
    if args.n_train:  # a subset keeps the benchmark cheap on a shared 2-core CPU
        spec = DataSpec(train=spec.train[:args.n_train], valid=spec.valid, names=spec.names, source=spec.source)
    t0 = time.perf_counter()
    kw = variant_kwargs(name)
    if kw is None:
        res = fit(s, spec, train)
        row = {**res.metrics}
    else:
        kw = dict(kw)
        config = DistillConfig.reference(**{k: v for k, v in kw.items() if k != "reference"}) \
            if kw.pop("reference", False) else DistillConfig(**kw)
        res = distill(s, load(paths["t_cfg"], paths["t_weights"]), spec, config, train)
        d = res.to_dict()
        row = {"map50": d["map50_kd"], "map50_95": d["map50_95_kd"], "kd_weights": d["kd_weights"],
               "shares_first": d["kd_shares"]["first_epoch"], "shares_last": d["kd_shares"]["last_epoch"],
               "recalibrations": (d["kd_calibration"] or {}).get("recalibrations", [])}
    return {**row, "variant": name, "seed": seed, "seconds": round(time.perf_counter() - t0, 1)}


def term_ratios(paths: dict, n_images: int = 16) -> list[dict]:
    """KD term / detection loss on one training batch, per strategy: the reference's absolute weights vs the
    calibrated ones (issue 10: reference KD1 ~48x the detection loss, attention 1e-6..1e-5)."""
    from compress.data.dataset import DetectionDataset, collate, to_input
    from compress.distill import DistillHook
    from compress.detection.losses import YoloLoss

    spec = load_data_spec(paths["data"])
    imgs, targets, _, _ = collate([DetectionDataset(spec.train[:n_images], 128, num_classes=spec.nc)[i]
                                   for i in range(n_images)])
    imgs = to_input(imgs)
    s, t = load(paths["s_cfg"], paths["s_weights"]).train(), load(paths["t_cfg"], paths["t_weights"])
    rows = []
    for k in range(1, 6):
        for name, config in (("reference", DistillConfig.reference(k, reference_kd1=k == 1)),
                             ("calibrated", DistillConfig(strategy=k))):
            hook = DistillHook(t, config)
            hook.setup(s, (128, 128))
            with torch.no_grad():
                heads = s(imgs)
                det = float(YoloLoss(s)(heads, targets, (128, 128))[0]) / n_images
                parts = hook.loss(imgs, targets, heads, det=det)
            hook.teardown()
            rows.append({"strategy": k, "weights": name, "det": det,
                         **{f"{n}/det": float(parts[n]) / det for n in ("kd_soft", "kd_box", "kd_feat") if n in parts}})
    return rows


def summarize(results: list[dict], variants: list[str]) -> list[dict]:
    rows = []
    for name in variants:
        rs = [r for r in results if r["variant"] == name]
        if not rs:
            continue
        row = {"variant": name, "n": len(rs)}
        for key in ("map50", "map50_95"):
            vals = [r[key] for r in rs]
            row[key] = statistics.mean(vals)
            row[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(row)
    base = next((r for r in rows if r["variant"] == "none"), None)
    none = {r["seed"]: r["map50_95"] for r in results if r["variant"] == "none"}
    for r in rows:
        r["delta_map50_95"] = r["map50_95"] - base["map50_95"] if base else None
        # paired by seed (same initial student, data order and augmentation): the spread of the KD effect itself
        diffs = [x["map50_95"] - none[x["seed"]] for x in results if x["variant"] == r["variant"] and x["seed"] in none]
        r["paired_delta_std"] = statistics.stdev(diffs) if len(diffs) > 1 else None
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "kd-bench")
    p.add_argument("--out", type=Path, default=None, help="JSON with every run and the summary")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=["none", "1", "2", "3", "4", "5"],
                   help=f"{', '.join(VARIANTS)} or 'K:key=value,...' (DistillConfig overrides; a/b/c = a tuple)")
    p.add_argument("--quick", action="store_true", help="seed 0, no-KD vs the default strategy only")
    p.add_argument("--ratios-only", action="store_true", help="only print KD term / detection loss on one batch")
    p.add_argument("--teacher", nargs=2, type=Path, metavar=("CFG", "WEIGHTS"), help="use this teacher")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr0", type=float, default=0.001)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--teacher-epochs", type=int, default=50, help="the demo recipe's train step: 50")
    p.add_argument("--prune-method", default="l1")
    p.add_argument("--percent", type=float, default=0.6)
    p.add_argument("--n-train", type=int, default=0, help="fine-tune on the first N train images (0: all 192)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.variants = [0], ["none", str(DEFAULT_STRATEGY)]
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work
    data = work / "synth" / "synth.data"
    if not data.is_file():
        synthesize(work / "synth", img_size=128, seed=0)
    t_cfg, t_weights = args.teacher or teacher(work, data, args.teacher_epochs)
    s_cfg, s_weights = student(work, t_cfg, t_weights, args.prune_method, args.percent)
    paths = dict(data=data, t_cfg=t_cfg, t_weights=t_weights, s_cfg=s_cfg, s_weights=s_weights)
    if args.ratios_only:
        rows = term_ratios(paths)
        print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".3g"))
        if args.out:
            write_text_atomic(args.out, json.dumps({"term_ratios": rows}, indent=1) + "\n")
        return
    cache = work / "results.json"
    results = json.loads(cache.read_text()) if cache.is_file() else []
    setup = {"epochs": args.epochs, "lr0": args.lr0, "prune": f"{args.prune_method} {args.percent}",
             "n_train": args.n_train, "batch_size": args.batch_size, "teacher": str(t_weights)}
    results = [r for r in results if r.get("setup") == setup]
    for seed in args.seeds:
        for name in args.variants:
            if any(r["variant"] == name and r["seed"] == seed for r in results):
                continue
            r = {**run_variant(name, seed, args, paths), "setup": setup}
            print(f"{name} seed {seed}: mAP@.5 {r['map50']:.4f} mAP@.5:.95 {r['map50_95']:.4f} ({r['seconds']} s)",
                  flush=True)
            results.append(r)
            write_text_atomic(cache, json.dumps(results, indent=1) + "\n")
    mine = [r for r in results if r["seed"] in args.seeds and r["variant"] in args.variants]
    rows = summarize(mine, args.variants)
    ref = {"teacher": score(t_cfg, t_weights, data), "student_before": score(s_cfg, s_weights, data)}
    print(f"teacher {ref['teacher']}, pruned student before fine-tuning {ref['student_before']}")
    print(tabulate([[r["variant"], r["n"], f"{r['map50']:.4f} +- {r['map50_std']:.4f}",
                     f"{r['map50_95']:.4f} +- {r['map50_95_std']:.4f}",
                     "-" if r["delta_map50_95"] is None else f"{r['delta_map50_95']:+.4f}",
                     "-" if r["paired_delta_std"] is None else f"{r['paired_delta_std']:.4f}"] for r in rows],
                   headers=["variant", "seeds", "mAP@.5", "mAP@.5:.95", "vs no-KD", "std of paired diff"],
                   tablefmt="github"))
    if args.out:
        write_text_atomic(args.out, json.dumps({"setup": {**setup, "seeds": args.seeds, **ref},
                                                "summary": rows, "runs": mine}, indent=1) + "\n")


if __name__ == "__main__":
    main()
