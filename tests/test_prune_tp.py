"""torch-pruning's traced DependencyGraph agrees with our cfg coupling on residual-add and depthwise groups."""
from __future__ import annotations

from pathlib import Path

import pytest

from compress.cfg import read_cfg
from compress.model import build_model
from compress.prune.coupling import build_coupling
from compress.prune.tp import build_dependency_graph

from conftest import DATA

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
