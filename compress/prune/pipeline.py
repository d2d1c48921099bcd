"""File-level pruning job (what `yolo-compress prune` runs): load, measure, prune, measure, save, report."""
from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.base.checks import check_img_size
from compress.base.errors import PruneError, WeightsError
from compress.darknet.model import DarknetModel
from compress.darknet.persist import load, save
from compress.darknet.summary import stage_figures
from compress.data.dataspec import load_data_spec
from compress.detection.evaluate import EvalConfig, check_classes, evaluate, input_letterbox
from compress.prune.api import prune, target_cost
from compress.prune.latency_target import LatencySettings, prune_to_latency
from compress.prune.reconstruct import ReconstructConfig, reconstruct
from compress.prune.registry import PruneConfig, PruneResult
from compress.train.bn_adapt import adapt_bn, image_batches

__all__ = ["Measure", "prune_files"]

log = logging.getLogger(__name__)
_STAGE_KEYS = ("params", "gflops", "size_mb", "latency_ms", "map50", "map50_95")
COLLAPSE_RATIO = 0.3  # mAP@.5 after / before below this: the cut took channels the model needs (as in `fit`)


@dataclass(frozen=True)
class Measure:
    """How the model is measured before and after: mAP on `data` (None: not evaluated) at `img_size` (None: the
    cfg's width) with `letterbox` (None: the cfg's), CPU latency over `latency_runs` (0: not measured)."""
    data: str | os.PathLike | None = None
    img_size: int | None = None
    letterbox: bool | None = None
    device: str = "cpu"
    latency_runs: int = 0

    def __post_init__(self) -> None:
        if self.latency_runs < 0:
            raise PruneError(f"latency_runs {self.latency_runs} must be >= 0 (0 = do not measure latency)")
        check_img_size(self.img_size, multiple_of=32, error=PruneError)


def _evaluate(model: DarknetModel, measure: Measure, size: int) -> dict:
    if not measure.data:
        return {}
    result = evaluate(model, measure.data, EvalConfig(img_size=size, progress=False, letterbox=measure.letterbox),
                      measure.device)
    return {"map50": result.map50, "map50_95": result.map50_95}


def _figures(model: DarknetModel, measure: Measure, size: int, paths: tuple) -> dict:
    with torch.no_grad():
        return stage_figures(model, *paths, metrics=_evaluate(model, measure, size), img_size=(size, size),
                             latency_runs=measure.latency_runs)


def _prune(model: DarknetModel, config: PruneConfig, size: int, latency: LatencySettings) -> tuple[PruneResult, dict]:
    """Prune by percent, or to `config.target`: latency measured on the runtime (`latency_target`), FLOPs or
    params counted at `size`; the figures hold the target's report keys."""
    if config.target is None:
        return prune(model, config), {}
    if config.target.metric == "latency":
        result, figures = prune_to_latency(model, config, latency, size)
        return result, {"latency": figures, "target": {
            **config.target.to_dict(), "multiple": result.info["plan"]["multiple"],
            "predicted_ratio": figures["predicted_ratio"], "achieved_ratio": figures["measured_ratio"]}}
    result = prune(model, config, target_cost(model, config, None, size))
    return result, {}


def _counted_target(config: PruneConfig, result: PruneResult, before: dict, after: dict) -> dict:
    """A FLOPs/params target's report key: what was asked, predicted and counted on the pruned model."""
    if config.target is None or config.target.metric == "latency":
        return {}
    figure = {"flops": "gflops", "params": "params"}[config.target.metric]
    plan = result.info["plan"]
    return {"target": {**config.target.to_dict(), "multiple": plan["multiple"],
                       "predicted_ratio": plan["predicted_ratio"], "achieved_ratio": after[figure] / before[figure]}}


def _adapt(model: DarknetModel, measure: Measure, size: int, batches: int) -> tuple[DarknetModel, dict]:
    """BN adaptation of the pruned model on the training images of `measure.data` (batches of 8): a cut that
    is not exact (a channel with a non-zero gamma, a floor, rounding) moves the statistics of the layers after
    it. The adapted copy is kept when it scores better on the valid split than the model's own
    statistics (on a small set re-estimation can cost: see `fit`). Returns (model, report figures)."""
    if not measure.data or not batches:
        return model, {"bn_adapted_images": 0, "bn_adapted": False}
    adapted = copy.deepcopy(model)
    images = load_data_spec(measure.data).train
    letterbox = input_letterbox(model, measure.letterbox)
    seen = adapt_bn(adapted, image_batches(images, size, 8, batches, letterbox), measure.device)
    try:
        mine = _evaluate(adapted, measure, size)
    except WeightsError as e:  # re-estimates on a few images can make the net overflow: not kept (as in `fit`)
        log.warning("BN adaptation made the pruned model's output non-finite (%s); keeping its statistics", e)
        mine = {"map50": -1.0}
    theirs = _evaluate(model, measure, size)
    keep = mine["map50"] > theirs["map50"]  # a tie keeps the model's own statistics (see `fit`)
    return (adapted if keep else model), {"bn_adapted_images": seen, "bn_adapted": keep,
                                          "map50_unadapted": theirs["map50"]}


