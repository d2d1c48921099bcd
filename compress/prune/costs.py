"""What a pruning target is measured in: `Target` (latency, FLOPs or parameters; a ratio or an absolute value)
and the cost models the width search asks, layer by layer: `ConvCost` (FLOPs or parameters, counted by each
section's own `macs`/`params`, exact) and `LatencyCost` (a measured `LatencyTable`, interpolated).

A cost model answers `layer(i, c_in, c_out)`: conv i's cost with that many input and output channels. The
search predicts a pruned model's total as `base - sum over convs of (layer(i, full) - layer(i, pruned))`, so
whatever a model costs besides its convs (and, for latency, the runtime's per-call overhead) stays in `base`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol

from compress.base.errors import PruneError
from compress.darknet.model import DarknetModel
from compress.darknet.summary import summarize
from compress.deploy.latency_table import LatencyTable

__all__ = ["Target", "TARGET_UNITS", "CostModel", "ConvCost", "LatencyCost"]

TARGET_UNITS = {"latency": "ms", "flops": "GFLOPs", "params": "params"}
_OPTIONS = {"latency": ("--target-latency", "--target-ms"), "flops": ("--target-flops", None),
            "params": ("--target-params", None)}


@dataclass(frozen=True)
class Target:
    """Prune until the model's `metric` is `ratio` x the unpruned model's (0 < ratio < 1), or at most `value`
    (absolute, in TARGET_UNITS[metric]: `--target-ms`). `best_effort`: a target out of reach gives the
    narrowest plan instead of an error; `label`: how errors name the target (default: its option)."""

    metric: str
    ratio: float | None = None
    value: float | None = None
    best_effort: bool = False
    label: str | None = None

    def __post_init__(self) -> None:
        if self.metric not in TARGET_UNITS:
            raise PruneError(f"target metric {self.metric!r} is unknown; use one of {', '.join(TARGET_UNITS)}")
        ratio_opt, value_opt = _OPTIONS[self.metric]
        if (self.ratio is None) == (self.value is None) or (self.value is not None and value_opt is None):
            raise PruneError(f"give one target: {ratio_opt} R" + (f" or {value_opt} MS" if value_opt else ""))
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise PruneError(f"{ratio_opt} {self.ratio} must be a ratio in (0, 1) of the unpruned model's "
                             f"{self.metric}, e.g. 0.5")
        if self.value is not None and not self.value > 0:
            raise PruneError(f"{value_opt} {self.value} must be > 0")

    @property
    def option(self) -> str:
        if self.label:
            return self.label
        ratio_opt, value_opt = _OPTIONS[self.metric]
        return f"{ratio_opt} {self.ratio}" if self.ratio is not None else f"{value_opt} {self.value}"

    def goal(self, base: float) -> float:
        """The cost to reach, given the unpruned model's `base`."""
        return self.ratio * base if self.ratio is not None else float(self.value)  # type: ignore[operator]

    def to_dict(self) -> dict:
        return {"metric": self.metric, "ratio": self.ratio, "value": self.value, "unit": TARGET_UNITS[self.metric]}


class CostModel(Protocol):
    metric: str       # a TARGET_UNITS key
    base: float       # the unpruned model's whole cost
    multiple: int     # the channel multiple this cost is fast at (1: any width)

    def layer(self, i: int, c_in: float, c_out: float) -> float: ...


class ConvCost:
    """FLOPs (GFLOPs, 2 x multiply-adds) or parameters of each conv, from its section's own counters."""

    multiple = 1

    def __init__(self, model: DarknetModel, metric: str, img_size: int | None = None) -> None:
        if metric not in ("flops", "params"):
            raise PruneError(f"ConvCost counts flops or params, not {metric!r}")
        self.metric, self.graph = metric, model.graph
        size = img_size or model.cfg.width
        summary = summarize(model, (size, size))
        self.base = float(summary.gflops if metric == "flops" else summary.params)
        self.shapes = self.graph.shapes(size, size)
        self.image = (model.cfg.channels, size, size)

    def layer(self, i: int, c_in: float, c_out: float) -> float:
        graph, c_in, c_out = self.graph, int(round(c_in)), int(round(c_out))
        section = graph.sections[i]
        if not section.conv:
            return 0.0   # FLOPs and parameters are the convs' (the model's other weights never change width)
        block = section.resize(graph.cfg.blocks[i], c_out)
        if self.metric == "params":
            return float(section.params(block, [c_in], c_out, graph.ctx(i)))
        src = graph.inputs[i][0]
        _, h, w = self.image if src < 0 else self.shapes[src]
        _, oh, ow = self.shapes[i]
        return 2.0 * section.macs(block, None, [(c_in, h, w)], (c_out, oh, ow)) / 1e9


class LatencyCost:
    """Milliseconds from a measured table: convs from their timings; another block (`areas`: its output H x W)
    at the table's `per_melem` per element it emits. `base`: the unpruned model's latency (the table's)."""

    metric = "latency"

    def __init__(self, table: LatencyTable, areas: Mapping[int, int] | None = None, base: float | None = None,
                 multiple: int = 8) -> None:
        self.table, self.areas, self.multiple = table, dict(areas or {}), multiple
        self.base = float(table.model_ms if base is None else base)

    def layer(self, i: int, c_in: float, c_out: float) -> float:
        if i in self.table.by_layer:
            return self.table.ms(i, c_in, c_out)
        # a conv missing from the table never changes width (the table times every conv that can)
        return self.table.per_melem * c_out * self.areas.get(i, 0) / 1e6
