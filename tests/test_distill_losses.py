"""Distillation losses: math invariants of the pure functions (no models, no training)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from compress.base.errors import DistillError
from compress.darknet.cfg import read_cfg
from compress.darknet.model import build_model
from compress.distill import DistillHook
from compress.distill.config import DEFAULT_WEIGHTS, DistillConfig
from compress.distill.features import pair_every_conv
from compress.distill.losses import (STRATEGIES, HeadPositives, KDInputs, attention_map, decode_positive_boxes,
                                     fine_grained_mask, kd_attention_loss, kd_box_mimic, kd_box_teacher_bounded,
                                     kd_logit_loss, soft_kl, sigmoid_kl, kd_sigmoid_loss, at_map, kd_at_loss)


def _heads(n=2, a=3, sizes=((4, 6), (8, 12)), c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, a, h, w, 5 + c, generator=g) for h, w in sizes]


def _positives(heads, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in heads:
        n, a, h, w, _ = p.shape
        idx = [torch.randint(0, m, (k,), generator=g) for m in (n, a, h, w)]
        tbox = torch.cat((torch.rand(k, 2, generator=g), torch.rand(k, 2, generator=g) * 3 + 0.2), 1)
        anchors = torch.rand(k, 2, generator=g) + 0.5
        out.append(HeadPositives(*idx, tbox, anchors, anchors.clone()))
    return out


def _features(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 8, 16, 24, generator=g), torch.randn(n, 16, 16, 24, generator=g)),
            (torch.randn(n, 4, 4, 6, generator=g), torch.randn(n, 6, 4, 6, generator=g))]


def test_soft_kl_matches_definition_and_is_zero_on_equal_logits():
    s, t = torch.randn(7, 4), torch.randn(7, 4)
    T = 3.0
    pt, ps = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    manual = (pt * (pt.log() - ps.log())).sum() * T * T / 2
    assert torch.allclose(soft_kl(s, t, T, batch=2), manual, atol=1e-6)
    assert soft_kl(s, t, T, 2) > 0
    assert soft_kl(t, t, T, 2) == 0


def test_kd1_ignores_box_logits_unless_reference():
    s, t = _heads(seed=1), _heads(seed=2)
    s2 = [p.clone() for p in s]
    for p in s2:
        p[..., :4] += torch.randn_like(p[..., :4]) * 5
    assert torch.equal(kd_logit_loss(s, t, 3.0), kd_logit_loss(s2, t, 3.0))
    assert not torch.allclose(kd_logit_loss(s, t, 3.0, reference=True), kd_logit_loss(s2, t, 3.0, reference=True))


def test_box_decode_matches_yolo_formula():
    p = _heads()[0]
    pos = _positives([p])[0]
    box = decode_positive_boxes(p, pos, pos.anchors_s, scale_x_y=1.1)
    q = p[pos.b, pos.a, pos.gy, pos.gx]
    assert torch.allclose(box[:, :2], torch.sigmoid(q[:, :2]) * 1.1 - 0.05)
    assert torch.allclose(box[:, 2:], torch.exp(q[:, 2:4]) * pos.anchors_s)


def test_teacher_bounded_regression():
    gt = torch.rand(6, 4)
    box_s = gt + torch.randn(6, 4)
    loss, frac = kd_box_teacher_bounded(box_s, gt.clone(), gt)  # perfect teacher: every student error counts
    assert torch.allclose(loss, ((box_s - gt) ** 2).sum()) and frac == 1
    loss, frac = kd_box_teacher_bounded(gt.clone(), box_s, gt)  # student beats the teacher: nothing to learn
    assert loss == 0 and frac == 0
    loss, frac = kd_box_teacher_bounded(box_s, box_s.clone(), gt)  # equal, margin 0: strict inequality -> 0
    assert loss == 0 and frac == 0
    loss, _ = kd_box_teacher_bounded(box_s, box_s.clone(), gt, margin=0.1)  # with a margin: the plain L2 to GT
    assert torch.allclose(loss, ((box_s - gt) ** 2).sum())


def test_box_mimic_zero_on_equal_and_grad_only_to_student():
    box_s = torch.randn(5, 4, requires_grad=True)
    box_t = torch.randn(5, 4, requires_grad=True)
    assert kd_box_mimic(box_s, box_s.detach().clone()) == 0
    kd_box_mimic(box_s, box_t).backward()
    assert box_t.grad is None and torch.allclose(box_s.grad, 2 * (box_s - box_t).detach())


def test_attention_is_channel_count_independent():
    f = torch.randn(2, 8, 5, 7)
    assert torch.allclose(attention_map(torch.cat((f, -f), 1)), attention_map(f))
    assert abs(kd_attention_loss(f, torch.cat((f, f, f), 1), 3.0)) < 1e-5  # mean over 3x channels: rounding only
    assert kd_attention_loss(f, torch.randn(2, 3, 5, 7), 3.0) > 0
    with pytest.raises(ValueError):
        kd_attention_loss(f, torch.randn(2, 8, 6, 7), 3.0)


def test_masked_attention_only_sees_masked_cells():
    f_s, f_t = torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6)
    mask = torch.zeros(1, 6, 6)
    mask[0, 1:3, 2:5] = 1
    f_t2 = f_t.clone()
    f_t2[..., 4:, :] = 100  # outside the mask: must not matter
    assert torch.allclose(kd_attention_loss(f_s, f_t, 3.0, mask), kd_attention_loss(f_s, f_t2, 3.0, mask))


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 7), w=st.integers(1, 7), rh=st.integers(1, 4), rw=st.integers(1, 4),
       finer=st.booleans(), data=st.data())
def test_fine_grained_mask_covers_exactly_the_overlapping_block(h, w, rh, rw, finer, data):
    # feature map finer (or coarser) than the head by an integer factor, aspect ratio free (non-square input)
    hf, wf = (h * rh, w * rw) if finer else (max(h // rh, 1), max(w // rw, 1))
    k = data.draw(st.integers(1, 4))
    gy = torch.tensor(data.draw(st.lists(st.integers(0, h - 1), min_size=k, max_size=k)))
    gx = torch.tensor(data.draw(st.lists(st.integers(0, w - 1), min_size=k, max_size=k)))
    z = torch.zeros(k, dtype=torch.long)
    pos = HeadPositives(z, z, gy, gx, torch.zeros(k, 4), torch.ones(k, 2), torch.ones(k, 2))
    mask = fine_grained_mask([pos], [(h, w)], (hf, wf), batch=1)
    expect = torch.zeros(hf, wf)
    for y in range(hf):  # feature cell overlaps a positive cell with positive area (normalised coordinates)
        for x in range(wf):
            for cy, cx in zip(gy.tolist(), gx.tolist()):
                if y * h < (cy + 1) * hf and (y + 1) * h > cy * hf and x * w < (cx + 1) * wf and (x + 1) * w > cx * wf:
                    expect[y, x] = 1
    assert torch.equal(mask[0], expect)


def test_fine_grained_mask_independent_of_head_order():
    heads = _heads(sizes=((4, 6), (8, 12)))
    pos = _positives(heads)
    sizes = [(4, 6), (8, 12)]
    a = fine_grained_mask(pos, sizes, (16, 24), batch=2)
    b = fine_grained_mask(pos[::-1], sizes[::-1], (16, 24), batch=2)
    assert torch.equal(a, b) and a.sum() > 0


def test_sigmoid_kl_is_the_bernoulli_kl_times_t_squared():
    from torch.distributions import Bernoulli, kl_divergence
    s, t, w = torch.randn(5, 7) * 4, torch.randn(5, 7) * 4, torch.rand(5, 1)
    T = 2.0
    ref = kl_divergence(Bernoulli(logits=t / T), Bernoulli(logits=s / T)) * w
    assert torch.allclose(sigmoid_kl(s, t, T, w), ref.sum() * T * T, rtol=1e-5)
    assert sigmoid_kl(t, t, T) == 0 and sigmoid_kl(s, t, T) > 0


def test_sigmoid_kd_weights_classes_by_teacher_objectness():
    s, t = _heads(seed=1), _heads(seed=2)
    for p in t:
        p[..., 4] = -30.0  # teacher sees no object anywhere: its class scores carry nothing
    obj_only = sum(sigmoid_kl(a[..., 4], b[..., 4], 1.0) for a, b in zip(s, t)) / 2
    assert torch.allclose(kd_sigmoid_loss(s, t, 1.0, confidence=True), obj_only, rtol=1e-6)
    assert kd_sigmoid_loss(s, t, 1.0, confidence=False) > obj_only * 1.5


def test_at_maps_are_unit_norm_scale_and_channel_count_free():
    fs, ft = _features()[0]
    a = at_map(fs)
    assert torch.allclose(a.norm(dim=1), torch.ones(2))
    assert torch.allclose(at_map(fs * 37.0), a, atol=1e-6)  # activation scale does not matter
    dup = torch.cat((fs, fs), 1)  # same map from twice the channels
    assert torch.allclose(kd_at_loss(dup, ft), kd_at_loss(fs, ft), atol=1e-6)
    manual = ((fs ** 2).mean(1).flatten(1) / (fs ** 2).mean(1).flatten(1).norm(dim=1, keepdim=True)
              - (ft ** 2).mean(1).flatten(1) / (ft ** 2).mean(1).flatten(1).norm(dim=1, keepdim=True))
    assert torch.allclose(kd_at_loss(fs, ft), manual.pow(2).sum() / 2, rtol=1e-5)


def test_normalised_attention_term_is_not_negligible_unlike_the_softmax_one():
    """Issue 10: channel-mean maps at T=3 through a softmax gave 1e-6..1e-5; unit-norm maps give O(0.1)."""
    g = torch.Generator().manual_seed(0)
    fs = torch.relu(torch.randn(2, 16, 16, 16, generator=g)) * 0.1
    ft = fs.clone()
    ft[:, :, 4:8, 4:8] *= 3  # the teacher attends to a region the student does not
    assert kd_attention_loss(fs, ft, 3.0) < 1e-3
    assert kd_at_loss(fs, ft) > 0.1


def test_registry_covers_strategies_1_to_5():
    assert sorted(STRATEGIES) == sorted(DEFAULT_WEIGHTS) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_every_strategy_is_zero_when_student_equals_teacher(k):
    heads = _heads()
    feats = [(f, f.clone()) for f, _ in _features()]
    x = KDInputs(heads, [p.clone() for p in heads], _positives(heads), feats, (32, 48))
    for config in (DistillConfig(strategy=k, feature="at"), DistillConfig.reference(k)):
        parts = STRATEGIES[k](x, config)
        assert parts and all(v == 0 for name, v in parts.items()), parts
    parts = STRATEGIES[k](x, DistillConfig(strategy=k))  # fitnet: the ridge of the adapter fit leaves ~1e-6
    assert all(v == 0 for name, v in parts.items() if name != "kd_feat") and parts.get("kd_feat", 0) < 1e-4, parts


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_every_strategy_is_positive_and_differentiable_for_different_models(k):
    s_heads = [p.requires_grad_() for p in _heads(seed=1)]
    t_heads = _heads(seed=2)
    feats = [(fs.requires_grad_(), ft) for fs, ft in _features()]
    x = KDInputs(s_heads, t_heads, _positives(s_heads), feats, (32, 48))
    parts = STRATEGIES[k](x, DistillConfig(strategy=k, box_margin=0.5))
    assert all(v > 0 for n, v in parts.items() if n != "kd_bounded_frac"), parts  # each term separately
    total = sum(v for n, v in parts.items() if n != "kd_bounded_frac")
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in s_heads)
    assert all(f.grad is not None for f, _ in feats) == (k >= 4)


def test_reference_attention_is_the_channel_sum_on_every_conv_block():
    """--reference: the reference's map sum_c |F| (reference-algorithms.md section 6, KDstr 4), not our mean, and its
    layer set: every conv block not feeding a [yolo], k-th with k-th."""

    f_s, f_t = torch.rand(2, 3, 4, 5), torch.rand(2, 6, 4, 5)
    att_s, att_t = f_s.abs().sum(1).flatten(1), f_t.abs().sum(1).flatten(1)
    T = 3.0
    pt, ps = torch.softmax(att_t / T, 1), torch.softmax(att_s / T, 1)
    want = (pt * (pt.log() - ps.log())).sum() * T * T / 2
    assert torch.allclose(kd_attention_loss(f_s, f_t, T, reduce="sum"), want, atol=1e-6)
    assert not math.isclose(float(kd_attention_loss(f_s, f_t, T)), float(want), rel_tol=1e-3)  # the mean differs
    config = DistillConfig.reference(4)
    assert (config.attention, config.feature_layers, config.feature) == ("sum", "every_conv", "softmax")
    cfg = read_cfg(Path(__file__).resolve().parents[1] / "recipes" / "demo.cfg")
    teacher, student = build_model(cfg), build_model(cfg)
    hook = DistillHook(teacher, config)
    hook.setup(student, (128, 128))
    g = student.graph
    heads_in = {g.inputs[h][0] for h in g.heads}
    convs = [i for i, s in enumerate(g.sections) if s.conv and i not in heads_in]
    assert hook.pairs == tuple(zip(convs, convs)) and len(convs) > 3
    hook.teardown()
    other = build_model(read_cfg(Path(__file__).resolve().parent / "data" / "tiny-shortcut.cfg"))
    with pytest.raises(DistillError, match="channel-pruned copy of the teacher"):
        pair_every_conv(other, teacher, (64, 64))