def check_reconstruct(images: int, data: object) -> None:
    """`--reconstruct N` fits on N training images of `--data`: refused without one (before anything runs)."""
    if images and not data:
        raise PruneError("--reconstruct needs --data: the least-squares refit runs on its training images")


def _reconstruct(model: DarknetModel, result: PruneResult, measure: Measure, size: int, images: int) -> dict:
    """Least-squares refit of the pruned model's convs on `images` training images of `measure.data` (batches of
    8, the model's input geometry)."""
    check_reconstruct(images, measure.data)
    if not images:
        return {"reconstructed_convs": []}
    spec = load_data_spec(measure.data)
    letterbox = input_letterbox(model, measure.letterbox)
    batches = image_batches(spec.train, size, 8, math.ceil(images / 8), letterbox)
    return reconstruct(model, result.model, result.mask, batches, ReconstructConfig(), measure.device,
                       result.removed_blocks)


def _collapsed(before: float | None, after: float | None, info: dict) -> bool | None:
    """Issue 23: a recipe ran on for 18 minutes from a pruned model at mAP 0.000 and nothing said so."""
    if before is None or after is None:
        return None
    if before < 0.01 or after >= COLLAPSE_RATIO * before:
        return False
    log.warning("COLLAPSED: the pruned model scores mAP@.5 %.4f, below %.0f%% of the %.4f before pruning: the cut "
                "took channels the model needs (threshold |gamma| %s). Sparse-train until `safe_percent` reaches "
                "--percent, or prune less", after, 100 * COLLAPSE_RATIO, before, info.get("threshold", "?"))
    return True


def prune_files(cfg: str | os.PathLike, weights: str | os.PathLike | None, config: PruneConfig,
                outputs: tuple[Path, Path] | None, measure: Measure = Measure(),
                latency: LatencySettings = LatencySettings(), bn_adapt: int = 0,
                reconstruct_images: int = 0) -> dict:
    """Load cfg/weights, prune (by percent or to `config.target`; a latency target on `latency`'s runtime),
    re-estimate the pruned model's BN statistics on `bn_adapt` batches of the training images of `measure.data`
    (when given; with `reconstruct_images`, first refit the convs that lost inputs by least squares on that many
    training images: `reconstruct.py`), save the pruned pair as `outputs` (None: a dry run, nothing written) and
    return the report figures (before/after, per-layer channels, the target's plan and, for latency, predicted
    and measured ms).
    `compress.jobs.run_job(PruneJob(...))` guards the outputs first and writes OUT/report.json."""
    model = load(cfg, weights, device=measure.device)
    if measure.data:  # before pruning and writing: a mismatch found by the evaluation after would leave a pair
        check_classes(model.num_classes, load_data_spec(measure.data).nc, measure.data)
    size = measure.img_size or model.cfg.width
    result, target = _prune(model, config, size, latency)
    refit = _reconstruct(model, result, measure, size, reconstruct_images)
    pruned, adapted = _adapt(result.model, measure, size, bn_adapt)
    if outputs is not None:
        outputs[0].parent.mkdir(parents=True, exist_ok=True)
        save(pruned, *outputs)
    before = _figures(model, measure, size, (cfg, weights))
    after = _figures(pruned, measure, size, outputs or (None, None))
    return {**after, "collapsed": _collapsed(before.get("map50"), after.get("map50"), result.info),
            **{f"{k}_before": before[k] for k in _STAGE_KEYS},
            **{f"{k}_after": after[k] for k in _STAGE_KEYS}, "method": config.method,
            "percent": config.percent, "shortcuts": config.shortcuts, "round_to": config.rounding,
            "layer_keep": config.keep_floor, "img_size": size, "removed_blocks": list(result.removed_blocks),
            **adapted, **refit,
            "channels": [{"layer": i, "before": b, "after": a, "type": t} for i, t, b, a in result.channel_rows(model)],
            "info": result.info, "dry_run": outputs is None, **_counted_target(config, result, before, after), **target}
