"""YOLO loss and target assignment on hand-made targets."""
from __future__ import annotations

import math

import pytest
import torch

from compress import CompressError, build_model, parse_cfg
from compress.detection.losses import LossConfig, YoloLoss, build_targets, decode_cell_boxes, init_head_biases
from conftest import DATA

IMG = (64, 64)


def tiny_model(classes: int = 3, extra: str = ""):
    text = (DATA / "tiny-shortcut.cfg").read_text()
    text = text.replace("classes=2", f"classes={classes}{extra}").replace("filters=21", f"filters={3 * (5 + classes)}")
    return build_model(parse_cfg(text, "tiny-3cls.cfg")).train()


def one_target(cx=0.40, cy=0.60, w=0.25, h=0.25, cls=1.0):
    return torch.tensor([[0.0, cls, cx, cy, w, h]])


def test_build_targets_cell_offset_and_anchor_rule():
    model = tiny_model()
    heads = model(torch.zeros(1, 3, *IMG))
    tg = build_targets(heads, one_target(), model, IMG)
    assert len(tg) == 2
    for layer, p, t in zip(model.heads, heads, tg):
        h, w = p.shape[2:4]
        stride = IMG[1] / w
        anchors = layer.anchors / stride
        gwh = torch.tensor([0.25 * w, 0.25 * h])
        ratio = torch.max(gwh / anchors, anchors / gwh).max(1).values
        assert sorted(t.a.tolist()) == torch.nonzero(ratio < 4).flatten().tolist()
        assert (t.gx == int(0.40 * w)).all() and (t.gy == int(0.60 * h)).all()
        expected = torch.tensor([0.40 * w - int(0.40 * w), 0.60 * h - int(0.60 * h), *gwh.tolist()])
        assert torch.allclose(t.tbox, expected.expand_as(t.tbox), atol=1e-6)
        assert torch.allclose(t.anchors, anchors[t.a])
        assert (t.tcls == 1).all() and (t.b == 0).all()


def test_far_off_target_matches_no_anchor():
    model = tiny_model()
    heads = model(torch.zeros(1, 3, *IMG))
    tg = build_targets(heads, one_target(w=0.999, h=0.01), model, IMG)  # aspect ratio 100: no anchor fits
    assert all(len(t.b) == 0 for t in tg)


def _perfect_heads(model, targets):
    """Raw maps whose decoded boxes equal the targets at the positive cells, confident everywhere."""
    heads = [torch.full_like(p, -20.0) for p in model(torch.zeros(1, 3, *IMG))]
    for p, t in zip(heads, build_targets(heads, targets, model, IMG)):
        xy = t.tbox[:, :2].clamp(1e-4, 1 - 1e-4)
        p[t.b, t.a, t.gy, t.gx, 0:2] = torch.log(xy / (1 - xy))
        p[t.b, t.a, t.gy, t.gx, 2:4] = torch.log(t.tbox[:, 2:4] / t.anchors)
        p[t.b, t.a, t.gy, t.gx, 4] = 20.0
        p[t.b, t.a, t.gy, t.gx, 5 + t.tcls] = 20.0
    return heads


def test_perfect_prediction_has_near_zero_loss_and_random_does_not():
    model = tiny_model()
    targets = torch.cat([one_target(), one_target(0.7, 0.2, 0.3, 0.2, 2.0)])
    loss_fn = YoloLoss(model)
    total, parts = loss_fn(_perfect_heads(model, targets), targets, IMG)
    assert parts["box"] < 1e-4 and parts["obj"] < 1e-4 and parts["cls"] < 1e-4
    rand_total, rand_parts = loss_fn([torch.randn_like(p) for p in model(torch.zeros(1, 3, *IMG))], targets, IMG)
    assert rand_total > 100 * total and all(rand_parts[k] > 1e-3 for k in ("box", "obj", "cls"))


def test_loss_is_finite_differentiable_and_scales_with_batch():
    model = tiny_model()
    init_head_biases(model)
    x = torch.rand(2, 3, *IMG)
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.3, 0.4], [1, 2, 0.2, 0.3, 0.1, 0.15]])
    total, parts = YoloLoss(model)(model(x), targets, IMG)
    assert torch.isfinite(total)
    assert math.isclose(total.item(), 2 * sum(v.item() for v in parts.values()), rel_tol=1e-5)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    empty, empty_parts = YoloLoss(model)(model(x), torch.zeros(0, 6), IMG)
    assert torch.isfinite(empty) and empty_parts["box"] == 0 and empty_parts["cls"] == 0 and empty_parts["obj"] > 0


def test_balance_follows_stride_not_head_index():
    model = tiny_model()  # first head (index 19) is the coarse one (stride 8), the second stride 4
    heads = model(torch.zeros(1, 3, *IMG))
    assert [IMG[0] / p.shape[2] for p in heads] == [8, 4]
    assert YoloLoss(model)._balance(heads, IMG) == [1.0, 4.0]
    assert YoloLoss(model, LossConfig(balance=(2.0, 0.5)))._balance(heads, IMG) == [0.5, 2.0]


def test_scale_x_y_changes_decoded_box_like_the_model():
    model = tiny_model(extra="\nscale_x_y=1.2")
    assert all(h.scale_x_y == 1.2 for h in model.heads)
    p = torch.zeros(1, 4)  # sigmoid(0) = 0.5 -> 0.5 * 1.2 - 0.1 = 0.5, exp(0) = 1
    p[0, 0] = 2.0
    box = decode_cell_boxes(p, torch.tensor([[3.0, 4.0]]), 1.2)
    assert torch.allclose(box, torch.tensor([[torch.sigmoid(torch.tensor(2.0)).item() * 1.2 - 0.1, 0.5, 3.0, 4.0]]))


def test_new_coords_heads_train_on_probabilities():
    """new_coords maps hold probabilities: the v5 loss decodes xy = p*s - (s-1)/2, wh = (2p)^2 * anchor, so the
    probabilities that encode the targets exactly give ~0 loss, and 0.5 everywhere does not."""
    model = tiny_model(extra="\nnew_coords=1\nscale_x_y=2.0")
    targets = torch.cat([one_target(), one_target(0.7, 0.2, 0.3, 0.2, 2.0)])
    heads = [torch.full_like(p, 1e-7) for p in model(torch.zeros(1, 3, *IMG))]
    for p, t in zip(heads, build_targets(heads, targets, model, IMG)):
        p[t.b, t.a, t.gy, t.gx, 0:2] = (t.tbox[:, :2] + 0.5) / 2.0
        p[t.b, t.a, t.gy, t.gx, 2:4] = torch.sqrt(t.tbox[:, 2:4] / t.anchors) / 2
        p[t.b, t.a, t.gy, t.gx, 4] = 1 - 1e-7
        p[t.b, t.a, t.gy, t.gx, 5 + t.tcls] = 1 - 1e-7
    _, parts = YoloLoss(model)(heads, targets, IMG)
    assert all(v < 1e-4 for v in parts.values()), parts
    _, half = YoloLoss(model)([torch.full_like(p, 0.5) for p in heads], targets, IMG)
    assert all(v > 1e-3 for v in half.values()), half


def test_loss_config_validation():
    with pytest.raises(CompressError, match="anchor_t"):
        LossConfig(anchor_t=1.0)
    with pytest.raises(CompressError, match="balance"):
        model = tiny_model()
        YoloLoss(model, LossConfig(balance=(1.0,)))(model(torch.zeros(1, 3, *IMG)), torch.zeros(0, 6), IMG)
