"""Distillation on new_coords heads (scaled-YOLOv4 / YOLOv7): their maps already hold probabilities.

The logit terms must compare those probabilities (Bernoulli KL of p, not of sigmoid(p)), and KD 2/3 must decode
positive boxes with Darknet's new_coords formula (yolo_layer.c get_yolo_box: x = (i + p_x * s - (s - 1) / 2),
w = (2 p_w)^2 * anchor), written out independently here.
"""
from __future__ import annotations

import pytest
import torch

from compress.darknet.cfg import parse_cfg
from compress.darknet.model import build_model
from compress.distill import DistillConfig, DistillHook
from compress.distill.losses import STRATEGIES, HeadPositives, KDInputs, decode_positive_boxes

from conftest import randomize_bn

NET = "[net]\nwidth=64\nheight=64\nchannels=3\n"


def _conv(filters: int, size: int = 3, stride: int = 1, act: str = "mish", bn: int = 1) -> str:
    return (f"[convolutional]\nbatch_normalize={bn}\nfilters={filters}\nsize={size}\nstride={stride}\npad=1\n"
            f"activation={act}\n")


def _yolo(mask: str) -> str:
    return (f"[yolo]\nmask={mask}\nanchors=4,5, 8,10, 12,9, 16,20, 24,18, 32,30\nclasses=2\nnum=6\n"
            "scale_x_y=2.0\nnew_coords=1\n")


def new_coords_cfg(width: int = 16) -> str:
    """Two scaled-YOLOv4 style heads (strides 8 and 16): logistic head convs, [yolo] new_coords=1 scale_x_y=2."""
    return (NET + _conv(width, stride=2) + _conv(width, stride=2) + _conv(2 * width, stride=2)
            + _conv(21, 1, act="logistic", bn=0) + _yolo("0,1,2")
            + "[route]\nlayers=-3\n" + _conv(2 * width, stride=2) + _conv(21, 1, act="logistic", bn=0) + _yolo("3,4,5"))


def _models():
    torch.manual_seed(0)
    teacher = randomize_bn(build_model(parse_cfg(new_coords_cfg(16))), 0).eval()
    student = randomize_bn(build_model(parse_cfg(new_coords_cfg(8))), 1).train()
    return teacher, student


def _targets() -> torch.Tensor:
    return torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.3], [1, 0, 0.3, 0.6, 0.2, 0.4], [1, 1, 0.7, 0.3, 0.4, 0.2]])


