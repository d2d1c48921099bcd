"""KD weights calibrated against the detection loss: each term starts at its intended ratio, exactly."""
from __future__ import annotations

import pytest
import torch

from compress.darknet.cfg import read_cfg
from compress.distill import Calibrator, DistillConfig, DistillHook
from compress.distill.config import DEFAULT_RATIOS, DEFAULT_WEIGHTS, TERMS
from compress.darknet.model import build_model
from tests.conftest import DEMO_CFG, randomize_bn
from tests.test_distill_hook import _targets, narrow_cfg

USED = {1: ("kd_soft",), 2: ("kd_soft", "kd_box"), 3: ("kd_soft", "kd_box"), 4: TERMS, 5: TERMS}


def _hook(k: int, **kw) -> tuple[DistillHook, torch.nn.Module]:
    teacher = randomize_bn(build_model(read_cfg(DEMO_CFG)), 0)
    student = randomize_bn(build_model(narrow_cfg()), 1)
    hook = DistillHook(teacher, DistillConfig(strategy=k, **kw))
    hook.setup(student)
    return hook, student.train()


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_first_batch_puts_each_term_at_its_ratio_of_the_detection_loss(k):
    hook, student = _hook(k, ratios=(0.3, 0.2, 0.1), weight_cap=1e12)  # random nets: tiny raw terms, no cap
    x = torch.rand(2, 3, 128, 128)
    det = 0.2718  # any detection-loss scale: the ratios must not depend on it
    parts = hook.loss(x, _targets(2), student(x), det=det)
    want = dict(zip(TERMS, (0.3, 0.2, 0.1)))
    for name in TERMS:
        got = float(parts.get(name, torch.zeros(())).detach()) / det
        assert got == pytest.approx(want[name] if name in USED[k] else 0.0, rel=1e-5, abs=1e-12), name


def test_weights_are_the_ratio_of_means_over_the_calibration_batches_then_frozen():
    cal = Calibrator(DistillConfig(strategy=4, calib_batches=3))
    batches = [(0.5, {"kd_soft": 10.0, "kd_box": 2.0, "kd_feat": 0.1}),
               (0.3, {"kd_soft": 14.0, "kd_box": 1.0, "kd_feat": 0.3}),
               (0.4, {"kd_soft": 6.0, "kd_box": 3.0, "kd_feat": 0.2})]
    for det, raw in batches:
        cal.observe(det, raw)
    det_mean = (0.5 + 0.3 + 0.4) / 3
    for i, name in enumerate(TERMS):
        raw_mean = sum(b[1][name] for b in batches) / 3
        assert cal.weights()[name] == pytest.approx(DEFAULT_RATIOS[i] * det_mean / raw_mean, rel=1e-12)
    frozen = cal.weights()
    cal.observe(100.0, {"kd_soft": 1e-3, "kd_box": 1e-3, "kd_feat": 1e-3})  # after calibration: ignored
    assert cal.weights() == frozen and not cal.needed


def test_explicit_and_reference_weights_are_not_calibrated():
    hook, student = _hook(3, w_box=0.07)
    x = torch.rand(2, 3, 128, 128)
    hook.loss(x, _targets(2), student(x), det=0.5)
    assert hook.weights["kd_box"] == 0.07 and hook.weights["kd_feat"] == 0.0
    ref = Calibrator(DistillConfig.reference(5))
    assert not ref.needed and tuple(ref.weights().values()) == DEFAULT_WEIGHTS[5]


def test_a_term_that_starts_at_zero_keeps_the_reference_weight():
    cal = Calibrator(DistillConfig(strategy=3, calib_batches=1))
    cal.observe(0.4, {"kd_soft": 0.0, "kd_box": 2.0})  # student == teacher: nothing to calibrate against
    assert cal.weights()["kd_soft"] == DEFAULT_WEIGHTS[3][0]
    assert cal.weights()["kd_box"] == pytest.approx(DEFAULT_RATIOS[1] * 0.4 / 2.0)


def test_a_student_close_to_its_teacher_gets_a_capped_weight():
    """raw term 1e-6 of the detection loss: uncapped the weight would be ratio x 1e6; it is ratio x weight_cap."""
    cal = Calibrator(DistillConfig(strategy=1, calib_batches=1, weight_cap=50.0))
    cal.observe(1.0, {"kd_soft": 1e-6})
    assert cal.weights()["kd_soft"] == pytest.approx(DEFAULT_RATIOS[0] * 50.0)
    free = Calibrator(DistillConfig(strategy=1, calib_batches=1, weight_cap=50.0))
    free.observe(1.0, {"kd_soft": 0.5})  # an ordinary start: the cap does not bind
    assert free.weights()["kd_soft"] == pytest.approx(DEFAULT_RATIOS[0] / 0.5)


def test_a_term_whose_share_drifts_up_is_recalibrated_on_the_window():
    cal = Calibrator(DistillConfig(strategy=3, calib_batches=2, ratios=(0.5, 0.1, None), drift=2.0))
    for _ in range(2):
        cal.observe(1.0, {"kd_soft": 0.5, "kd_box": 1.0})  # weights 1.0 and 0.1
    assert cal.weights() == pytest.approx({"kd_soft": 1.0, "kd_box": 0.1, "kd_feat": 0.0})
    cal.observe(0.5, {"kd_soft": 1.0, "kd_box": 0.5})      # soft now 1.0 x 1.0 / 0.5 = 2.0 x det (4x its ratio),
    assert cal.weights()["kd_soft"] == 1.0                  # but the window is not full yet
    cal.observe(0.5, {"kd_soft": 1.0, "kd_box": 0.5})      # window: soft share 2.0 = 4x its ratio -> recalibrated
    w = cal.weights()
    assert w["kd_soft"] == pytest.approx(0.5 * 0.5 / 1.0)
    assert w["kd_box"] == 0.1                               # box share 0.1 = its ratio: kept
    assert [r["term"] for r in cal.recalibrations] == ["kd_soft"]
    for _ in range(2):                                      # a falling share is the intended decay: kept
        cal.observe(1.0, {"kd_soft": 0.01, "kd_box": 0.01})
    assert cal.weights()["kd_soft"] == pytest.approx(0.25) and len(cal.recalibrations) == 1
    again = Calibrator(cal.config)
    again.load_state_dict(cal.state_dict())
    assert again.weights() == cal.weights() and again.recalibrations == cal.recalibrations


def test_drift_none_keeps_the_calibrated_weights():
    cal = Calibrator(DistillConfig(strategy=1, calib_batches=1, drift=None))
    cal.observe(1.0, {"kd_soft": 1.0})
    assert not cal.watching
    cal.observe(1.0, {"kd_soft": 100.0})
    assert cal.weights()["kd_soft"] == pytest.approx(DEFAULT_RATIOS[0])


@pytest.mark.parametrize("bad", [{"weight_cap": 0.0}, {"weight_cap": float("inf")}, {"drift": 1.0},
                                 {"drift": float("nan")}])
def test_cap_and_drift_are_validated(bad):
    from compress.base.errors import DistillError
    with pytest.raises(DistillError, match=next(iter(bad))):
        DistillConfig(**bad)
