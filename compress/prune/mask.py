"""Channel masks: pure functions (scores, prunable set, params) -> validated `ChannelMask`.

A `ChannelMask` maps a conv block index to a bool vector of the output channels it keeps. Layers that are
not in the mask are kept whole. Ties are broken deterministically (lower channel index wins).
"""
from __future__ import annotations

import math

import torch

from compress.base.errors import PruneError
from compress.prune.coupling import Coupling

__all__ = ["ChannelMask", "global_threshold", "safe_percent", "top_k", "threshold_masks", "merge_coupled",
           "apply_floor", "round_masks", "validate_mask", "check_not_emptied"]

ChannelMask = dict[int, torch.Tensor]


def _flat(scores: dict[int, torch.Tensor]) -> torch.Tensor:
    if not scores:
        raise PruneError("no prunable layer in this model for the chosen method; try another --method")
    return torch.sort(torch.cat([s.float().flatten() for s in scores.values()])).values


def global_threshold(scores: dict[int, torch.Tensor], percent: float) -> float:
    """thr = sorted scores[floor(N * percent)] (the reference's global threshold)."""
    flat = _flat(scores)
    return float(flat[min(int(len(flat) * percent), len(flat) - 1)])


def safe_percent(scores: dict[int, torch.Tensor], deciding: dict[int, torch.Tensor] | None = None
                 ) -> tuple[float, int]:
    """THE `safe_percent` (prune's `info` and sparse-train's report state this one definition): the largest
    --percent whose threshold (over all `scores`) leaves every `deciding` layer (default: every layer of
    `scores`) >= 1 channel kept (`>= thr`), and the layer that limits it. (Reference: highest_thr =
    min over layers of max |gamma|.) The percent is floored to 4 decimals, so it is itself safe."""
    flat = _flat(scores)
    deciding = scores if deciding is None else deciding
    layer = min(deciding, key=lambda i: (float(deciding[i].max()), i))
    highest = float(deciding[layer].max())
    return math.floor(int((flat < highest).sum()) / len(flat) * 1e4) / 1e4, layer


def top_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k highest scores; ties go to the lower index (stable, deterministic)."""
    order = torch.sort(-score.float(), stable=True).indices
    keep = torch.zeros(len(score), dtype=torch.bool)
    keep[order[:max(0, min(k, len(score)))]] = True
    return keep


def threshold_masks(scores: dict[int, torch.Tensor], thr: float, strict: bool = False) -> ChannelMask:
    return {i: (s > thr) if strict else (s >= thr) for i, s in scores.items()}


def check_not_emptied(mask: ChannelMask, scores: dict[int, torch.Tensor], percent: float, method: str,
                      deciding: dict[int, torch.Tensor] | None = None) -> None:
    """normal/shortcut: a layer emptied by the global threshold is an error naming the safe percent (computed
    over the same `scores` the threshold ran over; `deciding`: the layers whose own mask counts)."""
    empty = [i for i, m in mask.items() if not bool(m.any())]
    if empty:
        safe, layer = safe_percent(scores, deciding)
        raise PruneError(f"--percent {percent} would remove every channel of layer {empty[0]} ({method}); the largest "
                         f"safe --percent is {safe} (limited by layer {layer}); lower it or pass --min-keep 0.01")


def group_score(coupling: Coupling, scores: dict[int, torch.Tensor], group: tuple[int, ...]) -> torch.Tensor:
    """Score of a coupled group: max over members (a channel counts as strong as its strongest member)."""
    return torch.stack([scores[i].float() for i in group if i in scores]).amax(0)


def merge_coupled(mask: ChannelMask, coupling: Coupling, how: str = "union") -> ChannelMask:
    """Make coupled groups identical: `union` (slim: kept if any member keeps it) or `root` (shortcut: the
    chain root's mask). A group with a member outside the mask is left whole (dropped from the mask)."""
    out: ChannelMask = {}
    for group in coupling.groups:
        if not any(i in mask for i in group):
            continue
        if not all(i in mask for i in group):
            continue
        merged = mask[min(group)] if how == "root" else torch.stack([mask[i] for i in group]).any(0)
        out.update({i: merged.clone() for i in group})
    return out


def apply_floor(mask: ChannelMask, scores: dict[int, torch.Tensor], fraction: float, minimum: int = 1) -> ChannelMask:
    """Keep at least max(minimum, floor(C * fraction)) channels per layer, the top ones by score."""
    out = {}
    for i, m in mask.items():
        need = max(minimum, math.floor(len(m) * fraction))
        out[i] = m | top_k(scores[i], need) if int(m.sum()) < need else m
    return out


def round_masks(mask: ChannelMask, coupling: Coupling, scores: dict[int, torch.Tensor], n: int) -> ChannelMask:
    """Round each (coupled) layer's kept count UP to a multiple of n, clamped to [n, width] (width if < n);
    channels are chosen by the group score."""
    if n <= 1:
        return dict(mask)
    out: ChannelMask = {}
    for group in coupling.groups:
        if not all(i in mask for i in group):
            continue
        width, kept = len(mask[group[0]]), int(mask[group[0]].sum())
        target = min(width, max(n, math.ceil(kept / n) * n))
        keep = top_k(group_score(coupling, scores, group), target) if target != kept else mask[group[0]]
        out.update({i: keep.clone() for i in group})
    return out


def validate_mask(coupling: Coupling, mask: ChannelMask) -> ChannelMask:
    """Raise PruneError unless every entry is a non-empty bool vector of the layer's width, no fixed layer
    loses channels and coupled layers are identical. Returns the mask with fixed full-width entries dropped."""
    graph = coupling.graph
    out = {}
    for i, m in mask.items():
        if not 0 <= i < len(graph.channels) or not graph.sections[i].conv:
            raise PruneError(f"mask names layer {i}, which is not a conv block ([convolutional], [depthwise])")
        if m.dtype != torch.bool or m.shape != (graph.channels[i],):
            raise PruneError(f"mask of layer {i} must be a bool vector of {graph.channels[i]} channels")
        if not bool(m.any()):
            raise PruneError(f"mask of layer {i} keeps no channel; raise --min-keep or lower --percent")
        if bool(m.all()):
            continue
        if i in coupling.fixed:
            raise PruneError(f"layer {i} ({graph.cfg.blocks[i].where()}) cannot lose channels (head, grouped "
                             "route/conv or attention input); leave it out of the mask")
        for j in coupling.group_of[i]:
            if not torch.equal(mask.get(j, torch.ones_like(m)), m):
                raise PruneError(f"layers {i} and {j} are coupled by a shortcut chain but their masks differ; "
                                 "merge them with merge_coupled()")
        out[i] = m.clone()
    return out
