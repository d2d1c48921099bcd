"""Coupled channel groups and prunable layer sets, derived from the `LayerGraph` (never from hard-coded indices).

Every output channel of a conv block ([convolutional], [depthwise]) is a node. Walking the blocks in order,
each block's output channels are expressed as node ids by its section-table `flow` rule: a conv creates nodes,
a route concatenates (or slices, with `groups`) its inputs' ids, pooling/upsample/dropout pass them through,
a shortcut *unites* its inputs' ids channel by channel where they overlap, and a depthwise conv (one filter
per channel, with BN) unites its outputs with its inputs, so it is cut together with its producer.
Channels that cannot be removed are *fixed*:

* convs without BN (YOLO head convs, attention logits) and other grouped convs (their outputs);
* every channel feeding a grouped route (`groups/group_id`, YOLOv4-tiny CSP split; reference rule 5),
  another grouped conv, `[se]`/`[cbam]`/`[eca]` (their weights mix the channels), `[scale_channels]`/`[sam]`
  operands, a weighted shortcut, `maxpool_depth`, `[reorg]`, the heads and the image.

A coupled group is a set of convs whose channels are tied one-to-one (a residual chain, a producer and its
depthwise conv); a group with any fixed channel, or whose ties are not channel-aligned, is fixed as a whole.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from compress.darknet.block import Block
from compress.darknet.graph import LayerGraph

__all__ = ["Coupling", "build_coupling", "prunable_layers", "residual_units", "unit_conv", "MODES"]

MODES = (0, 1, 2)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass(frozen=True)
class Coupling:
    """`groups`: tuples of BN-conv indices whose output channels are tied one-to-one (singletons included);
    `fixed`: conv indices whose outputs must be kept whole."""

    graph: LayerGraph
    groups: tuple[tuple[int, ...], ...]
    fixed: frozenset[int]

    @cached_property
    def group_of(self) -> dict[int, tuple[int, ...]]:
        return {i: g for g in self.groups for i in g}

    def root(self, i: int) -> int:
        """Chain root: the earliest conv of the group (Darknet's stage downsample conv)."""
        return min(self.group_of[i])


class _IdOps:
    """Channel ids for the section table's flow rules: a union-find over every conv output channel."""

    def __init__(self, graph: LayerGraph) -> None:
        self.graph = graph
        self.offset, n = {}, graph.cfg.channels
        for i, s in enumerate(graph.sections):
            if s.conv:
                self.offset[i] = n
                n += graph.channels[i]
        self.uf, self.poison = _UnionFind(n), set(range(graph.cfg.channels))

    def own(self, i: int) -> np.ndarray:
        return np.arange(self.offset[i], self.offset[i] + self.graph.channels[i])

    def cat(self, vs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(vs)

    def part(self, v: np.ndarray, groups: int, group_id: int) -> np.ndarray:
        return np.array_split(v, groups)[group_id]

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        for x, y in zip(a.tolist(), b.tolist()):  # unequal widths: only the overlap is tied (Darknet adds it)
            self.uf.union(x, y)
        return a

    def tie(self, a: np.ndarray, b: np.ndarray) -> None:
        self.add(a, b)

    def keep_whole(self, v: np.ndarray) -> None:
        self.poison.update(v.tolist())

    def opaque(self, v: np.ndarray, block: Block) -> None:
        self.keep_whole(v)

    def act(self, v: np.ndarray, block: Block) -> np.ndarray:
        return v

    def fresh(self, i: int) -> np.ndarray:
        c, start = self.graph.channels[i], len(self.uf.parent)
        self.uf.parent.extend(range(start, start + c))
        self.poison.update(range(start, start + c))
        return np.arange(start, start + c)


def _walk(graph: LayerGraph) -> tuple[_UnionFind, dict[int, np.ndarray], set[int]]:
    ops = _IdOps(graph)
    ids: dict[int, np.ndarray] = {}
    image = np.arange(graph.cfg.channels)
    for i, (block, section) in enumerate(zip(graph.cfg.blocks, graph.sections)):
        ins = [image if s < 0 else ids[s] for s in graph.inputs[i]]
        ids[i] = section.flow(block, i, ins, ops)
    return ops.uf, {i: ids[i] for i in ops.offset}, ops.poison


def build_coupling(graph: LayerGraph) -> Coupling:
    uf, conv_ids, poison = _walk(graph)
    roots = {i: np.array([uf.find(int(a)) for a in ids]) for i, ids in conv_ids.items()}
    bad_roots = {uf.find(p) for p in poison}
    groups: list[tuple[int, ...]] = []
    fixed: set[int] = set()
    owner: dict[int, list[int]] = {}
    for i, r in roots.items():  # convs sharing any root belong to one group
        for x in set(r.tolist()):
            owner.setdefault(x, []).append(i)
    seen: set[int] = set()
    for i in sorted(roots):
        if i in seen:
            continue
        group, stack = set(), [i]
        while stack:
            j = stack.pop()
            if j in group:
                continue
            group.add(j)
            stack.extend(k for x in set(roots[j].tolist()) for k in owner[x])
        seen |= group
        members = tuple(sorted(group))
        aligned = all(np.array_equal(roots[m], roots[members[0]]) for m in members)
        if not aligned or any(x in bad_roots for m in members for x in roots[m].tolist()):
            fixed.update(members)
        groups.append(members)
    return Coupling(graph, tuple(groups), frozenset(fixed))


def residual_units(graph: LayerGraph) -> dict[int, tuple[int, ...]]:
    """Shortcuts that close a removable residual block -> (its blocks..., shortcut): Darknet's
    `[conv][conv][shortcut from=-3]`, or a MobileNet bottleneck `[conv][depthwise][se][conv][shortcut from=-5]`,
    optionally with blocks that are the identity at inference between the last conv and the shortcut
    (Yolo-Fastest's `[conv][dropout][shortcut]`). The chain from the shortcut's source to it must be single-reader
    blocks whose last conv (`unit_conv`) has BN and keeps the source's width, so removing the unit leaves the
    identity path."""
    out = {}
    for s, (b, section) in enumerate(zip(graph.cfg.blocks, graph.sections)):
        if section.residual is None or len(graph.inputs[s]) != 2 or not section.residual(b):
            continue
        prev, src = graph.inputs[s]
        chain = tuple(range(src + 1, s))
        if prev != s - 1 or len(chain) < 2 or graph.channels[s - 1] != graph.channels[src]:
            continue
        last = unit_conv(graph, chain + (s,))
        if last <= src + 1 or not graph.sections[last].conv or not graph.cfg.blocks[last].get_int("batch_normalize", 0):
            continue
        if all(graph.inputs[j] == (j - 1,) and graph.consumers[j] == (j + 1,)
               and (graph.sections[j].conv or graph.sections[j].unit_passenger) for j in chain):
            out[s] = chain + (s,)
    return out


def unit_conv(graph: LayerGraph, unit: tuple[int, ...]) -> int:
    """The conv that closes a residual unit's branch (its BN gamma scores the unit; removing the unit zeroes it):
    the last block before the shortcut that is not the identity at inference."""
    k = len(unit) - 2
    while k > 0 and graph.sections[unit[k]].inference_identity:
        k -= 1
    return unit[k]


def _reference_excluded(graph: LayerGraph) -> set[int]:
    """Reference rules 3 and 4: the conv right before [upsample], the conv feeding SPP ([maxpool] then [route]);
    each section says whether it guards its producer (`Section.guards_producer`)."""
    blocks, out = graph.cfg.blocks, set()
    for i in range(len(blocks) - 1):
        guards = graph.sections[i + 1].guards_producer
        if guards is not None and guards(blocks, i + 1):
            out.add(i)
    return out


def prunable_layers(coupling: Coupling, mode: int) -> list[int]:
    """The reference's prune set: mode 0 (normal/regular: residual-stream convs excluded), 1 (shortcut/slim:
    residual convs included), 2 (layer pruning: the BN conv right before each removable shortcut)."""
    graph = coupling.graph
    if mode == 2:
        return sorted(c for c in (unit_conv(graph, u) for u in residual_units(graph).values())
                      if c not in coupling.fixed)
    excluded = _reference_excluded(graph) | coupling.fixed
    out = []
    for group in coupling.groups:
        if mode == 0 and len(group) > 1:
            continue
        if mode == 1 and any(i in excluded for i in group):  # one unprunable member keeps the whole chain
            continue
        out.extend(i for i in group if i not in excluded)
    return sorted(out)
