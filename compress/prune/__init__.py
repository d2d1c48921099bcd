"""Channel and layer pruning: `prune(model, PruneConfig(method=...)) -> PruneResult` with a NEW compact model.

Methods live one per file and register themselves with `@register_pruner(name, kind)`:
* kind "channel": `select(model, coupling, config) -> (ChannelMask, info)`; the mask is merged, floored,
  rounded and validated here, then `surgery.apply_channel_mask` builds the compact model;
* kind "layer": `select(model, coupling, config) -> (set of shortcut indices, info)` -> `blocks.remove_units`;
* kind "model": `run(model, config) -> PruneResult` (compositions such as layer-channel).

Example:
    >>> result = prune(model, PruneConfig(method="slim", percent=0.5))
    >>> compress.save(result.model, "out/slim.cfg", "out/slim.weights")
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from compress.base.errors import PruneError
from compress.darknet.model import DarknetModel
from compress.prune.coupling import Coupling, build_coupling
from compress.prune.mask import ChannelMask, apply_floor, merge_coupled, round_masks, validate_mask
from compress.prune.surgery import apply_channel_mask

__all__ = ["PruneConfig", "PruneResult", "Pruner", "METHODS", "register_pruner", "prune", "select_mask"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pruner:
    name: str
    kind: str            # "channel" | "layer" | "model"
    fn: Callable
    default_round_to: int = 1


METHODS: dict[str, Pruner] = {}


def register_pruner(name: str, kind: str = "channel", default_round_to: int = 1) -> Callable:
    def deco(fn: Callable) -> Callable:
        METHODS[name] = Pruner(name, kind, fn, default_round_to)
        return fn
    return deco


@dataclass(frozen=True)
class PruneConfig:
    """method: a METHODS key. percent: global share of prunable BN channels to cut (channel methods).
    shortcuts: residual blocks to remove (layer methods). round_to: kept counts rounded up to a multiple
    (None = the method's default: 8 for regular, else 1). min_keep: per-layer floor as a fraction of the
    width (0 = normal/shortcut raise instead of emptying a layer). layer_keep: slim's per-layer floor.
    compensate: fold removed channels' act(beta) into consumers. img_size: probe size for torch-pruning."""

    method: str = "slim"
    percent: float = 0.5
    shortcuts: int = 0
    round_to: int | None = None
    min_keep: float = 0.0
    layer_keep: float = 0.01
    compensate: bool = True
    img_size: int = 64

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PruneError(f"--method {self.method!r} is unknown; choose one of {', '.join(sorted(METHODS))}")
        if not 0.0 <= self.percent < 1.0:
            raise PruneError(f"--percent {self.percent} must be in [0, 1); e.g. --percent 0.5 cuts half the channels")
        for name in ("min_keep", "layer_keep"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise PruneError(f"--{name.replace('_', '-')} {getattr(self, name)} must be a fraction in [0, 1]")
        if self.round_to is not None and self.round_to < 1:
            raise PruneError(f"--round-to {self.round_to} must be >= 1")
        if self.shortcuts < 0:
            raise PruneError(f"--shortcuts {self.shortcuts} must be >= 0")

    @property
    def rounding(self) -> int:
        return self.round_to if self.round_to is not None else METHODS[self.method].default_round_to


@dataclass
class PruneResult:
    model: DarknetModel
    mask: ChannelMask = field(default_factory=dict)
    removed_blocks: tuple[int, ...] = ()
    info: dict = field(default_factory=dict)

    def channel_rows(self, before: DarknetModel) -> list[tuple[int, str, int, int]]:
        """(layer, type, channels before, after) for every conv whose width changed (channel methods)."""
        return [(i, before.cfg.blocks[i].type, before.graph.channels[i], int(m.sum())) for i, m in
                sorted(self.mask.items())]


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
    from compress.prune.blocks import remove_units
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


def _register_methods() -> None:
    from compress.prune import normal, regular, shortcut, slim, layer, layer_channel, tp  # noqa: F401


_register_methods()
