"""The pruning method registry and the types every method shares: `METHODS` (name -> `Pruner`), filled by
`@register_pruner(name, kind)` in each method's module; `PruneConfig` (validated against the registry) and
`PruneResult`. The dispatch (`prune`, `select_mask`) is in `api`; the methods import this module, never the
package, so the package can import them all without a cycle.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from compress.base.errors import PruneError
from compress.darknet.model import DarknetModel
from compress.prune.costs import Target
from compress.prune.mask import ChannelMask

__all__ = ["Pruner", "METHODS", "DEFAULT_ROUND_TO", "LAYER_KEEP", "LayerKeepDefaults", "register_pruner",
           "PruneConfig", "PruneResult"]


# Kept channel counts are rounded up to a multiple of this unless a method or --round-to says otherwise: odd
# widths (13, 71, ...) make SIMD kernels run partly empty, so a model pruned to 0.5x FLOPs ran 1.4-1.6x slower
# than the original on onnxruntime and ncnn (issue 23); --round-to 1 gives the reference's exact widths.
DEFAULT_ROUND_TO = 8


class LayerKeepDefaults(NamedTuple):
    """The per-layer floor (`--layer-keep`, a fraction of each layer's width) when it is not given, by kind of
    plan: `percent` for a global --percent (or --threshold) cut, `target` for a --target-* search."""
    percent: float
    target: float


# The one place that knows the two defaults. --percent keeps the reference's 0.01 (its global threshold decides
# the widths; the floor only stops a layer from emptying). A target search spends its budget where importance per
# saving is lowest and, floored at 0.01, took most yolov4-tiny convs to 8 channels: its l1 latency plans lost to
# uniform --percent in 3 of 4 runs (issue 25); with 0.5 on both cuts the targeted cut won at 0.7 by 10-18 points.
LAYER_KEEP = LayerKeepDefaults(percent=0.01, target=0.5)


@dataclass(frozen=True)
class Pruner:
    name: str
    kind: str            # "channel" | "layer" | "model"
    fn: Callable
    default_round_to: int = DEFAULT_ROUND_TO
    scores: Callable | None = None   # channel methods: (model, coupling, config) -> {conv: per-channel importance}


METHODS: dict[str, Pruner] = {}


def register_pruner(name: str, kind: str = "channel", default_round_to: int = DEFAULT_ROUND_TO,
                    scores: Callable | None = None) -> Callable:
    """Register `fn` as method `name`; a channel method also names its importance `scores`, which pruning to a
    target (`PruneConfig.target`) ranks channels by instead of its --percent threshold."""
    def deco(fn: Callable) -> Callable:
        METHODS[name] = Pruner(name, kind, fn, default_round_to, scores)
        return fn
    return deco


@dataclass(frozen=True)
class PruneConfig:
    """method: a METHODS key. percent: global share of prunable BN channels to cut (channel methods).
    shortcuts: residual blocks to remove (layer methods). round_to: kept counts rounded up to a multiple
    (None = the method's default, DEFAULT_ROUND_TO = 8; 1 = the reference's exact widths). min_keep: per-layer floor as a fraction of the
    width (0 = normal/shortcut raise instead of emptying a layer). layer_keep: slim's / torch-pruning's / a target
    search's per-layer floor (None: LAYER_KEEP's default for this kind of plan; `keep_floor` resolves it).
    compensate: fold removed channels' act(beta) into consumers. img_size: probe size for torch-pruning.
    target: prune to a latency/FLOPs/params target instead of `percent` (channel methods; see prune/search.py).
    threshold: cut the channels whose importance score is <= this instead of `percent` (channel methods; 0 cuts
    exactly the channels `sparse-train --sparsity fade` drove to zero)."""

    method: str = "slim"
    percent: float = 0.5
    shortcuts: int = 0
    round_to: int | None = None
    min_keep: float = 0.0
    layer_keep: float | None = None
    compensate: bool = True
    img_size: int = 64
    target: Target | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PruneError(f"--method {self.method!r} is unknown; choose one of {', '.join(sorted(METHODS))}")
        if self.threshold is not None and (self.threshold < 0 or METHODS[self.method].scores is None
                                           or self.target is not None):
            raise PruneError(f"--threshold {self.threshold} must be >= 0, with a channel method and no target "
                             f"(--method {self.method}{', ' + self.target.option if self.target else ''})")
        if self.target is not None and METHODS[self.method].scores is None:
            targeted = ", ".join(sorted(n for n, p in METHODS.items() if p.scores is not None))
            raise PruneError(f"--method {self.method} cannot prune to a target ({self.target.option}); use a channel "
                             f"method: {targeted}")
        if not 0.0 <= self.percent < 1.0:
            raise PruneError(f"--percent {self.percent} must be in [0, 1); e.g. --percent 0.5 cuts half the channels")
        for name in ("min_keep", "layer_keep"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise PruneError(f"--{name.replace('_', '-')} {value} must be a fraction in [0, 1] (e.g. 0.5 keeps "
                                 "at least half of every layer)")
        if self.round_to is not None and self.round_to < 1:
            raise PruneError(f"--round-to {self.round_to} must be >= 1")
        if self.shortcuts < 0:
            raise PruneError(f"--shortcuts {self.shortcuts} must be >= 0")

    @property
    def keep_floor(self) -> float:
        """The per-layer floor in effect: --layer-keep when given, else LAYER_KEEP's default for a target search
        or for a --percent / --threshold cut."""
        if self.layer_keep is not None:
            return float(self.layer_keep)
        return LAYER_KEEP.target if self.target is not None else LAYER_KEEP.percent

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
        """(layer, type, channels before, after) for every maskable conv of `before` (channel methods; none for
        layer removal alone), unchanged ones too: the totals then count the same layers whatever the mask
        holds (issue #26: --round-to dropped layers it rounded back to full width, so totals differed); a conv of a
        removed block (`removed_blocks`, in `before`'s numbering) keeps 0."""
        if not self.mask:
            return []
        graph = before.graph
        removed = set(self.removed_blocks)
        return [(i, before.cfg.blocks[i].type, graph.channels[i],
                 0 if i in removed else int(self.mask[i].sum()) if i in self.mask else graph.channels[i])
                for i in range(len(before.cfg.blocks)) if graph.sections[i].conv]
