"""Pruning dispatch: `prune(model, PruneConfig(method=...)) -> PruneResult` with a NEW compact model.

Methods live one per file and register themselves with `@register_pruner(name, kind)` (see `registry`):
* kind "channel": `select(model, coupling, config) -> (ChannelMask, info)`; the mask is merged, floored,
  rounded and validated by `finalize_mask`, then `surgery.apply_channel_mask` builds the compact model;
* kind "layer": `select(model, coupling, config) -> (set of shortcut indices, info)` -> `blocks.remove_units`;
* kind "model": `run(model, config) -> PruneResult` (compositions such as layer-channel).
"""
from __future__ import annotations

import logging
from typing import Callable

from compress.base.errors import PruneError
from compress.darknet.model import DarknetModel
from compress.prune.blocks import remove_units
from compress.prune.coupling import Coupling, build_coupling
from compress.prune.mask import ChannelMask, apply_floor, merge_coupled, round_masks, validate_mask
from compress.prune.registry import METHODS, PruneConfig, Pruner, PruneResult
from compress.prune.surgery import apply_channel_mask

__all__ = ["prune", "select_mask", "finalize_mask"]

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
    """The validated mask a channel method chooses (no surgery)."""
    pruner = METHODS[config.method]
    if pruner.kind != "channel":
        raise PruneError(f"--method {config.method} removes layers, it has no channel mask")
    return pruner.fn(model, build_coupling(model.graph), config)


def _run_channel(model: DarknetModel, config: PruneConfig, pruner: Pruner) -> PruneResult:
    mask, info = pruner.fn(model, build_coupling(model.graph), config)
    return PruneResult(apply_channel_mask(model, mask, config.compensate), mask, (), info)


def _run_layer(model: DarknetModel, config: PruneConfig, pruner: Pruner) -> PruneResult:
    units, info = pruner.fn(model, build_coupling(model.graph), config)
    new, dropped = remove_units(model, units, config.compensate)
    return PruneResult(new, {}, tuple(sorted(dropped)), info)


_KINDS: dict[str, Callable[[DarknetModel, PruneConfig, Pruner], PruneResult]] = {
    "channel": _run_channel,
    "layer": _run_layer,
    "model": lambda model, config, pruner: pruner.fn(model, config),
}


def prune(model: DarknetModel, config: PruneConfig) -> PruneResult:
    """Prune `model` with `config.method`; the input model is never modified."""
    pruner = METHODS[config.method]
    result = _KINDS[pruner.kind](model, config, pruner)
    log.info("%s: %s", config.method, {k: v for k, v in result.info.items() if not isinstance(v, (list, dict))})
    return result
