"""How each conv's widths follow the widths of the coupled groups being cut (for cost predictions).

Cutting a coupled group narrows the outputs of its member convs and the inputs of every conv that reads its
channels, through routes (concatenations), shortcuts, pooling and upsampling. `build_layout` works that out
once by running the section table's channel flow (`surgery.propagate`) on group tags: conv i then reads
`in_const[i]` channels that never change plus `in_mult[i][g]` copies of group g's kept channels. The other
blocks whose width follows the cut (`others`: shortcuts, routes, pools, upsampling, ...) are described the same
way by their OUTPUT (`in_*` then describe what they emit): a latency model charges them per element moved.
With it a cost model is asked for any assignment of group widths without building a model. `table_grid`
chooses the widths at which a latency table times each conv.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from compress.deploy.latency import LayerGrid
from compress.prune.coupling import Coupling
from compress.prune.surgery import TagOps, propagate

__all__ = ["Layout", "build_layout", "cuttable_groups", "table_grid", "GRID_FRACTIONS"]

GRID_FRACTIONS = (0.25, 0.5, 0.75, 1.0)   # of a width's changeable part, where a latency table times a conv


@dataclass(frozen=True)
class Layout:
    """`groups`: the cut groups (their member convs), `full`: their full widths; per conv (every conv of the
    model): `out_group` (index into groups, or absent: full width), `in_const` and `in_mult` (see module doc)."""

    groups: tuple[tuple[int, ...], ...]
    full: tuple[int, ...]
    convs: tuple[int, ...]
    full_out: dict[int, int]
    out_group: dict[int, int]
    in_const: dict[int, int]
    in_mult: dict[int, dict[int, float]]
    others: tuple[int, ...] = ()

    @property
    def blocks(self) -> tuple[int, ...]:
        """Every block a cost model is asked about: the convs, then the others."""
        return self.convs + self.others

    def in_width(self, i: int, widths: Sequence[float]) -> float:
        return self.in_const[i] + sum(m * widths[g] for g, m in self.in_mult[i].items())

    def out_width(self, i: int, widths: Sequence[float]) -> float:
        if i in self.others:
            return self.in_width(i, widths)
        g = self.out_group.get(i)
        return self.full_out[i] if g is None else widths[g]

    def affected(self, g: int) -> tuple[int, ...]:
        """The blocks whose input or output width changes with group g."""
        return tuple(i for i in self.blocks if self.out_group.get(i) == g or g in self.in_mult[i])

    def tied(self, i: int) -> bool:
        """Input width always equals output width (a depthwise conv, or a conv inside its own residual chain)."""
        g = self.out_group.get(i)
        return g is not None and self.in_const[i] == 0 and self.in_mult[i] == {g: 1.0}


def cuttable_groups(coupling: Coupling) -> tuple[tuple[int, ...], ...]:
    """Every coupled group that can lose channels (not fixed), whatever the method's prune set."""
    return tuple(g for g in coupling.groups if not any(i in coupling.fixed for i in g))


def build_layout(coupling: Coupling, groups: Sequence[tuple[int, ...]]) -> Layout:
    graph = coupling.graph
    tag = {i: n + 1 for n, g in enumerate(groups) for i in g}   # 0: a channel no cut group owns
    own = lambda i: torch.full((graph.channels[i],), float(tag.get(i, 0)))  # noqa: E731
    flow = propagate(graph, TagOps(graph, own, torch.zeros(graph.cfg.channels)))
    convs = tuple(i for i, s in enumerate(graph.sections) if s.conv)
    full = tuple(graph.channels[g[0]] for g in groups)
    in_const, in_mult = {}, {}

    def describe(i: int, tags: torch.Tensor) -> None:
        counts = torch.bincount(tags.long(), minlength=len(groups) + 1).tolist()
        in_const[i] = counts[0]
        in_mult[i] = {g - 1: counts[g] / full[g - 1] for g in range(1, len(counts)) if counts[g]}

    for i in convs:
        src = graph.inputs[i][0]
        describe(i, torch.zeros(graph.cfg.channels) if src < 0 else flow[src])
    others = tuple(j for j, s in enumerate(graph.sections) if not s.conv and bool(flow[j].any()))
    for j in others:
        describe(j, flow[j])
    out_group = {i: tag[i] - 1 for i in convs if i in tag}
    return Layout(tuple(tuple(g) for g in groups), full, convs, {i: graph.channels[i] for i in convs}, out_group,
                  in_const, in_mult, others)


def _points(const: int, var: int, multiple: int) -> tuple[int, ...]:
    """const + fractions of var, the variable part rounded to `multiple` (at least one multiple)."""
    if var == 0:
        return (const,)
    pts = {const + var}
    for f in GRID_FRACTIONS:
        pts.add(const + min(var, max(multiple, math.ceil(f * var / multiple) * multiple)))
    return tuple(sorted(pts))


def table_grid(layout: Layout, multiple: int) -> dict[int, LayerGrid]:
    """The widths at which each conv is timed: its full widths, plus GRID_FRACTIONS of what can be cut."""
    grid = {}
    for i in layout.convs:
        g = layout.out_group.get(i)
        out = _points(0, layout.full_out[i], multiple) if g is not None else (layout.full_out[i],)
        var_in = round(sum(m * layout.full[h] for h, m in layout.in_mult[i].items()))
        full_in = layout.in_const[i] + var_in
        if layout.tied(i):
            grid[i] = LayerGrid((full_in,), out, tied=True)
        else:
            grid[i] = LayerGrid(_points(layout.in_const[i], var_in, multiple), out)
    return grid
