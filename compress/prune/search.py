"""Prune to a target (latency, FLOPs, parameters) instead of a percent: choose each coupled group's width.

Greedy, in the manner of NetAdapt / AMC's resource-constrained search, over the channel method's own
importance: every coupled group that the method may cut starts whole; each step narrows the one group whose
next step down (to the next lower multiple of `multiple`, the runtime's fast channel count) removes the least
importance per unit of cost saved, until the predicted cost reaches the goal. The importance of a step is the
sum of the group scores (`mask.group_score`: max over members) of the channels it drops (the lowest kept
ones); the cost saved is predicted by the cost model for every conv the step narrows, outputs and inputs
(`layout`). Ties go to the larger saving, then to the lower group. Each group keeps at least
`floor` x its width (rounded up to the multiple). Deterministic for given scores and costs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compress.base.errors import PruneError
from compress.prune.costs import TARGET_UNITS, CostModel
from compress.prune.layout import Layout

__all__ = ["Plan", "plan_widths", "allowed_widths"]


@dataclass(frozen=True)
class Plan:
    """Per cut group its kept width (`widths`, aligned with `layout.groups`); the predicted cost of the result,
    the unpruned `base`, the `goal`; the importance removed and the number of steps taken."""

    layout: Layout
    widths: tuple[int, ...]
    predicted: float
    base: float
    goal: float
    removed_importance: float
    steps: int
    multiple: int
    reached: bool = True

    def layer_widths(self) -> dict[int, int]:
        """Conv index -> kept output channels, for every member of a narrowed group."""
        return {i: w for g, f, w in zip(self.layout.groups, self.layout.full, self.widths) if w < f for i in g}

    def to_dict(self, metric: str) -> dict:
        return {"metric": metric, "unit": TARGET_UNITS[metric], "base": self.base, "goal": self.goal,
                "predicted": self.predicted, "predicted_ratio": self.predicted / self.base if self.base else None,
                "multiple": self.multiple, "steps": self.steps, "removed_importance": self.removed_importance,
                "reached": self.reached,
                "groups": [{"layers": list(g), "before": f, "after": w}
                           for g, f, w in zip(self.layout.groups, self.layout.full, self.widths)]}


def allowed_widths(full: int, multiple: int, floor: float) -> list[int]:
    """Widths a group may take, descending: its full width, then multiples of `multiple` below it, none under
    max(1, floor(full * floor)) rounded up to the multiple (a group narrower than the multiple stays whole)."""
    least = min(full, math.ceil(max(1, math.floor(full * floor)) / multiple) * multiple)
    return [full] + [w for w in range((full - 1) // multiple * multiple, 0, -multiple) if w >= least]


class _State:
    """Current widths and per-conv costs; predicted total = base - sum of savings over convs."""

    def __init__(self, layout: Layout, cost: CostModel) -> None:
        self.layout, self.cost = layout, cost
        self.widths = [float(w) for w in layout.full]
        self.full_cost = {i: self._conv(i, self.widths) for i in layout.blocks}
        self.now = dict(self.full_cost)
        self.total = float(cost.base)
        self.affected = [layout.affected(g) for g in range(len(layout.groups))]

    def _conv(self, i: int, widths: list[float]) -> float:
        return self.cost.layer(i, self.layout.in_width(i, widths), self.layout.out_width(i, widths))

    def saving(self, g: int, width: int) -> tuple[float, dict[int, float]]:
        trial = list(self.widths)
        trial[g] = float(width)
        new = {i: self._conv(i, trial) for i in self.affected[g]}
        return sum(self.now[i] - c for i, c in new.items()), new

    def apply(self, g: int, width: int, new: dict[int, float]) -> None:
        self.total -= sum(self.now[i] - c for i, c in new.items())
        self.now.update(new)
        self.widths[g] = float(width)


def plan_widths(layout: Layout, group_scores: list[torch.Tensor], cost: CostModel, goal: float, multiple: int,
                floor: float, what: str = "the target", best_effort: bool = False) -> Plan:
    """Narrow groups greedily until the predicted cost is <= `goal` (see the module doc).

    Raises:
        PruneError: the goal is out of reach with these floors and multiples (naming what is reachable), unless
            `best_effort`: then the narrowest plan is returned with `reached=False`.
    """
    state = _State(layout, cost)
    ladders = [allowed_widths(f, multiple, floor) for f in layout.full]
    asc = [torch.sort(s.float()).values for s in group_scores]
    pos, removed, steps = [0] * len(ladders), 0.0, 0
    neighbours = [{h for h in range(len(ladders)) if set(state.affected[g]) & set(state.affected[h])}
                  for g in range(len(ladders))]
    best: dict[int, tuple] = {}

    def candidate(g: int) -> tuple | None:
        if pos[g] + 1 >= len(ladders[g]):
            return None
        cur, nxt = ladders[g][pos[g]], ladders[g][pos[g] + 1]
        full = layout.full[g]
        importance = float(asc[g][full - cur:full - nxt].sum())
        saved, new = state.saving(g, nxt)
        if saved <= 0:
            return None
        return importance / saved, -saved, g, importance, new

    for g in range(len(ladders)):
        best[g] = candidate(g)
    while state.total > goal:
        options = [c for c in best.values() if c is not None]
        if not options and best_effort:
            break
        if not options:
            raise PruneError(f"{what} is out of reach: cutting every prunable group to its floor predicts "
                             f"{state.total:.4g} {TARGET_UNITS[cost.metric]} ({state.total / cost.base:.3f} of "
                             f"{cost.base:.4g}); lower --layer-keep/--round-to or aim higher")
        _, _, g, importance, new = min(options, key=lambda c: c[:3])
        pos[g] += 1
        state.apply(g, ladders[g][pos[g]], new)
        removed, steps = removed + importance, steps + 1
        for h in neighbours[g]:
            best[h] = candidate(h)
    widths = tuple(ladders[g][pos[g]] for g in range(len(ladders)))
    return Plan(layout, widths, state.total, float(cost.base), goal, removed, steps, multiple, state.total <= goal)
