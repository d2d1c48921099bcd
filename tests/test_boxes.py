"""Box geometry and NMS against brute-force references."""
from __future__ import annotations

import torch

from compress.detection.boxes import batched_nms, bbox_iou, box_iou, nms, non_max_suppression, xywh2xyxy, xyxy2xywh


def _random_boxes(n: int, seed: int, size: float = 100.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 3 + 1
    return torch.cat((xy, xy + wh), 1)


def _iou_ref(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _nms_ref(boxes, scores, thr) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    keep = []
    for i in order:
        if all(_iou_ref(boxes[i].tolist(), boxes[k].tolist()) <= thr for k in keep):
            keep.append(i)
    return keep


def test_format_round_trip():
    b = _random_boxes(20, 0)
    assert torch.allclose(xywh2xyxy(xyxy2xywh(b)), b, atol=1e-5)
    assert torch.allclose(xyxy2xywh(torch.tensor([[0.0, 0, 4, 2]])), torch.tensor([[2.0, 1, 4, 2]]))


def test_box_iou_matches_reference():
    a, b = _random_boxes(7, 1), _random_boxes(5, 2)
    m = box_iou(a, b)
    ref = torch.tensor([[_iou_ref(x.tolist(), y.tolist()) for y in b] for x in a])
    assert m.shape == (7, 5)
    assert torch.allclose(m, ref, atol=1e-5)
    assert torch.allclose(box_iou(a, a).diagonal(), torch.ones(7), atol=1e-5)


def test_bbox_iou_variants():
    a, b = xyxy2xywh(_random_boxes(30, 3)), xyxy2xywh(_random_boxes(30, 4))
    iou = bbox_iou(a, b, "iou")
    assert torch.allclose(iou, box_iou(xywh2xyxy(a), xywh2xyxy(b)).diagonal(), atol=1e-5)
    for kind in ("giou", "diou", "ciou"):
        v = bbox_iou(a, b, kind)
        assert (v <= iou + 1e-6).all() and (v >= -1 - 1e-6).all(), kind
        assert torch.allclose(bbox_iou(a, a, kind), torch.ones(30), atol=1e-4), kind
    # disjoint boxes: GIoU is negative, IoU zero
    far = torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[10.0, 0, 2, 2]])
    assert bbox_iou(*far, "iou").item() == 0 and bbox_iou(*far, "giou").item() < 0


def test_nms_matches_brute_force():
    for seed in range(5):
        boxes = _random_boxes(60, seed, size=60)
        scores = torch.rand(60, generator=torch.Generator().manual_seed(100 + seed))
        for thr in (0.3, 0.5, 0.7):
            assert nms(boxes, scores, thr).tolist() == _nms_ref(boxes, scores, thr)
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0


def test_batched_nms_keeps_classes_apart():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0.5, 0.5, 10, 10], [0.0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert batched_nms(boxes, scores, torch.tensor([0, 0, 1]), 0.5).tolist() == [0, 2]
    assert nms(boxes, scores, 0.5).tolist() == [0]


def test_non_max_suppression_conf_and_layout():
    # two boxes, 3 classes: conf = obj * cls; the duplicate of box 0 is suppressed
    pred = torch.zeros(1, 4, 8)
    pred[0, 0] = torch.tensor([50, 50, 20, 20, 0.9, 0.1, 0.8, 0.0])
    pred[0, 1] = torch.tensor([51, 50, 20, 20, 0.8, 0.1, 0.7, 0.0])
    pred[0, 2] = torch.tensor([10, 10, 4, 6, 0.5, 0.0, 0.0, 0.9])
    pred[0, 3] = torch.tensor([80, 80, 4, 4, 0.01, 1.0, 0.0, 0.0])  # below conf_thres
    (out,) = non_max_suppression(pred, conf_thres=0.25, iou_thres=0.5)
    assert out.shape == (2, 6)
    assert torch.allclose(out[0], torch.tensor([40, 40, 60, 60, 0.72, 1.0]), atol=1e-5)
    assert torch.allclose(out[1], torch.tensor([8, 7, 12, 13, 0.45, 2.0]), atol=1e-5)
    assert (out[:-1, 4] >= out[1:, 4]).all()


def test_non_max_suppression_max_det_and_empty():
    boxes = _random_boxes(50, 7, size=400)
    pred = torch.cat((xyxy2xywh(boxes), torch.ones(50, 1), torch.rand(50, 2)), 1)[None]
    out = non_max_suppression(torch.cat((pred, pred * 0)), 0.001, 0.5, max_det=5)
    assert out[0].shape[0] == 5 and out[1].shape == (0, 6)


def _batched_ref(boxes, scores, classes, thr) -> list[int]:
    """Straightforward greedy NMS per class, then all kept boxes by decreasing score."""
    keep = []
    for c in sorted(set(classes.tolist())):
        idx = [i for i in range(len(classes)) if int(classes[i]) == c]
        keep += [idx[k] for k in _nms_ref(boxes[idx], scores[idx], thr)]
    return sorted(keep, key=lambda i: -float(scores[i]))


def test_batched_nms_matches_per_class_brute_force():
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        boxes = _random_boxes(150, seed, size=50)
        scores, classes = torch.rand(150, generator=g), torch.randint(0, 4, (150,), generator=g)
        for thr in (0.3, 0.6):
            ref = _batched_ref(boxes, scores, classes, thr)
            assert batched_nms(boxes, scores, classes, thr).tolist() == ref
            assert nms(boxes, scores, thr, classes, budget=50).tolist() == ref  # pair chunks across class blocks
            assert batched_nms(boxes - 30, scores, classes * 997, thr).tolist() == ref  # big ids, negative x


def test_nms_suppression_chain_is_greedy():
    # each box overlaps only its neighbours: 0 removes 1, so 2 survives (1 never suppresses), 2 removes 3, ...
    boxes = torch.tensor([[i * 3.0, 0, i * 3.0 + 10, 10] for i in range(9)])
    scores = torch.linspace(1, 0.1, 9)
    assert nms(boxes, scores, 0.5).tolist() == _nms_ref(boxes, scores, 0.5) == [0, 2, 4, 6, 8]
    assert nms(boxes, scores, 0.5, budget=3).tolist() == [0, 2, 4, 6, 8]  # pairs found across row chunks


def test_non_max_suppression_exact_on_real_yolov4_tiny_outputs(assets):
    """conf 0.001 on real yolov4-tiny outputs: the vectorised NMS equals per-class greedy NMS box for box."""
    import numpy as np
    from PIL import Image

    from compress.darknet.persist import load
    model = load(assets / "weights/yolov4-tiny.cfg", assets / "weights/yolov4-tiny.weights")
    images = sorted((assets / "data/coco128/images/train2017").glob("*.jpg"))[:2]
    x = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((416, 416)))).permute(2, 0, 1)
                     for p in images]).float() / 255
    with torch.no_grad():
        pred = model(x)
    outs = non_max_suppression(pred, conf_thres=0.001, iou_thres=0.6, max_det=100000)
    total = 0
    for p, out in zip(pred, outs):
        scores = p[:, 5:] * p[:, 4:5]
        i, j = (scores > 0.001).nonzero(as_tuple=True)
        boxes, conf = xywh2xyxy(p[i, :4]), scores[i, j]
        ref = _batched_ref(boxes, conf, j, 0.6)
        assert out.shape == (len(ref), 6)
        assert torch.equal(out[:, :4], boxes[ref]) and torch.equal(out[:, 4], conf[ref])
        assert torch.equal(out[:, 5].long(), j[ref])
        total += len(i)
    assert total > 300  # enough candidates for the comparison to mean something
