"""Pruning dispatch: `prune(model, PruneConfig(method=...)) -> PruneResult` with a NEW compact model.

Methods live one per file and register themselves with `@register_pruner(name, kind)` (see `registry`):
* kind "channel": `select(model, coupling, config) -> (ChannelMask, info)`; the mask is merged, floored,
  rounded and validated by `finalize_mask`, then `surgery.apply_channel_mask` builds the compact model;
* kind "layer": `select(model, coupling, config) -> (set of shortcut indices, info)` -> `blocks.remove_units`;
* kind "model": `run(model, config) -> PruneResult` (compositions such as layer-channel).
With `config.target`, a channel method's `scores` rank the channels and `search.plan_widths` chooses each
coupled group's width to reach the target on a cost model (`select_for_target`) instead of its --percent;
with `config.threshold`, every channel scoring <= it is cut (`select_by_threshold`). `plan_mask` is the one
place that chooses among the three: the prune itself and sparse training's fade plan (`fade.py`) both call it.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from compress.base.errors import PruneError
from compress.darknet.model import DarknetModel
from compress.prune.blocks import remove_units
from compress.prune.costs import ConvCost, CostModel
from compress.prune.coupling import Coupling, build_coupling
from compress.prune.layout import build_layout, cuttable_groups
from compress.prune.mask import (ChannelMask, apply_floor, global_threshold, group_score, merge_coupled,
                                 round_masks, threshold_masks, top_k, validate_mask)
from compress.prune.registry import METHODS, PruneConfig, Pruner, PruneResult
from compress.prune.search import plan_widths
from compress.prune.surgery import apply_channel_mask

__all__ = ["prune", "select_mask", "finalize_mask", "select_for_target", "select_by_threshold", "target_cost",
           "plan_mask"]

log = logging.getLogger(__name__)


def finalize_mask(mask: ChannelMask, coupling: Coupling, scores: dict, config: PruneConfig,
                  merge: str = "union") -> ChannelMask:
    """Shared policy after a method's raw mask: merge coupled groups, floor, round, validate."""
    mask = merge_coupled(mask, coupling, merge)
    if config.min_keep > 0:
        mask = apply_floor(mask, scores, config.min_keep)
        mask = merge_coupled(mask, coupling, "union")
    mask = round_masks(mask, coupling, scores, config.rounding)
    return validate_mask(coupling, mask)


def select_mask(model: DarknetModel, config: PruneConfig) -> tuple[ChannelMask, dict]:
    """The validated mask a channel method chooses (no surgery; a target counts FLOPs/params at the cfg's size)."""
    return plan_mask(model, config)


def target_cost(model: DarknetModel, config: PruneConfig, cost: CostModel | None, img_size: int | None = None
                ) -> CostModel:
    """The cost model of `config.target`: `cost` when given; FLOPs and params are counted at `img_size`."""
    if cost is not None:
        return cost
    if config.target is None or config.target.metric == "latency":
        raise PruneError("a latency target needs measured per-layer latencies: pass cost=LatencyCost(table) (the "
                         "prune command measures them on --runtime)")
    return ConvCost(model, config.target.metric, img_size)


def select_for_target(model: DarknetModel, coupling: Coupling, config: PruneConfig, cost: CostModel,
                      scores: dict[int, torch.Tensor] | None = None) -> tuple[ChannelMask, dict]:
    """Per-group widths that reach `config.target` on `cost` (search.plan_widths over the method's scores);
    each group keeps its top channels by group score. Round-to: --round-to, else the cost's multiple when it
    knows one (a latency table: the runtime's fast channel count), else the method's default (8). `scores`:
    importance to rank by instead of the method's own (e.g. `importance.taylor_bn_scores`)."""
    pruner, target = METHODS[config.method], config.target
    assert pruner.scores is not None and target is not None  # PruneConfig refuses anything else
    scores = scores if scores is not None else pruner.scores(model, coupling, config)
    groups = [g for g in cuttable_groups(coupling) if all(i in scores for i in g)]
    ranked = [group_score(coupling, scores, g) for g in groups]
    multiple = config.round_to or (cost.multiple if cost.multiple > 1 else pruner.default_round_to)
    plan = plan_widths(build_layout(coupling, groups), ranked, cost, target.goal(cost.base), multiple,
                       max(config.keep_floor, config.min_keep), target.option, target.best_effort)
    mask = {i: top_k(s, w) for g, s, w in zip(groups, ranked, plan.widths) for i in g}
    info = {"target": target.to_dict(), "plan": plan.to_dict(cost.metric), "prunable_layers": len(scores),
            "layer_keep": config.keep_floor}
    return validate_mask(coupling, mask), info


