"""BNL1Hook: exact gradient arithmetic per schedule (fake TrainState), statistics/histograms, and one tiny
end-to-end `sparse-train` run through fit()."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from compress.cfg import read_cfg
from compress.errors import PruneError
from compress.model import build_model
from compress.sparsity import BNL1Hook, SparsityConfig, sparsity_layers

from conftest import DATA, randomize_bn


def _state(epoch: int = 0, epochs: int = 10, out_dir=None):
    model = randomize_bn(build_model(read_cfg(DATA / "tiny-shortcut.cfg")))
    with torch.no_grad():
        model.layers[0].bn.weight[:3] = torch.tensor([-0.7, 0.0, 0.2])  # negative and zero gammas
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return SimpleNamespace(model=model, epoch=epoch, epochs=epochs, out_dir=out_dir, rank=0, step=0)


def _grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def test_mode_sets_match_reference_rules() -> None:
    model = build_model(read_cfg(DATA / "tiny-shortcut.cfg"))
    assert sparsity_layers(model, 0) == [0, 2, 5, 9, 14, 17, 24]            # residual stream excluded
    assert sparsity_layers(model, 1) == [0, 1, 2, 3, 5, 6, 9, 13, 14, 15, 17, 24]
    assert sparsity_layers(model, 2) == [3, 6, 15]                          # conv before each shortcut


@pytest.mark.parametrize("schedule, epoch, factor", [("constant", 9, 1.0), ("step", 4, 1.0), ("step", 5, 0.01)])
def test_hook_adds_s_sign_gamma_once(schedule: str, epoch: int, factor: float) -> None:
    state = _state(epoch)
    layers = sparsity_layers(state.model, 1)
    before = _grads(state.model)
    BNL1Hook(SparsityConfig(s=1e-2, schedule=schedule), layers).after_backward(state)
    for name, g in _grads(state.model).items():
        idx = int(name.split(".")[1])
        if name.endswith("bn.weight") and idx in layers:
            gamma = state.model.layers[idx].bn.weight.detach()
            assert torch.equal(g, before[name] + (1e-2 * factor) * torch.sign(gamma))
        else:
            assert torch.equal(g, before[name])
    assert state.model.layers[0].bn.weight.grad[1] == before["layers.0.bn.weight"][1]  # sign(0) = 0


def test_relax_gives_top_gammas_99_percent_less_penalty() -> None:
    state = _state(epoch=6)
    layers = sparsity_layers(state.model, 0)
    before = _grads(state.model)
    BNL1Hook(SparsityConfig(s=1e-2, schedule="relax"), layers).after_backward(state)
    flat = torch.cat([state.model.layers[i].bn.weight.detach().abs() for i in layers])
    thr = torch.quantile(flat, 0.85)
    relaxed = 0
    for i in layers:
        gamma = state.model.layers[i].bn.weight.detach()
        s = torch.full_like(gamma, 1e-2)
        s[gamma.abs() > thr] *= 1.0 - 0.99
        assert torch.equal(state.model.layers[i].bn.weight.grad, before[f"layers.{i}.bn.weight"] + s * torch.sign(gamma))
        relaxed += int((gamma.abs() > thr).sum())
    assert relaxed == int((flat > thr).sum()) and 0 < relaxed <= 0.15 * len(flat) + 1


def test_epoch_end_logs_stats_and_writes_histogram(tmp_path: Path) -> None:
    state = _state(epoch=3, out_dir=tmp_path)
    hook = BNL1Hook(SparsityConfig(), sparsity_layers(state.model, 0))
    metrics: dict = {}
    hook.on_epoch_end(state, metrics)
    assert (tmp_path / "gamma_epoch003.png").stat().st_size > 1000
    assert 0 <= metrics["gamma_below_1e-2"] <= 1 and metrics["gamma_p50"] > 0
    summary = hook.summary(state.model)
    assert 0 < summary["suggested_max_percent"] < 1 and summary["history"][0]["epoch"] == 3


def test_config_validation() -> None:
    with pytest.raises(PruneError, match="--prune 3"):
        SparsityConfig(mode=3)
    with pytest.raises(PruneError, match="--s-schedule"):
        SparsityConfig(schedule="cosine")
