"""Criteria from torch-pruning 1.6.1 (`import torch_pruning as tp`): `group-norm`, `l1`, `taylor`.

torch-pruning only *scores* channels here: its DependencyGraph, traced on the model, gives each of our coupled
groups (mode-1 prune set) a per-channel importance; a global threshold at `--percent` over those
(mean-normalised) scores, a per-layer floor (`--layer-keep`) and our shared policy build the mask, which the
same surgery core applies, so the result is still a Darknet pair.

Speed (yolov3: 62M weights): no copy of the model (eval mode, parameter flags and gradients are restored
afterwards), and the per-member sums of torch-pruning's importance classes are computed here in one fused
reduction per weight instead of its index-copy/abs/pow/sum passes; torch-pruning's own group, root indices,
reduction ("mean") and normaliser ("mean") are used unchanged. tests/test_prune_tp.py checks the scores
against torch-pruning's `__call__` on real cfgs.

`taylor` needs gradients. Without data we use a data-free proxy: one backward of the mean squared raw head
outputs on a random input (`img_size`, seeded). It ranks channels by |w * dL/dw| of that proxy loss, not of the
detection loss; prefer `group-norm` unless you score with real data.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from compress.darknet.model import DarknetModel
from compress.prune.api import finalize_mask
from compress.prune.coupling import Coupling, prunable_layers
from compress.prune.mask import ChannelMask, apply_floor, global_threshold, threshold_masks
from compress.prune.registry import PruneConfig, register_pruner

__all__ = ["build_dependency_graph", "tp_scores", "CRITERIA"]


def _tp():
    import torch_pruning  # a heavy import that only the torch-pruning methods need
    return torch_pruning


CRITERIA: dict[str, Callable[[], object]] = {
    "group-norm": lambda: _tp().importance.GroupMagnitudeImportance(p=2),
    "l1": lambda: _tp().importance.GroupMagnitudeImportance(p=1),
    "taylor": lambda: _tp().importance.GroupTaylorImportance(),
}


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def build_dependency_graph(model: DarknetModel, img_size: int = 64):
    """torch-pruning DependencyGraph of `model` (traced on a random image through the raw head maps)."""
    tp = _tp()
    return tp.DependencyGraph().build_dependency(
        model, example_inputs=torch.rand(1, model.cfg.channels, img_size, img_size, device=_device(model)),
        forward_fn=lambda m, x: m(x, raw=True), verbose=False)


@contextmanager
def _scoring(model: DarknetModel) -> Iterator[DarknetModel]:
    """The model in eval mode with trainable parameters and no gradients; modes, flags and gradients are
    restored on exit (the caller's model is left as it was, without the cost of a deep copy)."""
    modes = [(m, m.training) for m in model.modules()]
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    model.eval()
    for p, _, _ in params:
        p.requires_grad_(True)
        p.grad = None
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, flag, grad in params:
            p.grad = grad
            p.requires_grad_(flag)


def _proxy_gradients(model: DarknetModel, img_size: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, model.cfg.channels, img_size, img_size, generator=g).to(_device(model))
    loss = sum((p ** 2).mean() for p in model(x, raw=True))
    loss.backward()


def _channel_sums(w: torch.Tensor, dw: torch.Tensor | None, p: float | None, dim: int) -> torch.Tensor:
    """Sum over all but `dim` of |w|^p (magnitude) or |w * dw| (taylor): one reduction, no index copies."""
    other = [d for d in range(w.dim()) if d != dim]
    if dw is None:
        return torch.linalg.vector_norm(w, ord=p, dim=other).pow_(p)
    return (w * dw).abs_().sum(other)


def _member_imp(imp, dep, idxs: list[int], taylor: bool) -> torch.Tensor | None:
    """One group member's local importance, as torch-pruning's __call__ computes it (same branches; Darknet
    models have no transposed convolutions)."""
    fn, layer, prune_fn = _tp().pruner.function, dep.layer, dep.pruning_fn
    if not isinstance(layer, tuple(imp.target_types)):
        return None
    w = layer.weight.detach()
    dw = layer.weight.grad.detach() if taylor else None
    p = None if taylor else imp.p
    if prune_fn in (fn.prune_conv_out_channels, fn.prune_linear_out_channels):
        return _channel_sums(w, dw, p, 0)[idxs]
    if prune_fn in (fn.prune_conv_in_channels, fn.prune_linear_in_channels):
        local = _channel_sums(w, dw, p, 1)
        if prune_fn == fn.prune_conv_in_channels and layer.groups not in (1, layer.in_channels):
            local = local.repeat(layer.groups)
        return local[idxs]
    norm_fn = fn.prune_groupnorm_out_channels if taylor else fn.prune_batchnorm_out_channels
    if prune_fn == norm_fn and layer.affine:  # (torch-pruning's taylor skips BatchNorm members)
        return (w[idxs] * dw[idxs]).abs() if taylor else w[idxs].abs().pow(p)
    return None


@torch.no_grad()
def _group_importance(imp, group, taylor: bool) -> torch.Tensor | None:
    """torch-pruning's group importance (its `_reduce` and `_normalize`) from the fused member sums.
    Biases are not scored (both criteria are built with bias=False)."""
    values, roots = [], []
    for i, (dep, idxs) in enumerate(group):
        local = _member_imp(imp, dep, sorted(idxs) if taylor else idxs, taylor)
        if local is not None:
            values.append(local)
            roots.append(group[i].root_idxs)
    if not values:
        return None
    return imp._normalize(imp._reduce(values, roots), imp.normalizer)


def tp_scores(model: DarknetModel, coupling: Coupling, criterion: str, img_size: int) -> dict[int, torch.Tensor]:
    """Per prunable conv: torch-pruning's importance of its coupled group (identical for every member).
    `model` is not changed (modes, flags and gradients restored)."""
    tp = _tp()
    importance = CRITERIA[criterion]()
    layers = set(prunable_layers(coupling, 1))
    scores: dict[int, torch.Tensor] = {}
    with _scoring(model) as work:
        if criterion == "taylor":
            _proxy_gradients(work, img_size)
        dg = build_dependency_graph(work, img_size)
        for group in coupling.groups:
            if not all(i in layers for i in group):
                continue
            conv = work.layers[group[0]].conv
            tp_group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
            imp = _group_importance(importance, tp_group, criterion == "taylor").detach().float().cpu()
            scores.update({i: imp.clone() for i in group})
    return scores


def _scores(criterion: str) -> Callable:
    def scores(model: DarknetModel, coupling: Coupling, config: PruneConfig) -> dict[int, torch.Tensor]:
        return tp_scores(model, coupling, criterion, config.img_size)
    return scores


def _make(criterion: str) -> Callable:
    def select(model: DarknetModel, coupling: Coupling, config: PruneConfig) -> tuple[ChannelMask, dict]:
        scores = tp_scores(model, coupling, criterion, config.img_size)
        thr = global_threshold(scores, config.percent)
        mask = apply_floor(threshold_masks(scores, thr, strict=True), scores, config.keep_floor)
        info = {"threshold": thr, "criterion": criterion, "prunable_layers": len(scores),
                "layer_keep": config.keep_floor}
        return finalize_mask(mask, coupling, scores, config), info
    select.__doc__ = f"torch-pruning {criterion} importance -> global threshold -> shared mask policy."
    return select


for _name in CRITERIA:
    register_pruner(_name, scores=_scores(_name))(_make(_name))
