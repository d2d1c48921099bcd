"""The shared pruning core: apply a channel mask to a model and return a NEW, compact model.

1. Output-channel masks are propagated by each section's flow rule (`compress.darknet.sections`: route concat and
   `groups/group_id` slices, shortcut overlap, pass-through blocks), so every conv knows which input columns
   survive. A depthwise conv is cut with its producer: its rows are sliced, it has no columns to slice.
2. With `compensate`, each removed channel's constant activation `a = act(beta)` (exact when its gamma is 0)
   is folded into its consumers (reference section 3.1): per consumer conv output o,
   `offset_o = sum_c (sum of kernel taps W[o, c]) * a_c`, subtracted from the BN running mean (or added to the
   conv bias of a conv without BN). Constants add up along shortcut chains, go through a shortcut's activation
   (a removed channel is constant on every input of the join, so act(a + b) is a constant too) and pass through
   routes, maxpool and upsample. A constant that would ride on a live signal into a non-linear map is refused
   (PruneError), never folded wrongly. Exact for 1x1 consumers; for kxk consumers exact away from the
   zero-padded border.
3. New cfg via each section's `resize` (filters=, and groups= of a depthwise conv), `build_model`, then each
   section's `copy_pruned` copies its sliced tensors (sections without weights to slice are copied whole).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from compress.base.errors import PruneError
from compress.darknet.block import Block
from compress.darknet.graph import LayerGraph
from compress.darknet.layers import make_activation
from compress.darknet.model import DarknetModel, build_model
from compress.darknet.sections import Section
from compress.prune.coupling import build_coupling
from compress.prune.mask import ChannelMask, validate_mask

__all__ = ["apply_channel_mask", "propagate", "TagOps", "channel_offsets", "copy_layer"]

log = logging.getLogger(__name__)


class _VectorOps:
    """Per-channel keep masks (bool vectors) for the section table's flow rules; `_ConstOps` carries constants."""

    def __init__(self, graph: LayerGraph, own: Callable[[int], torch.Tensor], image: torch.Tensor) -> None:
        self.graph, self.own, self.image = graph, own, image

    def cat(self, vs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(vs))

    def part(self, v: torch.Tensor, groups: int, group_id: int) -> torch.Tensor:
        return v.chunk(groups)[group_id]

    def add(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        m = min(len(a), len(b))  # Darknet adds where the channels overlap
        return torch.cat((a[:m] & b[:m], a[m:]))

    def tie(self, a: torch.Tensor, b: torch.Tensor) -> None:
        pass

    def keep_whole(self, v: torch.Tensor) -> None:
        pass

    def opaque(self, v: torch.Tensor, block: Block) -> None:
        pass

    def act(self, v: torch.Tensor, block: Block) -> torch.Tensor:
        return v

    def fresh(self, i: int) -> torch.Tensor:
        return torch.ones(self.graph.channels[i], dtype=torch.bool)


class TagOps(_VectorOps):
    """Float channel tags (e.g. which coupled group a channel comes from): joins keep the larger tag where their
    inputs overlap, channels a block creates get tag 0 (pruning to a target's width layout)."""

    def add(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        m = min(len(a), len(b))
        return torch.cat((torch.maximum(a[:m], b[:m]), a[m:]))

    def fresh(self, i: int) -> torch.Tensor:
        return torch.zeros(self.graph.channels[i])


def _rows(live: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return torch.stack((live.float(), offset.float()), 1)


class _ConstOps(_VectorOps):
    """Removed channels' constants as (n, 2) rows (live, offset): live = 1 where the channel still carries a
    signal, offset = the constant riding on it (the channel's whole value when live = 0). A removed channel is
    constant, so a join's activation maps its value exactly; a constant added to a live signal cannot pass a
    non-linear map (act(x + c) != act(x) + c) and is refused rather than folded wrongly."""

    def add(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        m = min(len(a), len(b))
        both = _rows(torch.maximum(a[:m, 0], b[:m, 0]), a[:m, 1] + b[:m, 1])
        return torch.cat((both, a[m:]))

    def fresh(self, i: int) -> torch.Tensor:
        n = self.graph.channels[i]
        return _rows(torch.ones(n), torch.zeros(n))

    def opaque(self, v: torch.Tensor, block: Block) -> None:
        if bool((v[:, 1] != 0).any()):
            raise PruneError(f"{block.where()}: [{block.type}] mixes its input non-linearly (weights, gates or "
                             "products), so the constant of a removed block or channel that reaches it cannot be "
                             "folded into a later conv; keep the blocks that feed it")

    def act(self, v: torch.Tensor, block: Block) -> torch.Tensor:
        fn = make_activation(block, "linear")
        if isinstance(fn, torch.nn.Identity):
            return v
        live, offset = v.unbind(1)
        if bool(((live > 0) & (offset != 0)).any()):
            raise PruneError(f"{block.where()}: [{block.type}] activation={block.get('activation')} follows the "
                             "addition of a removed block's constant to a live signal (act(x + c) != act(x) + c), "
                             "so removing it cannot be exact; keep that block")
        with torch.no_grad():
            return _rows(live, torch.where(live > 0, offset, fn(offset)))


def propagate(graph: LayerGraph, ops: _VectorOps) -> list[torch.Tensor]:
    """Per-block channel vectors by each section's flow rule: convs give `ops.own(i)`, routes concatenate/slice,
    pass-through blocks copy, shortcuts merge their inputs where they overlap (and apply their activation)."""
    out: list[torch.Tensor] = []
    for i, (block, section) in enumerate(zip(graph.cfg.blocks, graph.sections)):
        ins = [ops.image if s < 0 else out[s] for s in graph.inputs[i]]
        out.append(section.flow(block, i, ins, ops))
    return out


def _keep_vectors(graph: LayerGraph, mask: ChannelMask) -> list[torch.Tensor]:
    full = lambda i: mask.get(i, torch.ones(graph.channels[i], dtype=torch.bool))  # noqa: E731
    return propagate(graph, _VectorOps(graph, full, torch.ones(graph.cfg.channels, dtype=torch.bool)))


def _constants(model: DarknetModel, keep: ChannelMask) -> list[torch.Tensor]:
    """Per block: (live, offset) rows; a removed channel emits the constant act(beta) (exact when gamma is 0)."""
    graph = model.graph

    def own(i: int) -> torch.Tensor:
        layer, n = model.layers[i], graph.channels[i]
        if i not in keep or layer.bn is None:
            return _rows(torch.ones(n), torch.zeros(n))
        with torch.no_grad():
            a = layer.act(layer.bn.bias.detach().float().cpu().view(1, -1, 1, 1)).flatten()
        kept = keep[i].cpu()
        return _rows(kept, torch.where(kept, torch.zeros_like(a), a))

    image = _rows(torch.ones(graph.cfg.channels), torch.zeros(graph.cfg.channels))
    return propagate(graph, _ConstOps(graph, own, image))


def channel_offsets(model: DarknetModel, keep: ChannelMask) -> dict[int, torch.Tensor]:
    """Per consumer conv: the per-output offset that the removed channels' constants contributed.
    Subtract it from the BN running mean (or add it to the bias) to compensate for their removal."""
    consts = [rows[:, 1] for rows in _constants(model, keep)]
    out = {}
    for i, section in enumerate(model.graph.sections):
        src = model.graph.inputs[i][0]
        if not section.conv or src < 0 or not bool(consts[src].any()):
            continue
        w = model.layers[i].conv.weight.detach().float().cpu()
        groups = model.layers[i].conv.groups
        taps = w.sum((2, 3)).view(groups, w.shape[0] // groups, w.shape[1])
        a = consts[src].view(groups, 1, w.shape[1])
        out[i] = (taps * a).sum(-1).flatten()
    return out


def copy_layer(section: Section, dst: torch.nn.Module, src: torch.nn.Module, out_idx: torch.Tensor | None = None,
               in_keep: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> None:
    """Copy `src` into its resized `dst` by the section's slicing rule (`Section.copy_pruned`: output rows
    `out_idx`, the input channels `in_keep` marks, `offset` folded in); a section without one copies whole."""
    if section.copy_pruned is None:
        dst.load_state_dict(src.state_dict())
        return
    section.copy_pruned(dst, src, out_idx, in_keep, offset)


def apply_channel_mask(model: DarknetModel, mask: ChannelMask, compensate: bool = True) -> DarknetModel:
    """Return a new compact model keeping `mask[i]` output channels of conv i (others kept whole).

    Example:
        >>> small = apply_channel_mask(model, {3: torch.tensor([True, False, True, True])})
    Raises PruneError for an invalid mask (empty, fixed layer, coupled layers differing). The input model is
    not modified.
    """
    graph = model.graph
    mask = validate_mask(build_coupling(graph), {i: m.cpu() for i, m in mask.items()})
    keep = _keep_vectors(graph, mask)
    offsets = channel_offsets(model, mask) if compensate else {}
    blocks = [graph.sections[i].resize(b, int(mask[i].sum())) if i in mask else b
              for i, b in enumerate(model.cfg.blocks)]
    new = build_model(model.cfg.with_blocks(blocks))
    device = next(model.parameters()).device
    new.to(device)
    for i, (dst, src) in enumerate(zip(new.layers, model.layers)):
        s = graph.inputs[i][0]
        out_idx = mask[i].nonzero().flatten() if i in mask else None
        copy_layer(graph.sections[i], dst, src, out_idx, None if s < 0 else keep[s], offsets.get(i))
    new.header = model.header
    log.info("pruned %d layers; %d -> %d conv channels", len(mask), sum(graph.channels[i] for i in mask),
             sum(int(m.sum()) for m in mask.values()))
    return new.train(model.training)
