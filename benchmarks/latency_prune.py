"""Prune to a latency target (issue 25): does the measured latency land on the target, and is the model better
than uniform `--percent` pruning with the same importance at the same measured latency?

    .venv/bin/python benchmarks/latency_prune.py --out latency_prune.json
    .venv/bin/python benchmarks/latency_prune.py --cases yolo-fastest-1.1@320:l1 --runtimes ncnn --targets 0.7

For each case (model@size:method) and runtime (1 thread): the per-layer latency table is measured once (kept in
--tables, so a rerun reuses it), then for each target `prune_to_latency` (what `prune --target-latency R
--runtime RT --threads 1` runs) gives the latency-targeted model. The uniform baseline is the method's own
global `--percent` threshold, its percent found by bisection on the same table so that its predicted latency
equals the targeted model's, then corrected by up to 3 secant steps on its measured latency. The unpruned,
targeted and uniform models are then timed together, round-robin (`measure_models`: 0.25-quantile of process
CPU time per run, 1 thread), and both pruned models are evaluated with no fine-tuning: mAP@.5 on the 32 held-out
COCO128 images (sorted by name, every 4th: `data split`'s rule) as cut, and, with --reconstruct N (default 64),
after the least-squares refit of `prune --reconstruct N` (no labels, no gradient steps) on the first N of the
other 96 images, on the held-out 32, on every image the refit did not see (128 - N) and on all 128. Without it
every cut of the official weights scores ~0, targeted and uniform alike, which compares nothing.
Floors: --layer-keep F floors every layer of both cuts; without it the targeted cut has a target search's default
floor (`PruneConfig.keep_floor`: 0.5) and the uniform cut the same. When that floored uniform cut cannot reach the
targeted model's measured latency (its measured ratio more than 7 % above), the uniform cut is built again with
--percent's default floor (0.01) and matched the same way: the row keeps both (`uniform`, `uniform_unfloored`),
and `compared` names the one the table shows: the one at the targeted model's latency (the issue compares the two
"at the same measured latency"), else the nearer.
Weights: the official Darknet weights, or `MODEL@SIZE:METHOD=WEIGHTS` (e.g. slim after `sparse-train`).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

import compress
from compress.base.errors import WeightsError
from compress.base.fileio import write_text_atomic
from compress.data.dataspec import DataSpec, load_data_spec
from compress.data.split import holdout_split
from compress.deploy.latency import measure_models
from compress.deploy.latency_table import machine_id
from compress.detection.evaluate import EvalConfig, evaluate, input_letterbox
from compress.prune import PruneConfig, prune, select_mask
from compress.prune.registry import LAYER_KEEP
from compress.prune.costs import LatencyCost, Target
from compress.prune.coupling import build_coupling
from compress.prune.latency_target import LatencySettings, areas, latency_table, prune_to_latency
from compress.prune.layout import build_layout, cuttable_groups
from compress.prune.reconstruct import reconstruct
from compress.train.bn_adapt import image_batches

ASSETS = Path(os.environ.get("YOLO_COMPRESS_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
CASES = ("yolov4-tiny@416:l1", "yolov4-tiny@416:slim", "yolo-fastest-1.1@320:l1")
REACH = 0.07  # a uniform cut "reaches" the targeted model's latency within this relative miss (the issue's +-7 %)


def predicted_ratio(model: compress.DarknetModel, mask: dict, cost: LatencyCost) -> float:
    """The table's predicted latency ratio of `model` cut by `mask` (any widths, not only multiples)."""
    coupling = build_coupling(model.graph)
    layout = build_layout(coupling, cuttable_groups(coupling))
    full = list(layout.full)
    kept = [int(mask[g[0]].sum()) if g[0] in mask else f for g, f in zip(layout.groups, full)]
    saved = sum(cost.layer(i, layout.in_width(i, full), layout.out_width(i, full))
                - cost.layer(i, layout.in_width(i, kept), layout.out_width(i, kept)) for i in layout.blocks)
    return 1 - saved / cost.base


