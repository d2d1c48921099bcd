"""DistillHook on real models: teacher frozen (no grad), zero loss for a self-copy, pairing by stride."""
from __future__ import annotations

import copy

import pytest
import torch

from compress.darknet.cfg import read_cfg
from compress.distill import DistillConfig, DistillHook, pair_by_stride, pair_heads, stride_features
from compress.distill.config import parse_pairs
from compress.distill.features import validate_pairs
from compress.base.errors import DistillError
from compress.darknet.model import build_model
from tests.conftest import DEMO_CFG, randomize_bn


def narrow_cfg(path=DEMO_CFG, factor: float = 0.5):
    """demo.cfg with every conv (except the prediction convs) `factor` times as wide."""
    cfg = read_cfg(path)
    blocks = list(cfg.blocks)
    heads = {i - 1 for i, b in enumerate(blocks) if b.type == "yolo"}
    for i, b in enumerate(blocks):
        if b.type == "convolutional" and i not in heads:
            blocks[i] = b.replace(filters=max(1, int(b.get_int("filters") * factor)))
    return cfg.with_blocks(blocks)


def _targets(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    rows = []
    for b in range(n):
        for _ in range(3):
            wh = torch.rand(2, generator=g) * 0.3 + 0.1
            xy = torch.rand(2, generator=g) * (1 - wh) + wh / 2
            rows.append(torch.cat((torch.tensor([b, b % 3], dtype=torch.float32), xy, wh)))
    return torch.stack(rows)


def _pair(seed: int = 0):
    teacher = randomize_bn(build_model(read_cfg(DEMO_CFG)), seed)
    student = randomize_bn(build_model(narrow_cfg()), seed + 1)
    return student, teacher


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_gradient_flows_only_into_the_student(k):
    student, teacher = _pair()
    hook = DistillHook(teacher, DistillConfig(strategy=k, box_margin=1.0))
    hook.setup(student)
    x = torch.rand(2, 3, 96, 128)  # non-square input
    heads = student.train()(x)
    parts = hook.loss(x, _targets(2), heads, det=1.0)  # calibrated against a detection loss of 1 per image
    total = sum(v for name, v in parts.items() if name.startswith("kd_") and v.requires_grad)
    assert total > 0
    total.backward()
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0
    if k >= 4:  # the feature term alone reaches the paired student layers (fitnet: the heads' neck features)
        assert set(hook.pairs) == {(26, 26), (19, 19)}
        assert set(pair_by_stride(student, teacher, (96, 128))) == {(0, 0), (3, 3), (7, 7), (26, 26), (19, 19)}
        student.zero_grad()
        heads = student(x)
        hook.loss(x, _targets(2), heads, det=1.0)["kd_feat"].backward()
        assert student.layers[26].conv.weight.grad.abs().sum() > 0
    hook.teardown()


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_loss_is_zero_when_student_is_the_teacher(k):
    teacher = randomize_bn(build_model(read_cfg(DEMO_CFG)))
    student = copy.deepcopy(teacher).eval()
    hook = DistillHook(teacher, DistillConfig(strategy=k))
    hook.setup(student)
    x = torch.rand(2, 3, 128, 96)
    parts = hook.loss(x, _targets(2), student(x, raw=True))
    assert {"kd_soft"} <= set(parts) and all(float(v.detach()) == 0 for v in parts.values()), parts


def test_real_cfgs_pair_by_stride(assets):
    """yolov4-tiny teacher -> yolo-fastest-1.1 student: different architectures, same 80 classes."""
    student = build_model(read_cfg(assets / "weights" / "yolo-fastest-1.1.cfg"))
    teacher = build_model(read_cfg(assets / "weights" / "yolov4-tiny.cfg"))
    img = (160, 224)
    pairs = pair_by_stride(student, teacher, img)
    ss, ts = student.graph.shapes(*img), teacher.graph.shapes(*img)
    assert len(pairs) == 5  # strides 2, 4, 8, 16, 32
    assert [ss[s][1:] for s, _ in pairs] == [ts[t][1:] for _, t in pairs]
    assert [img[0] // ss[s][1] for s, _ in pairs] == [2, 4, 8, 16, 32]
    # the stride-16 and -32 features are what each head predicts from
    assert {119, 128} <= {s for s, _ in pairs} and {28, 35} <= {t for _, t in pairs}
    assert pair_heads(student, teacher, img) == [0, 1]
    assert stride_features(teacher, img)[(16.0, 16.0)] == 35
    hook = DistillHook(teacher, DistillConfig(strategy=5))
    hook.setup(student, img)
    x = torch.rand(1, 3, *img)
    parts = hook.loss(x, _targets(1), student.train()(x), det=1.0)
    assert all(torch.isfinite(v) for v in parts.values()) and parts["kd_feat"] > 0
    hook.teardown()


def test_class_mismatch_names_both_cfgs(assets):
    student = build_model(read_cfg(DEMO_CFG))
    teacher = build_model(read_cfg(assets / "weights" / "yolov4-tiny.cfg"))
    with pytest.raises(DistillError, match=r"demo\.cfg.*3 classes.*yolov4-tiny\.cfg.*80"):
        DistillHook(teacher, DistillConfig()).setup(student)


def test_explicit_pairs_are_validated():
    student, teacher = _pair()
    assert validate_pairs(student, teacher, parse_pairs("26:26, 19:19"), (128, 128)) == ((26, 26), (19, 19))
    with pytest.raises(DistillError, match="--pairs 26:19"):
        validate_pairs(student, teacher, parse_pairs("26:19"), (128, 128))
    with pytest.raises(DistillError, match="out of range"):
        validate_pairs(student, teacher, ((99, 1),), (128, 128))
    with pytest.raises(DistillError, match="--pairs"):
        parse_pairs("26-19")


@pytest.mark.parametrize("bad", [dict(strategy=0), dict(strategy=6), dict(temperature=0), dict(w_box=-1.0),
                                 dict(box_margin=float("nan")), dict(ratios=(0.5, -1, None)), dict(ratios=(1.0,)),
                                 dict(logits="softmax2"), dict(feature="l1"), dict(calib_batches=0)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(DistillError):
        DistillConfig(**bad)


def test_config_weights_reference_table_explicit_or_calibrated():
    assert DistillConfig.reference(3).fixed_weights == (1e-4, 1e-3, 0.0)
    assert DistillConfig(strategy=5, calibrate=False, w_feat=0.5).fixed_weights == (1e-3, 1e-3, 0.5)
    assert DistillConfig(strategy=5, w_feat=0.5).fixed_weights == (None, None, 0.5)  # others calibrated
    assert DistillConfig(strategy=1).fixed_weights == (None, 0.0, 0.0)  # unused terms weigh 0