def select_by_threshold(model: DarknetModel, coupling: Coupling, config: PruneConfig,
                        scores: dict[int, torch.Tensor] | None = None) -> tuple[ChannelMask, dict]:
    """Cut every channel whose score is <= `config.threshold` (or, without one, <= the global --percent
    threshold of `scores`, slim's rule; kept when any coupled member scores above it), with the method's
    per-layer floor and rounding (`finalize_mask`). `scores`: importance instead of the method's own."""
    pruner = METHODS[config.method]
    scores = scores if scores is not None else pruner.scores(model, coupling, config)  # type: ignore[misc]
    thr = float(config.threshold) if config.threshold is not None else global_threshold(scores, config.percent)
    mask = apply_floor(threshold_masks(scores, thr, strict=True), scores, config.keep_floor)
    cut = sum(int((s <= thr).sum()) for s in scores.values())
    info = {"threshold": thr, "prunable_layers": len(scores), "layer_keep": config.keep_floor,
            "at_or_below_threshold": cut, "scored_channels": sum(len(s) for s in scores.values())}
    return finalize_mask(mask, coupling, scores, config, merge="union"), info


def plan_mask(model: DarknetModel, config: PruneConfig, cost: CostModel | None = None,
              scores: dict[int, torch.Tensor] | None = None) -> tuple[ChannelMask, dict]:
    """The mask channel method `config.method` cuts (`threshold`, a `target` on `cost`, or its --percent);
    `scores` (per conv, per channel) rank instead of the method's own importance."""
    pruner = METHODS[config.method]
    if pruner.kind != "channel":
        raise PruneError(f"--method {config.method} removes layers, it has no channel mask")
    coupling = build_coupling(model.graph)
    if config.target is not None:
        return select_for_target(model, coupling, config, target_cost(model, config, cost), scores)
    if config.threshold is not None or scores is not None:
        return select_by_threshold(model, coupling, config, scores)
    return pruner.fn(model, coupling, config)


def _run_channel(model: DarknetModel, config: PruneConfig, pruner: Pruner, cost: CostModel | None) -> PruneResult:
    mask, info = plan_mask(model, config, cost)
    return PruneResult(apply_channel_mask(model, mask, config.compensate), mask, (), info)


def _run_layer(model: DarknetModel, config: PruneConfig, pruner: Pruner, cost: CostModel | None) -> PruneResult:
    units, info = pruner.fn(model, build_coupling(model.graph), config)
    new, dropped = remove_units(model, units, config.compensate)
    return PruneResult(new, {}, tuple(sorted(dropped)), info)


_KINDS: dict[str, Callable[[DarknetModel, PruneConfig, Pruner, CostModel | None], PruneResult]] = {
    "channel": _run_channel,
    "layer": _run_layer,
    "model": lambda model, config, pruner, cost: pruner.fn(model, config),
}


def prune(model: DarknetModel, config: PruneConfig, cost: CostModel | None = None) -> PruneResult:
    """Prune `model` with `config.method`; the input model is never modified. With `config.target`, `cost`
    predicts what the target measures (None: FLOPs/params counted at the cfg's size; latency needs a table)."""
    pruner = METHODS[config.method]
    result = _KINDS[pruner.kind](model, config, pruner, cost)
    log.info("%s: %s", config.method, {k: v for k, v in result.info.items() if not isinstance(v, (list, dict))})
    return result