def uniform_percent(model: compress.DarknetModel, method: str, cost: LatencyCost, goal: float,
                    keep: float) -> float:
    """The --percent whose predicted latency ratio is `goal` (bisection; the method's global threshold)."""
    lo, hi = 0.0, 0.99
    for _ in range(10):
        mid = (lo + hi) / 2
        mask, _ = select_mask(model, PruneConfig(method=method, percent=mid, layer_keep=keep))
        if predicted_ratio(model, mask, cost) > goal:
            lo = mid
        else:
            hi = mid
    return hi


def uniform_model(model, method: str, percent: float, keep: float):  # type: ignore[no-untyped-def]
    return prune(model, PruneConfig(method=method, percent=percent, layer_keep=keep))


@dataclass(frozen=True)
class Images:
    """The 96/32 split of COCO128: `held` scores the held-out 32, `full` all 128, `unseen` every image the refit
    did not use (the held-out 32 and the training images after the first `refit`); the first `refit` of
    `held.train` (the other 96, sorted) refit the pruned models (0: none)."""
    held: DataSpec
    full: DataSpec
    refit: int

    @property
    def unseen(self) -> DataSpec:
        return DataSpec(self.held.train, list(self.held.valid) + list(self.held.train[self.refit:]),
                        self.held.names)


def map50(model, data: DataSpec, size: int) -> float | None:  # type: ignore[no-untyped-def]
    """mAP@.5, or None when the model's output overflows (Inf/NaN) on one of the images."""
    try:
        return round(evaluate(model, data, EvalConfig(img_size=size, progress=False, workers=0), "cpu").map50, 4)
    except WeightsError as e:
        logging.warning("no mAP: %s", e)
        return None


def scores(original, result, images: Images, size: int, key: str) -> dict:  # type: ignore[no-untyped-def]
    """mAP@.5 of the pruned model as cut (held-out 32) and after the least-squares refit on `images.refit`
    training images (held-out 32 and all 128); `result.model` is refitted in place."""
    pruned = result.model
    out = {f"map50_{key}": map50(pruned, images.held, size)}
    if images.refit:
        letterbox = input_letterbox(original, None)
        batches = image_batches(images.held.train, size, 8, math.ceil(images.refit / 8), letterbox)
        reconstruct(original, pruned, result.mask, batches, removed=result.removed_blocks)
        out.update({f"map50_{key}_refit": map50(pruned, images.held, size),
                    f"map50_{key}_refit_unseen": map50(pruned, images.unseen, size),
                    f"map50_{key}_refit_all": map50(pruned, images.full, size)})
    return out


def match_uniform(model, method: str, size: int, settings: LatencySettings, want: float, percent: float,
                  rounds: int, keep: float, tries: int = 3
                  ) -> tuple[float, object, float]:  # type: ignore[no-untyped-def]
    """The uniform --percent whose MEASURED latency ratio is closest to `want` (percent, cut, that ratio): start
    from `percent` (the table's guess), then secant steps on (percent, measured ratio), each timed against the
    unpruned model."""
    pts: list[tuple[float, float, object]] = []
    for _ in range(tries):
        uniform = uniform_model(model, method, percent, keep)
        base, flat = measure_models([model, uniform.model], settings.runtime, 1, size, rounds)
        pts.append((percent, flat / base, uniform))
        if abs(flat / base / want - 1) <= 0.02:
            break
        near = sorted(pts, key=lambda p: abs(p[1] - want))[:2]
        if len(near) == 2 and near[0][1] != near[1][1]:
            (p1, r1, _), (p2, r2, _) = near
            percent = p1 + (want - r1) * (p2 - p1) / (r2 - r1)
        else:
            percent += (flat / base - want) / 0.8   # about -0.8 latency ratio per unit of percent
        percent = min(0.99, max(0.0, percent))
    best = min(pts, key=lambda p: abs(p[1] - want))
    return best[0], best[2], best[1]


