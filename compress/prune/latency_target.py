"""Prune to a latency on a runtime: get the latency table (the user's cached file or a new measurement), plan
the widths on it, build the model, measure it against the unpruned one on that runtime, and re-plan.

The table predicts savings from convs timed alone; inside the whole model a conv's time differs a little
(layout conversions, caches, fused neighbours), so the first plan can miss the target by some percent. Like
NetAdapt, which measures each proposal, we then measure: the unpruned and the pruned model are timed
round-robin (`measure_models`) and, when the measured ratio misses the target by more than `tolerance`, the
goal given to the planner is corrected by the ratio of measured to predicted saving, up to `refine` times.
The result closest to the target is kept; every round is reported.

Channel widths alone cannot reach every target: a model of narrow layers (Yolo-Fastest: 8-48 channels) costs
about 0.6 of its latency on onnxruntime with every group at its floor (per-op work that no width removes). Then
(`LatencySettings.remove_units`) the fewest residual units, in the `layer` method's order (`ranked_units`),
are removed first (`_shorten`: bisection on their number, each shorter model timed against the original, its
floor plan predicted from the original's table, whose conv timings still hold: removing a unit changes no other
conv's shapes); the channel search then runs on the shorter model.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from compress.base.errors import PruneError
from compress.darknet.model import DarknetModel
from compress.deploy.latency import LATENCY_RUNTIMES, measure_models, measure_table, table_key
from compress.deploy.latency_table import LatencyTable, find_table, store_table
from compress.prune.api import plan_mask, prune
from compress.prune.blocks import kept_layers, remove_units
from compress.prune.costs import LatencyCost, Target
from compress.prune.coupling import build_coupling
from compress.prune.layer import ranked_units
from compress.prune.layout import Layout, build_layout, cuttable_groups, table_grid
from compress.prune.registry import PruneConfig, PruneResult
from compress.prune.surgery import apply_channel_mask

__all__ = ["LatencySettings", "latency_table", "prune_to_latency"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencySettings:
    """`runtime` (a LATENCY_RUNTIMES key) with `threads`; `table`: the JSON file the table is read from and
    stored in (None: measured and not kept); `refine`: re-plans from measured latency; `tolerance`: the
    relative miss that triggers one; `runs`: timed runs per grid point; `rounds`: round-robin rounds per
    whole-model measurement; `measure`: False = plan only (a dry run: nothing measured after pruning);
    `remove_units`: when the channel widths cannot reach the target, remove residual units first (`_shorten`)."""

    runtime: str = "onnxruntime"
    threads: int = 1
    table: str | os.PathLike | None = None
    refine: int = 2
    tolerance: float = 0.03
    runs: int = 10
    rounds: int = 30
    measure: bool = True
    remove_units: bool = True

    def __post_init__(self) -> None:
        if self.runtime not in LATENCY_RUNTIMES:
            raise PruneError(f"--runtime {self.runtime!r} is unknown; choose one of {', '.join(LATENCY_RUNTIMES)}")
        if self.threads < 1:
            raise PruneError(f"--threads {self.threads} must be >= 1")
        if self.refine < 0:
            raise PruneError(f"--refine {self.refine} must be >= 0 (0: keep the first plan)")
        if not 0 < self.tolerance < 1 or self.runs < 1 or self.rounds < 1:
            raise PruneError("tolerance must be in (0, 1), runs and rounds >= 1")

    @property
    def multiple(self) -> int:
        return LATENCY_RUNTIMES[self.runtime].multiple


def areas(model: DarknetModel, img_size: int) -> dict[int, int]:
    """Output H x W of every block at `img_size` (what LatencyCost charges non-conv blocks per channel)."""
    return {j: h * w for j, (_, h, w) in enumerate(model.graph.shapes(img_size, img_size))}


def _calibrate(model: DarknetModel, table: LatencyTable, layout: Layout, settings: LatencySettings,
               img_size: int) -> LatencyTable:
    """Fit the table's `per_melem` and `conv_scale` from the model measured whole and with every cuttable group
    at half its width: a measured saving beyond what the convs' timings predict is charged per element the
    other blocks no longer emit; a smaller one scales the convs' timings down."""
    m = settings.multiple
    half = tuple(min(f, max(m, f // 2 // m * m)) for f in layout.full)
    mask = {i: torch.arange(f) < w for g, f, w in zip(layout.groups, layout.full, half) if w < f for i in g}
    if not mask:
        return table
    narrow = apply_channel_mask(model, mask, compensate=False)
    full_ms, narrow_ms = measure_models([model, narrow], settings.runtime, settings.threads, img_size,
                                        settings.rounds)
    cost = LatencyCost(table, areas(model, img_size))
    convs = sum(cost.layer(i, layout.in_width(i, layout.full), layout.out_width(i, layout.full))
                - cost.layer(i, layout.in_width(i, half), layout.out_width(i, half)) for i in layout.convs)
    elements = sum((layout.out_width(j, layout.full) - layout.out_width(j, half)) * cost.areas[j]
                   for j in layout.others) / 1e6
    saved = (1 - narrow_ms / full_ms) * table.model_ms     # the measured saving, in the table's ms
    per_melem = max(0.0, (saved - convs) / elements) if elements > 0 else 0.0
    scale = min(1.0, max(0.1, saved / convs)) if convs > 0 else 1.0
    calibration = {"full_ms": round(full_ms, 4), "half_ms": round(narrow_ms, 4), "conv_saving_ms": round(convs, 4),
                   "melem_saved": round(elements, 4), "half_widths": list(half)}
    log.info("latency table calibration: %s -> %.4f ms per million elements, conv scale %.3f", calibration,
             per_melem, scale)
    return replace(table, per_melem=per_melem, conv_scale=scale, calibration=calibration)


def latency_table(model: DarknetModel, settings: LatencySettings, img_size: int) -> tuple[LatencyTable, bool]:
    """(the table of `model` on the settings' runtime, whether it was measured now). A table found in
    `settings.table` for this machine, runtime version, thread count, size and structure is reused; a new one
    times every conv whose widths can change (`layout.table_grid`), is calibrated (`_calibrate`) and is stored
    there."""
    key = table_key(model, settings.runtime, settings.threads, img_size)
    table = find_table(settings.table, key)
    if table is not None:
        log.info("latency table from %s (%s)", settings.table, key.describe())
        return table, False
    coupling = build_coupling(model.graph)
    layout = build_layout(coupling, cuttable_groups(coupling))
    grid = table_grid(layout, settings.multiple)
    table = measure_table(model, settings.runtime, settings.threads, img_size, grid, settings.runs, settings.rounds)
    table = _calibrate(model, table, layout, settings, img_size)
    if settings.table is not None:
        store_table(settings.table, table)
    return table, True


def _round(k: int, goal: float, result: PruneResult, table: LatencyTable, measured: tuple[float, float] | None
           ) -> dict:
    predicted = result.info["plan"]["predicted"]
    row = {"round": k, "planned_ms": round(goal, 4), "predicted_ms": round(predicted, 4),
           "predicted_ratio": round(predicted / table.model_ms, 4), "reached": result.info["plan"]["reached"],
           "base_ms": None, "measured_ms": None, "measured_ratio": None}
    if measured:
        row.update(base_ms=round(measured[0], 4), measured_ms=round(measured[1], 4),
                   measured_ratio=round(measured[1] / measured[0], 4))
    return row


def _next_ratio(rounds: list[dict], want: float) -> float:
    """The predicted ratio to plan for next. Two rounds or more: the secant through the two whose measured
    ratios lie closest to `want` (predicted -> measured). One round: its measured / predicted saving scales
    the saving asked for, bounded to x1/3 .. x3 so that one noisy measurement cannot send the plan to an
    extreme."""
    pts = sorted({(r["predicted_ratio"], r["measured_ratio"]) for r in rounds}, key=lambda p: abs(p[1] - want))
    if len(pts) >= 2 and pts[0][1] != pts[1][1]:
        (p1, r1), (p2, r2) = pts[:2]
        nxt = p1 + (want - r1) * (p2 - p1) / (r2 - r1)
    else:
        p, r = rounds[-1]["predicted_ratio"], rounds[-1]["measured_ratio"]
        scale = min(3.0, max(1 / 3, (1 - r) / max(1 - p, 1e-6)))
        nxt = 1 - (1 - want) / scale
    return min(0.999, max(0.02, nxt))


# A shorter model is kept when its floor plan predicts this fraction of the goal or less: the table's
# predictions miss by up to ~10 % and the measured re-plans need room below the goal to correct them.
_FLOOR_MARGIN = 0.9


@dataclass(frozen=True)
class Shortened:
    """The model the channel search starts from: `model` itself (no unit removed) or a shorter one, its cost
    model, `kept` (the original index of each of its layers: `blocks.kept_layers`) and the `dropped` blocks."""

    model: DarknetModel
    cost: LatencyCost
    kept: list[int]
    dropped: tuple[int, ...] = ()
    info: dict = field(default_factory=dict)

    def to_original(self, result: PruneResult) -> PruneResult:
        """`result` (a prune of the shorter model) with its mask in the original's layer numbering."""
        if not self.dropped:
            return result
        return PruneResult(result.model, {self.kept[j]: m for j, m in result.mask.items()}, self.dropped,
                           {**result.info, "removed_units": self.info})


def _reaches(model: DarknetModel, config: PruneConfig, cost: LatencyCost, goal: float) -> tuple[bool, float]:
    """(whether the channel search reaches `goal` ms on `cost`, its prediction for the narrowest plan tried)."""
    _, info = plan_mask(model, replace(config, target=Target("latency", value=goal, best_effort=True)), cost)
    return bool(info["plan"]["reached"]), float(info["plan"]["predicted"])


def _shorter(model: DarknetModel, shortcuts: list[int], config: PruneConfig, table: LatencyTable,
             settings: LatencySettings, img_size: int) -> Shortened:
    """`model` without the residual units closed by `shortcuts`, timed against `model` on the runtime; its cost
    model is the original table's conv timings renumbered, based at the measured latency of the shorter model."""
    short, dropped = remove_units(model, set(shortcuts), config.compensate)
    kept = kept_layers(len(model.layers), dropped)
    index = {old: new for new, old in enumerate(kept)}
    full_ms, short_ms = measure_models([model, short], settings.runtime, settings.threads, img_size,
                                       settings.rounds)
    layers = tuple(replace(t, layer=index[t.layer]) for t in table.layers if t.layer in index)
    base = table.model_ms * short_ms / full_ms
    cost = LatencyCost(replace(table, layers=layers, model_ms=base), areas(short, img_size),
                       multiple=settings.multiple)
    return Shortened(short, cost, kept, tuple(sorted(dropped)))


def _shorten(model: DarknetModel, config: PruneConfig, table: LatencyTable, cost: LatencyCost,
             settings: LatencySettings, goal: float, img_size: int) -> Shortened:
    """The model to search channel widths on: `model` when its widths can reach `goal` ms (or units may not be
    removed, or it has none), else the shorter model with the fewest residual units removed (in `ranked_units`
    order; bisection on their number) whose floor plan predicts <= _FLOOR_MARGIN x the goal, or without every
    removable unit when none does (the search then gives its best effort)."""
    same = Shortened(model, cost, kept_layers(len(model.layers)))
    if not settings.remove_units or _reaches(model, config, cost, goal)[0]:
        return same
    order = [s for s, _ in ranked_units(model, build_coupling(model.graph))]
    lo, hi, best, tried = 1, len(order), None, []
    while lo <= hi:
        k = (lo + hi) // 2
        short = _shorter(model, order[:k], config, table, settings, img_size)
        ok, floor = _reaches(short.model, config, short.cost, _FLOOR_MARGIN * goal)
        tried.append({"units": k, "base_ratio": round(short.cost.base / table.model_ms, 4),
                      "floor_ratio": round(floor / table.model_ms, 4)})
        best, lo, hi = (short if ok else best), (lo if ok else k + 1), (k - 1 if ok else hi)
    if best is None and order:
        best = _shorter(model, order, config, table, settings, img_size)
    if best is None:
        return same
    units = sorted(s for s in order if s in best.dropped)
    log.info("%s: channel widths alone cannot reach it; removing %d residual unit(s) first: %s",
             config.target.option if config.target else "the target", len(units), units)
    return replace(best, info={"shortcuts": units, "candidates": len(order), "tried": tried})


def prune_to_latency(model: DarknetModel, config: PruneConfig, settings: LatencySettings, img_size: int
                     ) -> tuple[PruneResult, dict]:
    """Prune `model` to `config.target` (metric latency) on the settings' runtime; returns the result and the
    report figures (`latency`: runtime, table, target, base/predicted/measured ms and ratios, rounds)."""
    target = config.target
    assert target is not None and target.metric == "latency"
    table, fresh = latency_table(model, settings, img_size)
    cost = LatencyCost(table, areas(model, img_size), multiple=settings.multiple)
    if target.value is not None:  # --target-ms: one measurement of the unpruned model gives the ratio to aim at
        base = measure_models([model], settings.runtime, settings.threads, img_size, settings.rounds)[0]
        want = target.value / base
        if want >= 1:
            raise PruneError(f"{target.option}: the unpruned model already takes {base:.3f} ms on "
                             f"{settings.runtime} here; nothing to prune")
    else:
        want = float(target.ratio)  # type: ignore[arg-type]
    goal, rounds, best = table.model_ms * want, [], None
    start = _shorten(model, config, table, cost, settings, goal, img_size)
    for k in range(settings.refine + 1 if settings.measure else 1):
        # best effort while measuring: the table may under-predict savings, which a measured round corrects
        planned = Target("latency", value=goal, best_effort=settings.measure, label=target.option)
        result = start.to_original(prune(start.model, replace(config, target=planned), start.cost))
        measured = (tuple(measure_models([model, result.model], settings.runtime, settings.threads, img_size,
                                         settings.rounds)) if settings.measure else None)
        rounds.append(_round(k, goal, result, table, measured))
        miss = abs(rounds[-1]["measured_ratio"] / want - 1) if measured else 0.0
        if best is None or miss < best[0]:
            best = (miss, result, rounds[-1])
        if miss <= settings.tolerance:
            break
        goal = table.model_ms * _next_ratio(rounds, want)
    _, result, row = best
    figures = {"runtime": settings.runtime, "runtime_version": table.key.runtime_version, "threads": settings.threads,
               "img_size": img_size, "machine": table.key.machine, "table": None if settings.table is None
               else str(Path(settings.table)), "table_measured": fresh, "table_model_ms": round(table.model_ms, 4),
               "target": target.to_dict(), "target_ratio": round(want, 4), **{k: row[k] for k in (
                   "base_ms", "predicted_ms", "predicted_ratio", "measured_ms", "measured_ratio")},
               "miss": None if row["measured_ratio"] is None else round(row["measured_ratio"] / want - 1, 4),
               "rounds": rounds, "removed_units": start.info.get("shortcuts", [])}
    if figures["miss"] is not None and abs(figures["miss"]) > settings.tolerance:
        log.warning("%s on %s: measured %.3f of the unpruned latency (%+.1f%% off) after %d round(s)",
                    target.option, settings.runtime, row["measured_ratio"], 100 * figures["miss"], len(rounds))
    return result, figures
