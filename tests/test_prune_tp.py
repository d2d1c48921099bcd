"""torch-pruning's traced DependencyGraph agrees with our cfg coupling on residual-add and depthwise groups."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from compress.darknet.cfg import read_cfg
from compress.darknet.model import build_model
from compress.prune.coupling import build_coupling, prunable_layers
from compress.prune.tp import CRITERIA, build_dependency_graph, tp_scores

from conftest import DATA, randomize_bn

import torch_pruning as tp


def _tp_conv_groups(model) -> set[tuple[int, ...]]:
    dg = build_dependency_graph(model, 64)
    index = {model.layers[i].conv: i for i, b in enumerate(model.cfg.blocks) if b.type == "convolutional"}
    groups = set()
    for i, conv in ((i, model.layers[i].conv) for i in index.values()):
        if conv.groups > 1:
            continue
        group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[0])
        groups.add(tuple(sorted({index[dep.target.module] for dep, _ in group
                                 if dep.handler in (tp.prune_conv_out_channels, tp.prune_depthwise_conv_out_channels)
                                 and dep.target.module in index})))
    merged: list[set[int]] = []  # a depthwise conv fed by a concat joins two groups: merge overlapping ones
    for g in groups:
        joined = set(g)
        for other in [m for m in merged if m & joined]:
            merged.remove(other)
            joined |= other
        merged.append(joined)
    return {tuple(sorted(g)) for g in merged if len(g) > 1}


def _check(path: Path) -> None:
    model = build_model(read_cfg(path))
    ours = {g for g in build_coupling(model.graph).groups if len(g) > 1}
    assert _tp_conv_groups(model) == ours


@pytest.mark.parametrize("name", ["tiny-shortcut", "tiny-v4-groups"])
def test_tp_groups_equal_ours_tiny(name: str) -> None:
    _check(DATA / f"{name}.cfg")


@pytest.mark.parametrize("name", ["yolov3-tiny", "yolov4-tiny", "yolo-fastest-1.1"])
def test_tp_groups_equal_ours_official(assets: Path, name: str) -> None:
    _check(assets / "weights" / f"{name}.cfg")


def _reference_scores(model, coupling, criterion: str, img_size: int = 64) -> dict[int, torch.Tensor]:
    """torch-pruning's own importance __call__ on a deep copy (the pre-speed-up path)."""
    work = copy.deepcopy(model).eval()
    if criterion == "taylor":
        x = torch.rand(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
        sum((p ** 2).mean() for p in work(x, raw=True)).backward()
    dg = build_dependency_graph(work, img_size)
    importance = CRITERIA[criterion]()
    layers = set(prunable_layers(coupling, 1))
    out = {}
    for group in coupling.groups:
        if all(i in layers for i in group):
            conv = work.layers[group[0]].conv
            g = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
            out.update({i: importance(g).float() for i in group})
    return out


def _state(model) -> tuple:
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [(p.requires_grad, p.grad) for p in model.parameters()])


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
@pytest.mark.parametrize("name", ["tiny-shortcut", "tiny-v4-groups", "yolo-fastest-1.1"])
def test_fused_scores_equal_torch_pruning(assets: Path, criterion: str, name: str) -> None:
    """tp_scores (fused sums, no model copy) == torch-pruning's importance classes; the model is untouched."""
    path = assets / "weights" / f"{name}.cfg" if name == "yolo-fastest-1.1" else DATA / f"{name}.cfg"
    model = randomize_bn(build_model(read_cfg(path)), 1).train()
    coupling = build_coupling(model.graph)
    before = _state(model)
    ours = tp_scores(model, coupling, criterion, 64)
    ref = _reference_scores(model, coupling, criterion)
    assert ours.keys() == ref.keys() and len(ours) > 0
    for i in ref:
        torch.testing.assert_close(ours[i], ref[i], rtol=1e-5, atol=1e-7)
    after = _state(model)
    assert all(torch.equal(before[0][k], v) for k, v in after[0].items())
    assert before[1:] == after[1:]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