@dataclass(frozen=True)
class Uniform:
    """A uniform --percent cut matched to the targeted model's measured latency, at per-layer floor `keep`."""
    keep: float
    percent: float
    result: object   # PruneResult
    matched_ratio: float   # its measured latency ratio when matched


def build_uniform(model, method: str, size: int, settings: LatencySettings, cost: LatencyCost, predicted: float,
                  want: float, rounds: int, keep: float) -> Uniform:  # type: ignore[no-untyped-def]
    """The uniform cut at floor `keep`: its percent guessed on the table at the targeted plan's `predicted`
    ratio, then matched to the measured ratio `want`."""
    guess = uniform_percent(model, method, cost, predicted, keep)
    return Uniform(keep, *match_uniform(model, method, size, settings, want, guess, rounds, keep))


def uniform_cuts(model, method: str, size: int, settings: LatencySettings, cost: LatencyCost, predicted: float,
                 want: float, rounds: int, keep: float) -> dict[str, Uniform]:  # type: ignore[no-untyped-def]
    """`uniform` at the targeted cut's floor; when it measures more than REACH above `want` (a floor of half of
    every layer cannot get that fast), also `uniform_unfloored` at --percent's default floor."""
    cuts = {"uniform": build_uniform(model, method, size, settings, cost, predicted, want, rounds, keep)}
    reached = cuts["uniform"].matched_ratio
    if reached / want - 1 > REACH and keep > LAYER_KEEP.percent:
        logging.info("uniform at floor %s measures %.3f vs %.3f: also at floor %s", keep, reached, want,
                     LAYER_KEEP.percent)
        cuts["uniform_unfloored"] = build_uniform(model, method, size, settings, cost, predicted, want, rounds,
                                                  LAYER_KEEP.percent)
    return cuts


def compared(ratios: dict[str, float], want: float) -> str:
    """The uniform cut the table shows: `uniform` when it reaches the targeted latency `want`, else the nearer."""
    if abs(ratios["uniform"] / want - 1) <= REACH:
        return "uniform"
    return min(ratios, key=lambda k: abs(ratios[k] / want - 1))


def one_target(model, method: str, size: int, settings: LatencySettings, target: float, images: Images,
               rounds: int, keep: float | None) -> dict:
    t0 = time.time()
    config = PruneConfig(method=method, target=Target("latency", ratio=target), layer_keep=keep)
    result, fig = prune_to_latency(model, config, settings, size)
    table, _ = latency_table(model, settings, size)
    cost = LatencyCost(table, areas(model, size))
    cuts = uniform_cuts(model, method, size, settings, cost, predicted_ratio(model, result.mask, cost),
                        fig["measured_ratio"], rounds, config.keep_floor)
    base, targeted, *flat = measure_models([model, result.model, *(c.result.model for c in cuts.values())],
                                           settings.runtime, 1, size, rounds)
    ratios = {name: ms / base for name, ms in zip(cuts, flat)}
    uniform = {name: {"layer_keep": c.keep, "percent": round(c.percent, 4), "ms": round(ms, 3),
                      "ratio": round(ms / base, 4), "matched_ratio": round(c.matched_ratio, 4),
                      **scores(model, c.result, images, size, "uniform")}
               for (name, c), ms in zip(cuts.items(), flat)}
    return {"target": target, "layer_keep": config.keep_floor, "measured_ratio": round(targeted / base, 4),
            "miss": round(targeted / base / target - 1, 4), "predicted_ratio": fig["predicted_ratio"],
            "loop_rounds": len(fig["rounds"]), "base_ms": round(base, 3), "targeted_ms": round(targeted, 3),
            **scores(model, result, images, size, "targeted"), **uniform,
            "compared": compared(ratios, targeted / base),
            "removed_units": fig["removed_units"],
            "widths": [{"layer": i, "before": model.graph.channels[i], "after": int(m.sum())}
                       for i, m in sorted(result.mask.items())],
            "seconds": round(time.time() - t0), "loadavg_1min": round(os.getloadavg()[0], 2)}


