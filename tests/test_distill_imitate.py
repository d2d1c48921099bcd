"""Feature imitation through the least-squares 1x1 adapter (compress/distill/imitate.py), checked against numpy's
least squares."""
import numpy as np
import pytest
import torch

from compress.distill import DistillConfig, DistillHook
from compress.distill.imitate import LstsqAdapter, cells
from compress.distill.losses import KDInputs, STRATEGIES


def _numpy_unexplained(s: np.ndarray, t: np.ndarray) -> float:
    """1 - R^2 of the least-squares regression of t on [s, 1] (numpy's lstsq, no ridge)."""
    x = np.hstack([s, np.ones((s.shape[0], 1))])
    coef, *_ = np.linalg.lstsq(x, t, rcond=None)
    resid = t - x @ coef
    return float((resid ** 2).sum() / ((t - t.mean(0)) ** 2).sum())


def test_adapter_loss_is_numpy_least_squares_residual():
    g = torch.Generator().manual_seed(0)
    f_s, f_t = torch.randn(2, 5, 6, 6, generator=g), torch.randn(2, 7, 6, 6, generator=g)
    f_t = f_t + torch.einsum("nchw,cd->ndhw", f_s, torch.randn(5, 7, generator=g))  # partly predictable
    ad = LstsqAdapter(momentum=0.0, ridge=1e-9)
    got = float(ad.loss(f_s, f_t))
    want = _numpy_unexplained(cells(f_s).numpy().astype(np.float64), cells(f_t).numpy().astype(np.float64))
    assert 0.05 < want < 0.95
    assert got == pytest.approx(want, rel=1e-4)


def test_adapter_zero_for_linear_teacher_and_gradient_reaches_student_only():
    g = torch.Generator().manual_seed(1)
    f_s = torch.randn(3, 4, 5, 5, generator=g)
    w, b = torch.randn(4, 6, generator=g), torch.randn(6, generator=g)
    f_t = (torch.einsum("nchw,cd->ndhw", f_s, w) + b[None, :, None, None])
    assert float(LstsqAdapter(momentum=0.0, ridge=1e-10).loss(f_s, f_t)) < 1e-8
    s = (f_s + 0.3 * torch.randn(f_s.shape, generator=g)).requires_grad_(True)
    t = f_t.clone().requires_grad_(True)
    LstsqAdapter(momentum=0.0).loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_adapter_moving_moments_and_mask():
    g = torch.Generator().manual_seed(2)
    a = LstsqAdapter(momentum=0.75)
    x1, x2 = torch.randn(10, 3, generator=g), torch.randn(12, 3, generator=g)
    y1, y2 = torch.randn(10, 2, generator=g), torch.randn(12, 2, generator=g)
    a.update(x1, y1)
    a.update(x2, y2)
    d1, d2 = x1.double(), x2.double()
    assert torch.allclose(a.moments["ss"], 0.75 * d1.T @ d1 / 10 + 0.25 * d2.T @ d2 / 12)
    assert torch.allclose(a.moments["t"], 0.75 * y1.double().mean(0) + 0.25 * y2.double().mean(0))
    mask = torch.zeros(1, 4, 4)
    mask[0, 1, 2] = mask[0, 3, 0] = 1
    f = torch.arange(1 * 3 * 16, dtype=torch.float32).reshape(1, 3, 4, 4)
    assert torch.equal(cells(f, mask), torch.stack([f[0, :, 1, 2], f[0, :, 3, 0]]))
    empty = LstsqAdapter().loss(f.requires_grad_(True), f.detach() * 2, torch.zeros(1, 4, 4))
    assert float(empty.detach()) == 0.0 and empty.requires_grad


def test_fitnet_feature_mode_in_strategies_4_and_5_and_hook():
    from compress.darknet.cfg import parse_cfg
    from compress.darknet.model import build_model
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "recipes" / "demo.cfg").read_text()
    torch.manual_seed(0)
    teacher, student = build_model(parse_cfg(text)), build_model(parse_cfg(text))
    imgs = torch.rand(2, 3, 128, 128)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.3], [1, 0, 0.3, 0.6, 0.2, 0.4]])
    for k in (4, 5):
        hook = DistillHook(teacher, DistillConfig(strategy=k, feature="fitnet", ratios=(0.0, 0.0, 0.5),
                                                    weight_cap=1e12))  # the raw term is tiny here: no cap
        hook.setup(student.train(), (128, 128))
        parts = hook.loss(imgs, targets, student(imgs), det=2.0)
        assert len(hook.adapters) == len(hook.pairs) == 2
        assert float(parts["kd_feat"].detach()) == pytest.approx(1.0, rel=1e-5)  # calibrated: 0.5 x det 2.0
        hook.teardown()
    with pytest.raises(ValueError, match="LstsqAdapter"):
        f = torch.rand(1, 2, 4, 4)
        STRATEGIES[4](KDInputs([], [], None, [(f, f)], (8, 8), adapters=(LstsqAdapter(),) * 2),
                      DistillConfig(strategy=4, feature="fitnet"))


def test_adapter_moments_saved_and_restored_for_resume(tmp_path):
    from types import SimpleNamespace

    from compress.darknet.cfg import parse_cfg
    from compress.distill.hook import ADAPTER_FILE, STATE_FILE
    from compress.darknet.model import build_model
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "recipes" / "demo.cfg").read_text()
    torch.manual_seed(0)
    teacher, student = build_model(parse_cfg(text)), build_model(parse_cfg(text))
    config = DistillConfig(strategy=4, feature="fitnet")
    hook = DistillHook(teacher, config)
    hook.setup(student.train(), (64, 64))
    imgs = torch.rand(2, 3, 64, 64)
    hook.loss(imgs, torch.zeros(0, 6), student(imgs), det=1.0)
    hook._save_state(SimpleNamespace(out_dir=tmp_path, rank=0))
    assert (tmp_path / STATE_FILE).is_file() and (tmp_path / ADAPTER_FILE).is_file()
    again = DistillHook(teacher, config)
    again.setup(student, (64, 64))
    again._load_state(tmp_path / STATE_FILE)
    for a, b in zip(hook.adapters, again.adapters):
        assert a.moments.keys() == b.moments.keys()
        assert all(torch.equal(a.moments[k], b.moments[k]) for k in a.moments)
