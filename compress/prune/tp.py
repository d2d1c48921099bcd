"""Criteria from torch-pruning 1.6.1 (`import torch_pruning as tp`): `group-norm`, `l1`, `taylor`.

torch-pruning only *scores* channels here: its DependencyGraph, traced on a copy of the model, gives each of our
coupled groups (mode-1 prune set) a per-channel importance; a global threshold at `--percent` over those
(mean-normalised) scores, a per-layer floor (`--layer-keep`) and our shared policy build the mask, which the
same surgery core applies, so the result is still a Darknet pair.

`taylor` needs gradients. Without data we use a data-free proxy: one backward of the mean squared raw head
outputs on a random input (`img_size`, seeded). It ranks channels by |w * dL/dw| of that proxy loss, not of the
detection loss; prefer `group-norm` unless you score with real data.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch

from ..model import DarknetModel
from . import PruneConfig, finalize_mask, register_pruner
from .coupling import Coupling, prunable_layers
from .mask import ChannelMask, apply_floor, global_threshold, threshold_masks

__all__ = ["build_dependency_graph", "tp_scores", "CRITERIA"]


def _tp():
    import torch_pruning
    return torch_pruning


CRITERIA: dict[str, Callable[[], object]] = {
    "group-norm": lambda: _tp().importance.GroupMagnitudeImportance(p=2),
    "l1": lambda: _tp().importance.GroupMagnitudeImportance(p=1),
    "taylor": lambda: _tp().importance.GroupTaylorImportance(),
}


def build_dependency_graph(model: DarknetModel, img_size: int = 64):
    """torch-pruning DependencyGraph of `model` (traced on a random image through the raw head maps)."""
    tp = _tp()
    return tp.DependencyGraph().build_dependency(
        model, example_inputs=torch.rand(1, model.cfg.channels, img_size, img_size),
        forward_fn=lambda m, x: m(x, raw=True), verbose=False)


def _proxy_gradients(model: DarknetModel, img_size: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, model.cfg.channels, img_size, img_size, generator=g)
    model.zero_grad()
    loss = sum((p ** 2).mean() for p in model(x, raw=True))
    loss.backward()


def tp_scores(model: DarknetModel, coupling: Coupling, criterion: str, img_size: int) -> dict[int, torch.Tensor]:
    """Per prunable conv: torch-pruning's importance of its coupled group (identical for every member)."""
    tp = _tp()
    work = copy.deepcopy(model).cpu().eval()
    for p in work.parameters():
        p.requires_grad_(True)
    if criterion == "taylor":
        _proxy_gradients(work, img_size)
    dg = build_dependency_graph(work, img_size)
    importance = CRITERIA[criterion]()
    layers = set(prunable_layers(coupling, 1))
    scores: dict[int, torch.Tensor] = {}
    for group in coupling.groups:
        if not all(i in layers for i in group):
            continue
        conv = work.layers[group[0]].conv
        tp_group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
        imp = importance(tp_group).detach().float().cpu()
        scores.update({i: imp.clone() for i in group})
    return scores


def _make(criterion: str) -> Callable:
    def select(model: DarknetModel, coupling: Coupling, config: PruneConfig) -> tuple[ChannelMask, dict]:
        scores = tp_scores(model, coupling, criterion, config.img_size)
        thr = global_threshold(scores, config.percent)
        mask = apply_floor(threshold_masks(scores, thr, strict=True), scores, config.layer_keep)
        info = {"threshold": thr, "criterion": criterion, "prunable_layers": len(scores)}
        return finalize_mask(mask, coupling, scores, config), info
    select.__doc__ = f"torch-pruning {criterion} importance -> global threshold -> shared mask policy."
    return select


for _name in CRITERIA:
    register_pruner(_name)(_make(_name))
