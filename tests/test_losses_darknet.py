"""The Darknet [yolo] loss against a scalar transcription of AlexeyAB's forward_yolo_layer (yolo_layer.c):
the gradient of our loss with respect to the raw head maps must equal minus Darknet's deltas."""
from __future__ import annotations

import math

import pytest
import torch

from compress import CompressError, build_model, parse_cfg
from compress.detection.boxes import bbox_iou
from compress.detection.losses import LOSSES, build_loss
from compress.detection.losses_darknet import DarknetLoss, head_options
from conftest import DATA

IMG = (64, 64)
KEYS = "\nignore_thresh=0.3\niou_thresh=0.25\niou_normalizer=0.5\ncls_normalizer=0.8\nobj_normalizer=1.5\nscale_x_y=1.1"


def model_with(extra: str = KEYS, classes: int = 3):
    text = (DATA / "tiny-shortcut.cfg").read_text()
    text = text.replace("classes=2", f"classes={classes}{extra}").replace("filters=21", f"filters={3 * (5 + classes)}")
    return build_model(parse_cfg(text, "tiny-dn.cfg")).train()


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _iou(a, b) -> float:
    """Darknet's box_iou of centre-format boxes."""
    def overlap(x1, w1, x2, w2):
        return min(x1 + w1 / 2, x2 + w2 / 2) - max(x1 - w1 / 2, x2 - w2 / 2)
    w, h = overlap(a[0], a[2], b[0], b[2]), overlap(a[1], a[3], b[1], b[3])
    inter = 0.0 if w <= 0 or h <= 0 else w * h
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def darknet_deltas(model, heads, truths, net_w, net_h):
    """Scalar port of forward_yolo_layer for iou_loss=mse, one image: deltas per head, same layout."""
    deltas = []
    for p, o in zip(heads, head_options(model)):
        p = p.detach()[0].double()
        na, h, w, ch = p.shape
        nc, s = ch - 5, o.scale_x_y
        d = torch.zeros_like(p)

        def out(n, j, i, k):
            v = _sig(p[n, j, i, k].item())
            return v * s - (s - 1) / 2 if k < 2 else v

        def pred(n, j, i):
            aw, ah = o.anchors[o.mask[n]]
            return ((i + out(n, j, i, 0)) / w, (j + out(n, j, i, 1)) / h,
                    math.exp(p[n, j, i, 2]) * aw / net_w, math.exp(p[n, j, i, 3]) * ah / net_h)

        for n in range(na):
            for j in range(h):
                for i in range(w):
                    box = pred(n, j, i)
                    match = any(out(n, j, i, 5 + k) > 0.25 for k in range(nc))
                    best_match = max([_iou(box, t[1:]) for t in truths if match] + [0.0])
                    d[n, j, i, 4] = o.obj_normalizer * (0 - out(n, j, i, 4))
                    if best_match > o.ignore_thresh:
                        d[n, j, i, 4] = 0

        def positive(t, n_all, i, j):
            n = o.mask.index(n_all)
            aw, ah = o.anchors[n_all]
            scale = o.iou_normalizer * (2 - t[3] * t[4])
            tx, ty = t[1] * w - i, t[2] * h - j
            tw, th = math.log(t[3] * net_w / aw), math.log(t[4] * net_h / ah)
            for k, target in enumerate((tx, ty)):
                d[n, j, i, k] += scale * (target - out(n, j, i, k))
            for k, target in ((2, tw), (3, th)):
                d[n, j, i, k] += scale * (target - p[n, j, i, k].item())
            d[n, j, i, 4] = o.obj_normalizer * (1 - out(n, j, i, 4))
            for k in range(nc):
                d[n, j, i, 5 + k] = o.cls_normalizer * ((k == t[0]) - out(n, j, i, 5 + k))

        for t in truths:
            i, j = int(t[1] * w), int(t[2] * h)
            shift = (0, 0, t[3], t[4])
            ious = [_iou((0, 0, aw / net_w, ah / net_h), shift) for aw, ah in o.anchors]
            best_n = max(range(len(ious)), key=lambda k: (ious[k], -k))
            if best_n in o.mask:
                positive(t, best_n, i, j)
            for n_all in o.mask:
                if n_all != best_n and o.iou_thresh < 1 and ious[n_all] > o.iou_thresh:
                    positive(t, n_all, i, j)
        deltas.append(d)
    return deltas


def random_heads(model, seed=0):
    torch.manual_seed(seed)
    heads = [torch.randn_like(p) * 1.5 for p in model(torch.zeros(1, 3, *IMG))]
    return [h.requires_grad_(True) for h in heads]


TRUTHS = [(1, 0.30, 0.40, 0.20, 0.25), (0, 0.72, 0.61, 0.45, 0.30), (2, 0.12, 0.85, 0.08, 0.10)]


def test_mse_gradient_equals_darknet_deltas():
    model = model_with()
    heads = random_heads(model)
    # a prediction that overlaps truth 0 well, so the ignore rule is exercised
    heads[1].data[0, 1, int(0.40 * 16), int(0.30 * 16), :4] = torch.tensor([0.0, 0.0, 0.1, 0.2])
    heads[1].data[0, 1, int(0.40 * 16), int(0.30 * 16), 5:] = 3.0
    targets = torch.tensor([[0.0, *t] for t in TRUTHS])
    total, parts = DarknetLoss(model)(heads, targets, IMG)
    total.backward()
    for h, ref in zip(heads, darknet_deltas(model, heads, TRUTHS, *IMG)):
        assert torch.allclose(h.grad.double(), -ref, atol=1e-5), (h.grad.double() + ref).abs().max()
    assert math.isclose(total.item(), sum(v.item() for v in parts.values()), rel_tol=1e-6)


