"""BNL1Hook: exact arithmetic of the subgradient and proximal updates (fake TrainState, real optimizers),
convergence to the closed-form L1 solution under Adam, the target controller, statistics on the EMA copy,
resumable state, and a tiny end-to-end `sparse-train` resume that must equal the uninterrupted run."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from compress.darknet.cfg import read_cfg
from compress.base.errors import PruneError
from compress.darknet.model import build_model
from compress.prune.sparsity import STATE_FILE, BNL1Hook, SparsityConfig, sparsity_layers

from conftest import DATA, randomize_bn


def _model():
    model = randomize_bn(build_model(read_cfg(DATA / "tiny-shortcut.cfg")))
    with torch.no_grad():
        model.layers[0].bn.weight[:3] = torch.tensor([-0.7, 0.0, 0.2])  # negative and zero gammas
    return model


def _state(epoch: int = 0, epochs: int = 10, out_dir=None, optimizer: str = "sgd", lr: float = 0.1, model=None):
    model = model or _model()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9) if optimizer == "sgd" else \
        torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    return SimpleNamespace(model=model, optimizer=opt, epoch=epoch, epochs=epochs, out_dir=out_dir, rank=0, step=0,
                           ema=None, config=None)


def _grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def _hook(config: SparsityConfig, state, mode: int = 1) -> BNL1Hook:
    hook = BNL1Hook(config, sparsity_layers(state.model, mode))
    hook.on_fit_start(state)
    return hook


def test_mode_sets_match_reference_rules() -> None:
    model = build_model(read_cfg(DATA / "tiny-shortcut.cfg"))
    assert sparsity_layers(model, 0) == [0, 2, 5, 9, 14, 17, 24]            # residual stream excluded
    assert sparsity_layers(model, 1) == [0, 1, 2, 3, 5, 6, 9, 13, 14, 15, 17, 24]
    assert sparsity_layers(model, 2) == [3, 6, 15]                          # conv before each shortcut


def test_auto_picks_proximal_for_adaptive_optimizers() -> None:
    assert _hook(SparsityConfig(), _state(optimizer="sgd")).update == "subgradient"
    assert _hook(SparsityConfig(), _state(optimizer="adam")).update == "proximal"
    assert _hook(SparsityConfig(update="subgradient"), _state(optimizer="adam")).update == "subgradient"


@pytest.mark.parametrize("schedule, epoch, factor", [("constant", 9, 1.0), ("step", 4, 1.0), ("step", 5, 0.01)])
def test_subgradient_adds_s_sign_gamma_once(schedule: str, epoch: int, factor: float) -> None:
    state = _state(epoch)
    hook = _hook(SparsityConfig(s=1e-2, schedule=schedule), state)
    before = _grads(state.model)
    hook.after_backward(state)
    hook.after_step(state)  # the subgradient acts before the step only
    for name, g in _grads(state.model).items():
        idx = int(name.split(".")[1])
        if name.endswith("bn.weight") and idx in hook.layers:
            gamma = state.model.layers[idx].bn.weight.detach()
            assert torch.equal(g, before[name] + (1e-2 * factor) * torch.sign(gamma))
        else:
            assert torch.equal(g, before[name])
    assert state.model.layers[0].bn.weight.grad[1] == before["layers.0.bn.weight"][1]  # sign(0) = 0


def test_relax_gives_top_gammas_99_percent_less_penalty() -> None:
    state = _state(epoch=6)
    hook = _hook(SparsityConfig(s=1e-2, schedule="relax"), state, mode=0)
    before = _grads(state.model)
    hook.after_backward(state)
    flat = torch.cat([state.model.layers[i].bn.weight.detach().abs() for i in hook.layers])
    thr = torch.quantile(flat, 0.85)
    relaxed = 0
    for i in hook.layers:
        gamma = state.model.layers[i].bn.weight.detach()
        s = torch.full_like(gamma, 1e-2)
        s[gamma.abs() > thr] *= 1.0 - 0.99
        expected = before[f"layers.{i}.bn.weight"] + s * torch.sign(gamma)
        assert torch.equal(state.model.layers[i].bn.weight.grad, expected)
        relaxed += int((gamma.abs() > thr).sum())
    assert relaxed == int((flat > thr).sum()) and 0 < relaxed <= 0.15 * len(flat) + 1


def test_proximal_adam_is_soft_threshold_in_adams_metric() -> None:
    """Step 1 of Adam by hand: m_hat = g, v_hat = g^2, so p1 = p0 - lr g / (|g| + eps); then the prox with
    t = lr s / (|g| + eps). Gradients are left untouched."""
    lr, s, eps = 0.05, 0.3, 1e-8
    state = _state(optimizer="adam", lr=lr)
    hook = _hook(SparsityConfig(s=s), state)
    p0 = {i: state.model.layers[i].bn.weight.detach().clone() for i in hook.layers}
    g = {i: state.model.layers[i].bn.weight.grad.clone() for i in hook.layers}
    hook.after_backward(state)
    state.optimizer.step()
    hook.after_step(state)
    zeros = 0
    for i in hook.layers:
        p1 = p0[i] - lr * g[i] / (g[i].abs() + eps)
        t = lr * s / (g[i].abs() + eps)
        expected = torch.sign(p1) * (p1.abs() - t).clamp(min=0)
        assert torch.allclose(state.model.layers[i].bn.weight.detach(), expected, atol=1e-6)
        assert torch.equal(state.model.layers[i].bn.weight.grad, g[i])
        zeros += int((expected == 0).sum())
    assert zeros > 0


def test_proximal_sgd_thresholds_by_lr_times_s() -> None:
    lr, s = 0.1, 0.5
    state = _state(optimizer="sgd", lr=lr)
    state.optimizer = torch.optim.SGD(state.model.parameters(), lr=lr)  # no momentum: p1 = p0 - lr g
    hook = _hook(SparsityConfig(s=s, update="proximal"), state)
    p1 = {i: state.model.layers[i].bn.weight.detach() - lr * state.model.layers[i].bn.weight.grad for i in hook.layers}
    state.optimizer.step()
    hook.after_step(state)
    for i in hook.layers:
        expected = torch.sign(p1[i]) * (p1[i].abs() - lr * s).clamp(min=0)
        assert torch.allclose(state.model.layers[i].bn.weight.detach(), expected, atol=1e-7)


def test_proximal_adam_reaches_the_closed_form_l1_solution() -> None:
    """min_g 0.5 a (g - c)^2 + s |g| has the solution soft_threshold(c, s / a): under Adam the proximal update
    lands on it, exact zeros included (the subgradient through Adam only hovers around zero)."""
    state = _state(optimizer="adam", lr=1e-3)
    hook = BNL1Hook(SparsityConfig(s=0.1), [1, 3])
    hook.on_fit_start(state)
    for p in state.model.parameters():
        p.grad = None  # Adam skips them: only the two gamma vectors move
    gammas = [state.model.layers[i].bn.weight for i in hook.layers]
    gen = torch.Generator().manual_seed(1)
    targets = [torch.randn(len(p), generator=gen) * 0.3 for p in gammas]
    with torch.no_grad():
        for p, c in zip(gammas, targets):
            p.copy_(c + 0.05 * torch.randn(len(p), generator=gen))
    a = 1.0
    for _ in range(2000):
        for p, c in zip(gammas, targets):
            p.grad = a * (p.detach() - c)
        state.optimizer.step()
        hook.after_step(state)
    for p, c in zip(gammas, targets):
        solution = torch.sign(c) * (c.abs() - 0.1 / a).clamp(min=0)
        assert torch.allclose(p.detach(), solution, atol=1e-3)
        assert torch.equal(p.detach()[solution == 0], torch.zeros(int((solution == 0).sum())))


def test_target_controller_grows_then_shrinks_s() -> None:
    state = _state(optimizer="adam", lr=1e-9)  # the prox itself moves nothing measurable
    hook = BNL1Hook(SparsityConfig(s=1e-3, target=0.5, growth=4.0), sparsity_layers(state.model, 1),
                    steps_per_epoch=8)
    hook.on_fit_start(state)
    for _ in range(4):
        hook.after_step(state)
    assert math.isclose(hook.s, 1e-3 * 4.0 ** (4 / 8))              # all gammas > 1e-2: grow
    with torch.no_grad():
        for i in hook.layers:
            state.model.layers[i].bn.weight.zero_()                    # share 1.0 > 0.5 + band: shrink
    hook.after_step(state)
    assert math.isclose(hook.s, 1e-3 * 4.0 ** (3 / 8))


def test_epoch_end_measures_the_ema_copy_and_writes_histogram_and_state(tmp_path: Path) -> None:
    state = _state(epoch=3, out_dir=tmp_path)
    ema = _model()
    with torch.no_grad():
        ema.layers[0].bn.weight.fill_(1e-4)                            # only the EMA copy is sparse there
    state.ema = SimpleNamespace(module=ema)
    hook = BNL1Hook(SparsityConfig(target=0.01), sparsity_layers(state.model, 0))
    metrics: dict = {}
    hook.on_epoch_end(state, metrics)
    def share_of(model) -> float:
        return float((torch.cat([model.layers[i].bn.weight.abs() for i in hook.layers]) < 1e-2).float().mean())
    share = share_of(ema)
    assert metrics["gamma_below_1e-2"] == pytest.approx(share) and share > 0.05 and share_of(state.model) < 0.01
    assert (tmp_path / "gamma_epoch003.png").stat().st_size > 1000
    assert hook.reached["target"] == 3 and (tmp_path / STATE_FILE).is_file()
    summary = hook.summary(ema)
    assert summary["safe_percent"] == 0.0 and summary["limiting_layer"] == 0  # layer 0 is all ~0
    assert summary["history"][0]["epoch"] == 3
    assert summary["target_reached_epoch"] == 3 and summary["gamma"]["share_below_1e-2"] == pytest.approx(share)


def test_state_file_restores_the_controller_on_resume(tmp_path: Path) -> None:
    state = _state(out_dir=tmp_path)
    hook = BNL1Hook(SparsityConfig(target=0.5), sparsity_layers(state.model, 1))
    hook.scale, state.step = 7.5, 12
    hook.on_epoch_end(state, {})
    state.step = 20
    hook.scale = 9.0
    hook.on_epoch_end(state, {})
    again = BNL1Hook(SparsityConfig(target=0.5), hook.layers)
    state.config, state.step = SimpleNamespace(resume=True), 12
    again.on_fit_start(state)
    assert again.scale == 7.5 and len(again.history) == 1


def test_config_validation() -> None:
    with pytest.raises(PruneError, match="--prune 3"):
        SparsityConfig(mode=3)
    with pytest.raises(PruneError, match="--s-schedule"):
        SparsityConfig(schedule="cosine")
    with pytest.raises(PruneError, match="--l1-update"):
        SparsityConfig(update="adam")
    with pytest.raises(PruneError, match="--target-sparsity"):
        SparsityConfig(target=1.0)
    with pytest.raises(PruneError, match="--target-sparsity needs --s > 0"):
        SparsityConfig(s=0, target=0.5)
