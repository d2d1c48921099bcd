"""Layer removal: drop blocks, re-map EVERY route/shortcut/scale_channels/sam index (absolute, negative relative,
multi-input routes), copy the surviving weights. The only module that renumbers layers.

A reference to a dropped block is redirected to what that block passes on: a dropped `[shortcut]` whose
residual branch is dropped too passes its identity input (`from`). Anything else that references a dropped
block is an error naming it.
"""
from __future__ import annotations

import logging

import torch

from ..cfg import Block
from ..errors import PruneError
from ..model import DarknetModel, build_model
from .coupling import residual_units
from .surgery import channel_offsets, copy_layer

__all__ = ["remove_blocks", "remove_units"]

log = logging.getLogger(__name__)
_REF_KEYS = {"route": "layers", "shortcut": "from", "scale_channels": "from", "sam": "from"}


def _resolver(model: DarknetModel, drop: set[int]):
    graph = model.graph

    def resolve(j: int, user: int) -> int:
        seen = j
        while j in drop:
            if graph.cfg.blocks[j].type != "shortcut" or graph.inputs[j][0] not in drop:
                raise PruneError(f"layer {user} reads layer {seen}, which is being removed and is not a residual "
                                 "shortcut; keep it or remove its readers too")
            j = graph.inputs[j][1]
        return j
    return resolve


def _remap(block: Block, i: int, model: DarknetModel, resolve, new_index: dict[int, int]) -> Block:
    key = _REF_KEYS.get(block.type)
    if key is None:
        return block
    raw = block.get_ints(key)
    olds = model.graph.inputs[i] if block.type == "route" else model.graph.inputs[i][1:]
    refs = []
    for r, old in zip(raw, olds):
        new = new_index[resolve(old, i)]
        refs.append(str(new - new_index[i]) if r < 0 else str(new))
    return block.replace(**{key: ",".join(refs)})


def remove_blocks(model: DarknetModel, drop: set[int], keep: dict[int, torch.Tensor] | None = None,
                  compensate: bool = True) -> DarknetModel:
    """New model without the blocks in `drop`. `keep` (conv -> output channels that stay alive, e.g. all-False
    for a removed residual branch) drives the act(beta) compensation folded into the following convs."""
    graph, blocks = model.graph, model.cfg.blocks
    if not drop:
        raise PruneError("no block to remove; pass at least one layer index")
    resolve = _resolver(model, drop)
    kept = [i for i in range(len(blocks)) if i not in drop]
    new_index = {old: new for new, old in enumerate(kept)}
    for pos, i in enumerate(kept):  # the implicit input (previous block) must survive the removal
        prev = graph.inputs[i][0] if blocks[i].type != "route" else None
        if prev is not None and prev >= 0 and resolve(prev, i) != (kept[pos - 1] if pos else -1):
            raise PruneError(f"removing blocks before layer {i} changes what it reads; remove whole residual blocks")
    new_blocks = [_remap(blocks[i], i, model, resolve, new_index) for i in kept]
    offsets = channel_offsets(model, keep or {}) if compensate else {}
    new = build_model(model.cfg.with_blocks(new_blocks)).to(next(model.parameters()).device)
    for i in kept:
        copy_layer(new.layers[new_index[i]], model.layers[i], offset=offsets.get(i))
    new.header = model.header
    log.info("removed %d blocks: %s", len(drop), sorted(drop))
    return new.train(model.training)


def remove_units(model: DarknetModel, shortcuts: set[int], compensate: bool = True) -> tuple[DarknetModel, set[int]]:
    """Remove residual blocks [conv][conv][shortcut] named by their shortcut index. Returns (model, dropped)."""
    units = residual_units(model.graph)
    bad = sorted(s for s in shortcuts if s not in units)
    if bad:
        raise PruneError(f"layer {bad[0]} does not close a removable residual block [conv][conv][shortcut from=-3]")
    drop = {b for s in shortcuts for b in units[s]}
    keep = {units[s][1]: torch.zeros(model.graph.channels[units[s][1]], dtype=torch.bool) for s in shortcuts}
    return remove_blocks(model, drop, keep, compensate), drop