def _probs(shape, seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 0.98 + 0.01


def _bernoulli_kl(pt: torch.Tensor, ps: torch.Tensor) -> torch.Tensor:
    return pt * (pt.log() - ps.log()) + (1 - pt) * ((1 - pt).log() - (1 - ps).log())


def test_logit_kd_compares_the_probabilities_of_new_coords_maps() -> None:
    shape = (2, 3, 4, 5, 7)
    s, t = _probs(shape, 1), _probs(shape, 2)
    x = KDInputs([s], [t], None, [], (32, 40), new_coords=((True, True),))
    got = STRATEGIES[1](x, DistillConfig(strategy=1))["kd_soft"]
    want = (_bernoulli_kl(t[..., 4], s[..., 4]).sum()
            + (_bernoulli_kl(t[..., 5:], s[..., 5:]) * t[..., 4:5]).sum()) / 2  # classes weighted by teacher obj
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    as_logits = STRATEGIES[1](KDInputs([s], [t], None, [], (32, 40)), DistillConfig(strategy=1))["kd_soft"]
    assert float(as_logits) < 0.2 * float(want)  # read as logits, sigmoid squeezes them into [0.5, 0.73]


def test_mixed_heads_each_read_with_their_own_kind() -> None:
    """A classic-head student against a new_coords teacher: the student's logits, the teacher's probabilities."""
    shape = (1, 3, 2, 2, 7)
    t = _probs(shape, 3)
    s = torch.logit(t)  # the same probabilities, as logits
    x = KDInputs([s], [t], None, [], (16, 16), new_coords=((False, True),))
    assert float(STRATEGIES[1](x, DistillConfig(strategy=1))["kd_soft"]) < 1e-6


def _darknet_new_coords_box(p: torch.Tensor, anchors: torch.Tensor, s: float) -> torch.Tensor:
    """yolo_layer.c get_yolo_box with new_coords, in grid units relative to the cell."""
    x = p[:, 0] * s - 0.5 * (s - 1)
    y = p[:, 1] * s - 0.5 * (s - 1)
    w = p[:, 2] * p[:, 2] * 4 * anchors[:, 0]
    h = p[:, 3] * p[:, 3] * 4 * anchors[:, 1]
    return torch.stack((x, y, w, h), 1)


def test_positive_boxes_decode_with_darknet_new_coords_formula() -> None:
    p = _probs((2, 3, 4, 5, 7), 4)
    g = torch.Generator().manual_seed(5)
    idx = [torch.randint(0, m, (6,), generator=g) for m in (2, 3, 4, 5)]
    anchors = torch.rand(6, 2, generator=g) + 0.5
    pos = HeadPositives(*idx, torch.rand(6, 4, generator=g), anchors, anchors)
    got = decode_positive_boxes(p, pos, anchors, 2.0, new_coords=True)
    want = _darknet_new_coords_box(p[pos.b, pos.a, pos.gy, pos.gx], anchors, 2.0)
    torch.testing.assert_close(got, want)
    # KD 3 on new_coords maps = sum of squared differences of those boxes, per image
    q = p.clone()
    q[..., :4] = _probs(q[..., :4].shape, 6)
    x = KDInputs([q], [p], [pos], [], (32, 40), scales=((2.0, 2.0),), new_coords=((True, True),))
    box = STRATEGIES[3](x, DistillConfig(strategy=3))["kd_box"]
    ref = _darknet_new_coords_box(q[pos.b, pos.a, pos.gy, pos.gx], anchors, 2.0) - want
    torch.testing.assert_close(box, ref.pow(2).sum() / 2)


def test_positive_boxes_match_the_models_own_decoded_output() -> None:
    """The KD decode at a cell + the cell offset, times the stride, is the eval-mode model's box there."""
    teacher, _ = _models()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        raw = teacher(x, raw=True)
        decoded = teacher.eval()(x)
    p, head = raw[0], teacher.heads[0]
    _, a, h, w, _ = p.shape
    cells = torch.tensor([[0, 0, 0, 0], [0, 1, 3, 5], [0, 2, 7, 7]])
    pos = HeadPositives(cells[:, 0], cells[:, 1], cells[:, 2], cells[:, 3], torch.zeros(3, 4),
                        head.anchors[cells[:, 1]] / 8, head.anchors[cells[:, 1]] / 8)
    box = decode_positive_boxes(p, pos, pos.anchors_s, head.scale_x_y, head.new_coords)
    flat = decoded[0, :a * h * w].view(a, h, w, -1)[cells[:, 1], cells[:, 2], cells[:, 3], :4]
    torch.testing.assert_close((box[:, :2] + cells[:, [3, 2]]) * 8, flat[:, :2], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(box[:, 2:] * 8, flat[:, 2:], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_hook_on_new_coords_models(k: int) -> None:
    """Every strategy runs on new_coords heads, is zero when the student is the teacher, and sends finite
    gradients into the student only."""
    teacher, student = _models()
    imgs = torch.rand(2, 3, 64, 64)
    same = DistillHook(teacher, DistillConfig(strategy=k, calibrate=False))
    same.setup(teacher, (64, 64))
    assert same._new_coords() == ((True, True), (True, True))
    with torch.no_grad():
        parts = same.loss(imgs, _targets(), teacher(imgs, raw=True))  # eval mode, as the hook runs the teacher
    same.teardown()
    for name in ("kd_soft", "kd_box"):
        assert float(parts.get(name, torch.zeros(()))) < 1e-6, name
    hook = DistillHook(teacher, DistillConfig(strategy=k))
    hook.setup(student, (64, 64))
    parts = hook.loss(imgs, _targets(), student(imgs), det=1.0)
    total = sum(v for n, v in parts.items() if n.startswith("kd_") and n != "kd_bounded_frac")
    total.backward()
    grads = [q.grad for q in student.parameters() if q.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(q.grad is None for q in teacher.parameters())
    hook.teardown()
