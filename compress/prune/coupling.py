"""Coupled channel groups and prunable layer sets, derived from the `LayerGraph` (never from hard-coded indices).

Every output channel of a `[convolutional]` block is a node. Walking the blocks in order, each block's output
channels are expressed as node ids: a conv creates nodes, a route concatenates (or slices, with `groups`) its
inputs' ids, maxpool/upsample/dropout/avgpool pass them through, and a shortcut *unites* its two inputs' ids
channel by channel (one union-find). Channels that cannot be removed are *fixed*:

* convs without BN (YOLO head convs, attention logits) and grouped/depthwise convs (their outputs);
* every channel feeding a grouped route (`groups/group_id`, YOLOv4-tiny CSP split; reference rule 5),
  a grouped or depthwise conv (rule 6), `[se]`/`[cbam]`/`[eca]` (their weights are sized by the channel
  count), `[scale_channels]`/`[sam]` operands, `maxpool_depth`, `[yolo]`/`[region]` and the image.

Simplest-correct choice: these producers are excluded instead of being pruned symmetrically. A coupled group
is a set of convs whose channels are tied one-to-one (a residual chain); a group with any fixed channel, or
whose ties are not channel-aligned, is fixed as a whole.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..graph import LayerGraph

__all__ = ["Coupling", "build_coupling", "prunable_layers", "residual_units", "MODES"]

MODES = (0, 1, 2)
_PASS = ("maxpool", "upsample", "dropout", "avgpool")
_POISON_INPUT = ("se", "cbam", "eca", "yolo", "region")


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


def _walk(graph: LayerGraph) -> tuple[_UnionFind, dict[int, np.ndarray], set[int]]:
    blocks = graph.cfg.blocks
    convs = [i for i, b in enumerate(blocks) if b.type == "convolutional"]
    offset, n = {}, graph.cfg.channels
    for i in convs:
        offset[i] = n
        n += graph.channels[i]
    uf, poison = _UnionFind(n), set(range(graph.cfg.channels))
    ids: dict[int, np.ndarray] = {}
    image = np.arange(graph.cfg.channels)
    for i, block in enumerate(blocks):
        ins = [image if s < 0 else ids[s] for s in graph.inputs[i]]
        ids[i] = _block_ids(block, i, graph, ins, offset, uf, poison)
    return uf, {i: ids[i] for i in convs}, poison


def _block_ids(block, i: int, graph: LayerGraph, ins: list[np.ndarray], offset: dict[int, int],
               uf: _UnionFind, poison: set[int]) -> np.ndarray:
    t = block.type
    if t == "convolutional":
        own = np.arange(offset[i], offset[i] + graph.channels[i])
        if block.get_int("groups", 1) > 1:
            poison.update(ins[0].tolist())
            poison.update(own.tolist())
        elif not block.get_int("batch_normalize", 0):
            poison.update(own.tolist())
        return own
    if t == "route":
        groups, gid = block.get_int("groups", 1), block.get_int("group_id", 0)
        if groups > 1:
            for x in ins:
                poison.update(x.tolist())
            ins = [np.array_split(x, groups)[gid] for x in ins]
        return np.concatenate(ins)
    if t == "shortcut":
        for a, b in zip(ins[0].tolist(), ins[1].tolist()):
            uf.union(a, b)
        return ins[0]
    if t in _PASS and not block.get_int("maxpool_depth", 0):
        return ins[0]
    for x in ins:  # se/cbam/eca/yolo/region/scale_channels/sam/maxpool_depth: keep their inputs whole
        poison.update(x.tolist())
    if t in _POISON_INPUT:
        return ins[0]
    if t == "scale_channels":
        return ins[1]
    if t == "sam":
        return ins[0]
    return _fresh_poisoned(uf, poison, graph.channels[i])


def _fresh_poisoned(uf: _UnionFind, poison: set[int], c: int) -> np.ndarray:
    start = len(uf.parent)
    uf.parent.extend(range(start, start + c))
    poison.update(range(start, start + c))
    return np.arange(start, start + c)


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


def residual_units(graph: LayerGraph) -> dict[int, tuple[int, int, int]]:
    """Shortcuts that close a removable ResBlock `[conv][conv][shortcut from=-3]` -> (conv1, conv2, shortcut).
    The two convs must feed only their own unit, so removing the three blocks leaves the identity path."""
    out = {}
    blocks = graph.cfg.blocks
    for s, b in enumerate(blocks):
        if b.type != "shortcut" or s < 3 or graph.inputs[s] != (s - 1, s - 3):
            continue
        c1, c2 = s - 2, s - 1
        if all(blocks[c].type == "convolutional" for c in (c1, c2)) and graph.consumers[c1] == (c2,) \
                and graph.consumers[c2] == (s,) and graph.inputs[c1] == (s - 3,):
            out[s] = (c1, c2, s)
    return out


def _reference_excluded(graph: LayerGraph) -> set[int]:
    """Reference rules 3 and 4: the conv right before [upsample], the conv feeding SPP ([maxpool] then [route])."""
    blocks, out = graph.cfg.blocks, set()
    for i in range(len(blocks) - 1):
        nxt = blocks[i + 1].type
        if nxt == "upsample":
            out.add(i)
        if nxt == "maxpool" and i + 2 < len(blocks) and blocks[i + 2].type == "route":
            out.add(i)
    return out


def prunable_layers(coupling: Coupling, mode: int) -> list[int]:
    """The reference's prune set: mode 0 (normal/regular: residual-stream convs excluded), 1 (shortcut/slim:
    residual convs included), 2 (layer pruning: the BN conv right before each removable shortcut)."""
    graph = coupling.graph
    if mode == 2:
        return sorted(u[1] for u in residual_units(graph).values() if u[1] not in coupling.fixed
                      and graph.cfg.blocks[u[1]].get_int("batch_normalize", 0))
    excluded = _reference_excluded(graph) | coupling.fixed
    out = []
    for group in coupling.groups:
        if mode == 0 and len(group) > 1:
            continue
        if mode == 1 and any(i in excluded for i in group):  # one unprunable member keeps the whole chain
            continue
        out.extend(i for i in group if i not in excluded)
    return sorted(out)
