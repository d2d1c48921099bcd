"""Layer removal: drop blocks, re-map EVERY route/shortcut/scale_channels/sam index (absolute, negative relative,
multi-input routes), copy the surviving weights. The only module that renumbers layers.

A reference to a dropped block is redirected to what that block passes on: a dropped `[shortcut]` whose
residual branch is dropped too passes its identity input (`from`), which is exact only for a linear unweighted
join: a `[shortcut]` with an activation or weights is refused (PruneError naming it), and so is a removed branch's
constant that would reach a non-linear join downstream (see `surgery`). Anything else that references a dropped
block is an error naming it.
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch

from compress.darknet.block import Block
from compress.base.errors import PruneError
from compress.darknet.model import DarknetModel, build_model
from compress.prune.coupling import residual_units, unit_conv
from compress.prune.surgery import channel_offsets, copy_layer

__all__ = ["remove_blocks", "remove_units", "kept_layers"]

log = logging.getLogger(__name__)


def kept_layers(n_layers: int, removed: Iterable[int] = ()) -> list[int]:
    """The old index of each layer left after removing `removed` from `n_layers`: the one renumbering (the new
    index of old layer kept[j] is j; channel pruning alone renumbers nothing)."""
    gone = set(removed)
    return [i for i in range(n_layers) if i not in gone]


def _ref_count(block: Block, keys: tuple[str, ...]) -> int:
    return sum(len(block.get_ints(k)) for k in keys if block.has(k))


def _check_plain_add(model: DarknetModel, j: int) -> None:
    """Only an unweighted linear join leaves exactly its identity input when its residual branch goes."""
    block = model.cfg.blocks[j]
    if not model.graph.sections[j].residual(block):
        raise PruneError(f"{block.where()}: layer {j} ([{block.type}] activation={block.get('activation', 'linear')}"
                         f", weights_type={block.get('weights_type', 'none')}) is not a plain linear add: removing "
                         "its residual block would drop its activation or weights (act(x + f(x)) is not x); "
                         "remove only blocks closed by a linear unweighted [shortcut]")


def _resolver(model: DarknetModel, drop: set[int]):
    graph = model.graph

    def resolve(j: int, user: int) -> int:
        seen = j
        while j in drop:
            if graph.sections[j].residual is None or graph.inputs[j][0] not in drop:
                raise PruneError(f"layer {user} reads layer {seen}, which is being removed and is not a residual "
                                 "shortcut; keep it or remove its readers too")
            _check_plain_add(model, j)
            j = graph.inputs[j][1]
        return j
    return resolve


def _remap(block: Block, i: int, model: DarknetModel, resolve, new_index: dict[int, int]) -> Block:
    """Rewrite the section's layer-reference keys (the section table's `refs`) for the new numbering."""
    inputs = model.graph.inputs[i]
    olds = iter(inputs[len(inputs) - _ref_count(block, model.graph.sections[i].refs):])  # refs come last
    changes = {}
    for key in model.graph.sections[i].refs:
        if not block.has(key):
            continue
        refs = []
        for r in block.get_ints(key):
            new = new_index[resolve(next(olds), i)]
            refs.append(str(new - new_index[i]) if r < 0 else str(new))
        changes[key] = ",".join(refs)
    return block.replace(**changes) if changes else block


def remove_blocks(model: DarknetModel, drop: set[int], keep: dict[int, torch.Tensor] | None = None,
                  compensate: bool = True) -> DarknetModel:
    """New model without the blocks in `drop`. `keep` (conv -> output channels that stay alive, e.g. all-False
    for a removed residual branch) drives the act(beta) compensation folded into the following convs."""
    graph, blocks = model.graph, model.cfg.blocks
    if not drop:
        raise PruneError("no block to remove; pass at least one layer index")
    resolve = _resolver(model, drop)
    kept = kept_layers(len(blocks), drop)
    new_index = {old: new for new, old in enumerate(kept)}
    for pos, i in enumerate(kept):  # the implicit input (previous block) must survive the removal
        section = graph.sections[i]
        implicit = section.reads_previous and len(graph.inputs[i]) > _ref_count(blocks[i], section.refs)
        prev = graph.inputs[i][0] if implicit else None
        if prev is not None and prev >= 0 and resolve(prev, i) != (kept[pos - 1] if pos else -1):
            raise PruneError(f"removing blocks before layer {i} changes what it reads; remove whole residual blocks")
    new_blocks = [_remap(blocks[i], i, model, resolve, new_index) for i in kept]
    offsets = channel_offsets(model, keep or {}) if compensate else {}
    new = build_model(model.cfg.with_blocks(new_blocks)).to(next(model.parameters()).device)
    for i in kept:
        copy_layer(graph.sections[i], new.layers[new_index[i]], model.layers[i], offset=offsets.get(i))
    new.header = model.header
    log.info("removed %d blocks: %s", len(drop), sorted(drop))
    return new.train(model.training)


def remove_units(model: DarknetModel, shortcuts: set[int], compensate: bool = True) -> tuple[DarknetModel, set[int]]:
    """Remove residual blocks (`coupling.residual_units`) named by their shortcut index. Returns (model, dropped)."""
    units = residual_units(model.graph)
    bad = sorted(s for s in shortcuts if s not in units)
    for s in bad:
        section = model.graph.sections[s] if 0 <= s < len(model.graph.sections) else None
        if section is not None and section.residual is not None:
            _check_plain_add(model, s)  # the clearer error when the join is non-linear or weighted
    if bad:
        raise PruneError(f"layer {bad[0]} does not close a removable residual block ([conv][conv][shortcut from=-3] "
                         "or a bottleneck of single-reader convs)")
    drop = {b for s in shortcuts for b in units[s]}
    closing = [unit_conv(model.graph, units[s]) for s in shortcuts]
    keep = {c: torch.zeros(model.graph.channels[c], dtype=torch.bool) for c in closing}
    return remove_blocks(model, drop, keep, compensate), drop