def test_iou_thresh_adds_anchors_and_ignore_drops_cells():
    model = model_with()
    targets = torch.tensor([[0.0, *TRUTHS[1]]])
    loss = DarknetLoss(model)
    heads = random_heads(model, seed=1)
    loss(heads, targets, IMG)[0].backward()
    positives = sum(int((h.grad[..., 0] != 0).sum()) for h in heads)
    model_single = model_with(KEYS.replace("iou_thresh=0.25", "iou_thresh=1.0"))
    heads1 = random_heads(model_single, seed=1)
    DarknetLoss(model_single)(heads1, targets, IMG)[0].backward()
    assert sum(int((h.grad[..., 0] != 0).sum()) for h in heads1) == 1 < positives


@pytest.mark.parametrize("kind", ["giou", "diou", "ciou"])
def test_iou_loss_gradient_follows_darknet_chain(kind):
    """d/dt_x = d(iou_normalizer * (1 - IoU))/d(box x in image units), d/dt_w = d/d(box w) * exp(t_w)."""
    model = model_with(KEYS.replace("iou_thresh=0.25", "iou_thresh=1.0") + f"\niou_loss={kind}")
    heads = random_heads(model, seed=2)
    truth = TRUTHS[0]
    DarknetLoss(model)(heads, torch.tensor([[0.0, *truth]]), IMG)[0].backward()
    (hi, head), = [(k, h) for k, h in enumerate(heads) if h.grad[..., :4].abs().sum() > 0]
    o = head_options(model)[hi]
    n, j, i = [int(v[0]) for v in (head.grad[0, ..., 0] != 0).nonzero(as_tuple=True)]
    h, w = head.shape[2:4]
    t = head.detach()[0, n, j, i]
    s = o.scale_x_y
    aw, ah = o.anchors[o.mask[n]]
    box = torch.tensor([(i + torch.sigmoid(t[0]).item() * s - (s - 1) / 2) / w,
                        (j + torch.sigmoid(t[1]).item() * s - (s - 1) / 2) / h,
                        math.exp(t[2]) * aw / IMG[1], math.exp(t[3]) * ah / IMG[0]], dtype=torch.float64)
    box.requires_grad_(True)
    (o.iou_normalizer * (1 - bbox_iou(box, torch.tensor(truth[1:], dtype=torch.float64), kind=kind))).backward()
    expected = box.grad * torch.tensor([1, 1, math.exp(t[2]), math.exp(t[3])], dtype=torch.float64)
    assert torch.allclose(head.grad[0, n, j, i, :4].double(), expected, atol=1e-5)


def test_new_coords_heads_train_with_both_losses():
    model = model_with("\nnew_coords=1\nscale_x_y=2.0")
    targets = torch.tensor([[0.0, *TRUTHS[0]], [0.0, *TRUTHS[1]]])
    for name in ("darknet", "v5"):
        heads = [torch.rand_like(p).clamp(0.05, 0.95).requires_grad_(True) for p in model(torch.zeros(1, 3, *IMG))]
        total, parts = build_loss(name, model)(heads, targets, IMG)
        total.backward()
        assert torch.isfinite(total) and all(v > 0 for v in parts.values()), (name, parts)
        assert all(torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0 for h in heads)


def test_new_coords_darknet_mse_targets():
    """At p_xy = tx (s=1) and p_wh = sqrt(w/anchor)/2 the box term of the positive cell vanishes."""
    model = model_with("\nnew_coords=1\niou_thresh=1.0")
    heads = [torch.full_like(p, 0.5).requires_grad_(True) for p in model(torch.zeros(1, 3, *IMG))]
    truth = (0, 0.3125 + 0.5 / 16, 0.25 + 0.25 / 16, 0.20, 0.25)  # centre at offset (0.5, 0.25) of cell (5, 4)
    targets = torch.tensor([[0.0, *truth]])
    loss = DarknetLoss(model)
    loss(heads, targets, IMG)[0].backward()
    (hi, head), = [(k, h) for k, h in enumerate(heads) if h.grad[..., 0].abs().sum() > 0]
    n = int((head.grad[0, ..., 0] != 0).nonzero()[0, 0])
    aw, ah = head_options(model)[hi].anchors[head_options(model)[hi].mask[n]]
    with torch.no_grad():
        head[0, n, 4, 5, :4] = torch.tensor([0.5, 0.25, math.sqrt(0.2 * 64 / aw) / 2, math.sqrt(0.25 * 64 / ah) / 2])
    head.grad = None
    loss(heads, targets, IMG)[0].backward()
    assert head.grad[0, n, 4, 5, :4].abs().max() < 1e-6


def test_registry_and_cfg_errors():
    assert {"darknet", "v5"} <= set(LOSSES)
    with pytest.raises(CompressError, match="loss 'focal'"):
        build_loss("focal", model_with())
    with pytest.raises(CompressError, match="iou_loss=smooth"):
        DarknetLoss(model_with(KEYS + "\niou_loss=smooth"))


def test_region_heads_are_refused_and_real_cfg_keys_are_read(assets):
    from compress import read_cfg

    with pytest.raises(CompressError, match=r"\[region\] heads"):
        DarknetLoss(build_model(read_cfg(assets / "cfg" / "yolov2-tiny.cfg")))
    opts = head_options(build_model(read_cfg(assets / "weights" / "yolov4-tiny.cfg")))
    assert [(o.iou_loss, o.iou_normalizer, o.scale_x_y, o.ignore_thresh, o.mask) for o in opts] == [
        ("ciou", 0.07, 1.05, 0.7, (3, 4, 5)), ("ciou", 0.07, 1.05, 0.7, (1, 2, 3))]
    assert len(opts[0].anchors) == 6