def run_case(case: str, runtimes: list[str], targets: list[float], images: Images, tables: Path,
             rounds: int, keep: float | None) -> list[dict]:
    """`case`: MODEL@SIZE:METHOD[=WEIGHTS] (default: the official weights of MODEL)."""
    name_size, method_weights = case.split(":")
    method, _, weights = method_weights.partition("=")
    name, size = name_size.split("@")
    w = ASSETS / "weights"
    model = compress.load(w / f"{name}.cfg", weights or w / f"{name}.weights").eval()
    base = {"map50_unpruned": map50(model, images.held, int(size)),
            "map50_unpruned_unseen": map50(model, images.unseen, int(size)),
            "map50_unpruned_all": map50(model, images.full, int(size)), "weights": weights or "official"}
    rows = []
    for runtime in runtimes:
        settings = LatencySettings(runtime, 1, tables, refine=3, rounds=rounds)
        for target in targets:
            row = {"model": name, "img_size": int(size), "method": method, "runtime": runtime, **base,
                   **one_target(model, method, int(size), settings, target, images, rounds, keep)}
            logging.info("%s", {k: v for k, v in row.items() if k != "widths"})
            rows.append(row)
    return rows


HEADERS = ["model", "method", "runtime", "target", "layer_keep", "measured_ratio", "miss", "compared", "uniform_keep",
           "uniform_ratio", "uniform_percent", "map50_unpruned", "map50_targeted", "map50_uniform",
           "map50_targeted_refit", "map50_uniform_refit", "map50_unpruned_unseen", "map50_targeted_refit_unseen",
           "map50_uniform_refit_unseen"]


def table_row(row: dict) -> list:
    """HEADERS of `row`, the uniform figures from the cut it compares with (`compared`)."""
    uniform = row[row["compared"]]
    flat = {**row, **uniform, "uniform_keep": uniform["layer_keep"], "uniform_ratio": uniform["ratio"],
            "uniform_percent": uniform["percent"], "layer_keep": row["layer_keep"]}
    return [flat.get(h) for h in HEADERS]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), help="MODEL@SIZE:METHOD")
    ap.add_argument("--runtimes", nargs="+", default=["onnxruntime", "ncnn"])
    ap.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.7])
    ap.add_argument("--reconstruct", type=int, default=64,
                    help="refit both pruned models on this many of the 96 training images (0: score the cut only)")
    ap.add_argument("--rounds", type=int, default=30, help="round-robin runs per latency measurement")
    ap.add_argument("--layer-keep", type=float, default=None,
                    help="per-layer floor of both the targeted and the uniform cut (default: a target search's, "
                         f"{LAYER_KEEP.target}, for both)")
    ap.add_argument("--tables", type=Path, default=Path("runs/latency_tables.json"), help="latency table cache")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("compress.deploy.export", "compress.prune.api", "compress.prune.surgery"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    spec = load_data_spec(ASSETS / "data" / "coco128" / "images" / "train2017")
    train, held = holdout_split(spec.train)
    images = Images(DataSpec(train, held, spec.names), DataSpec(train, sorted(spec.valid), spec.names),
                    args.reconstruct)
    load_before, rows = os.getloadavg()[0], []
    for case in args.cases:
        rows += run_case(case, args.runtimes, args.targets, images, args.tables, args.rounds, args.layer_keep)
        if args.out:
            write_text_atomic(args.out, json.dumps({"rows": rows}, indent=2) + "\n")
    print(tabulate([table_row(r) for r in rows], headers=HEADERS, tablefmt="github"))
    figures = {"cpu": machine_id(), "cores": os.cpu_count(),
               "loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0],
               "clock": "0.25-quantile of process CPU time per run, 1 thread, round-robin",
               "scored_on": "COCO128: held-out 32 (every 4th by name) and all 128", "refit_images": args.reconstruct,
               "weights": "per row (official Darknet weights unless given); no fine-tuning",
               "rows": rows}
    print(f"\n1-min load average {load_before:.1f} before, {figures['loadavg_1min_after']:.1f} after "
          f"({os.cpu_count()} cores)")
    if args.out:
        write_text_atomic(args.out, json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
