"""The Darknet [yolo] loss against Darknet itself: minus the gradient of `--loss darknet` with respect to the head
maps must equal `l.delta` of Darknet's `forward_yolo_layer`, computed by a harness built from Darknet's C source
(tests/darknet_oracle.py, tests/darknet_harness/harness.c). Compared per component (x, y, w, h, objectness,
classes) within 1e-4 of the head's largest delta, on the official cfgs and on variants setting each key."""
from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from compress import CompressError, build_model, parse_cfg, read_cfg
from compress.base.errors import CfgError
from compress.darknet.graph import build_graph
from compress.darknet.weights import read_weights
from compress.detection.losses import LOSSES, build_loss
from compress.detection.losses_darknet import DarknetLoss, head_options
from conftest import DATA, require_assets
from darknet_oracle import darknet_delta

HW = (128, 160)  # yolov3-tiny heads 4x5 and 8x10
COMPONENTS = {"x": slice(0, 1), "y": slice(1, 2), "w": slice(2, 3), "h": slice(3, 4), "obj": slice(4, 5),
              "cls": slice(5, None)}
# image, class, x, y, w, h. Truths 2 and 3 share a cell and an anchor with different classes; 5 and 6 share one
# with the same class; 0, 2 and 5 get predictions planted on them (ignore_thresh / truth_thresh fire there).
TRUTHS = torch.tensor([[0, 1, 0.30, 0.40, 0.20, 0.25], [0, 5, 0.72, 0.61, 0.45, 0.30],
                       [0, 2, 0.52, 0.23, 0.06, 0.08], [0, 7, 0.53, 0.24, 0.06, 0.08],
                       [1, 0, 0.12, 0.85, 0.08, 0.10], [1, 3, 0.62, 0.35, 0.70, 0.55],
                       [1, 3, 0.63, 0.36, 0.66, 0.50]])
PLANTED = (0, 2, 5)
COUNTS = ",".join(str(c) for c in np.random.default_rng(0).integers(1, 400, 80))

# one [yolo] key (or a combination Darknet cfgs use) per case, added to every head of the official yolov3-tiny cfg
VARIANTS = {
    "mse": "", "iou": "iou_loss=iou", "giou": "iou_loss=giou", "diou": "iou_loss=diou", "ciou": "iou_loss=ciou",
    "iou_normalizer": "iou_loss=ciou\niou_normalizer=0.3", "obj_normalizer": "obj_normalizer=1.7",
    "cls_normalizer_alone": "cls_normalizer=0.5",
    "counters_per_class": f"cls_normalizer=0.5\ncounters_per_class={COUNTS}",
    "counters_max_delta_ciou": f"iou_loss=ciou\nmax_delta=3\ncounters_per_class={COUNTS}",
    "label_smooth_eps": "label_smooth_eps=0.1", "scale_x_y": "scale_x_y=1.2",
    "scale_x_y_ciou": "scale_x_y=1.05\niou_loss=ciou", "ignore_thresh": "ignore_thresh=0.3",
    "truth_thresh": "ignore_thresh=0.3\ntruth_thresh=0.5",
    "truth_thresh_smooth_giou": "truth_thresh=0.5\nobjectness_smooth=1\niou_loss=giou",
    "iou_thresh": "iou_thresh=0.2", "iou_thresh_giou": "iou_thresh=0.2\niou_thresh_kind=giou",
    "iou_thresh_diou": "iou_thresh=0.2\niou_thresh_kind=diou\niou_loss=diou",
    "iou_thresh_ciou": "iou_thresh=0.2\niou_thresh_kind=ciou\niou_loss=ciou\nlabel_smooth_eps=0.05",
    "iou_thresh_counters": f"iou_thresh=0.2\ncounters_per_class={COUNTS}\ncls_normalizer=0.7",
    "objectness_smooth": "objectness_smooth=1\nignore_thresh=0.3",
    "max_delta": "iou_loss=ciou\niou_normalizer=0.5\nmax_delta=0.05", "focal_loss": "focal_loss=1",
    "focal_truth_thresh": "focal_loss=1\ntruth_thresh=0.5\niou_thresh=0.2",
    "delta_normalizer": "delta_normalizer=0.5\niou_loss=ciou", "max_truths": "max=3",
    "new_coords_mse": "new_coords=1\nscale_x_y=2.0",
    # scaled-YOLOv4 / YOLOv7-tiny style heads
    "new_coords_ciou": "new_coords=1\nscale_x_y=2.0\niou_loss=ciou\niou_normalizer=0.05\nobj_normalizer=1.0\n"
                       "cls_normalizer=0.5\niou_thresh=0.2\nobjectness_smooth=1\nmax_delta=2\nignore_thresh=0.7",
}


def _cfg(variant: str):
    assets = require_assets()
    text = (assets / "weights" / "yolov3-tiny.cfg").read_text()
    return parse_cfg(_with_keys(text, VARIANTS[variant]), f"yolov3-tiny-{variant}.cfg")


def _with_keys(text: str, keys: str) -> str:
    """Set keys in every [yolo] block, dropping the lines they replace (Darknet reads a key's first line)."""
    names = {k.split("=")[0].strip() for k in keys.splitlines()}
    lines = [ln for ln in text.splitlines() if ln.split("=")[0].strip() not in names]
    return "\n".join(lines).replace("[yolo]\n", "[yolo]\n" + keys + "\n") + "\n"


def _loss_for(cfg) -> DarknetLoss:
    """The loss reads only the cfg and graph, so variants need no weights."""
    return DarknetLoss(SimpleNamespace(cfg=cfg, graph=build_graph(cfg)))


def _maps(cfg, seed: int = 0, batch: int = 2) -> list[torch.Tensor]:
    """Seeded head maps (logits, or probabilities with new_coords) with boxes planted on some truths."""
    g = torch.Generator().manual_seed(seed)
    graph = build_graph(cfg)
    shapes = graph.shapes(*HW)
    heads = []
    for i, o in zip(graph.heads, head_options(SimpleNamespace(cfg=cfg, graph=graph))):
        _, h, w = shapes[i - 1]
        shape = (batch, len(o.mask), h, w, 5 + o.classes)
        if o.new_coords:
            p = torch.rand(shape, generator=g) * 0.9 + 0.05
        else:
            p = torch.randn(shape, generator=g) * 1.5
        for t in PLANTED:
            _plant(p, TRUTHS[t], o, (h, w), g)
        heads.append(p.requires_grad_(True))
    return heads


def _plant(p: torch.Tensor, truth: torch.Tensor, o, hw, g) -> None:
    """Predict (close to) the truth box at its cell with every anchor, with a confident class."""
    h, w = hw
    b, c, x, y, bw, bh = truth.tolist()
    i, j, s = int(x * w), int(y * h), o.scale_x_y
    for a, m in enumerate(o.mask):
        aw, ah = o.anchors[m]
        fx, fy = [(f + (s - 1) / 2) / s for f in (x * w - i, y * h - j)]
        jitter = 1 + 0.1 * torch.randn(2, generator=g)
        if o.new_coords:
            vals = [fx, fy, math.sqrt(bw * jitter[0] * HW[1] / (4 * aw)), math.sqrt(bh * jitter[1] * HW[0] / (4 * ah))]
            hi = 0.9
        else:
            vals = [math.log(fx / (1 - fx)), math.log(fy / (1 - fy)), math.log(bw * jitter[0] * HW[1] / aw),
                    math.log(bh * jitter[1] * HW[0] / ah)]
            hi = 3.0
        p[int(b), a, j, i, :4] = torch.tensor(vals)
        p[int(b), a, j, i, 5 + (int(c) + a) % o.classes] = hi


def _compare(cfg, heads, targets, loss: DarknetLoss, scale: float = 1.0) -> list[torch.Tensor]:
    """Backward our loss; assert -grad == Darknet's delta per component; return Darknet's deltas."""
    for hd in heads:
        hd.grad = None
    total, parts = loss(heads, targets, HW)
    total.backward()
    refs = []
    for i, hd in zip(loss.model.graph.heads, heads):
        ref = darknet_delta(cfg.blocks[i], hd, targets, HW) * scale
        tol = 1e-4 * float(ref.abs().max())
        for name, sl in COMPONENTS.items():
            err = float((-hd.grad[..., sl] - ref[..., sl]).abs().max())
            assert err <= tol, f"{cfg.path or ''} head {i} {name}: |ours - darknet| = {err:.3g} > {tol:.3g}"
        refs.append(ref)
    cost = sum(float((r ** 2).sum()) for r in refs)  # the value is Darknet's cost, sum(delta^2)
    assert math.isclose(total.item(), cost, rel_tol=1e-4), (total.item(), cost)
    return refs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gradient_equals_darknet_delta(variant):
    cfg = _cfg(variant)
    heads = _maps(cfg)
    scale = 0.5 if variant == "delta_normalizer" else 1.0  # Darknet's GPU backward scales by it, the CPU one not
    refs = _compare(cfg, heads, TRUTHS, _loss_for(cfg), scale)
    assert any(float(r[..., :4].abs().sum()) > 0 for r in refs), "no positive cell: the case proves nothing"


def test_cells_shared_by_two_truths_follow_darknet():
    """Truths 2 and 3 (classes 2 and 7) fall in one cell with one anchor: Darknet's class delta is the reset of
    the first truth plus a set of the second's class, objectness the last's; with iou_thresh the box delta is
    averaged over the cell's positive classes."""
    for variant in ("mse", "iou_thresh_counters"):
        cfg = _cfg(variant)
        heads = _maps(cfg, seed=3)
        refs = _compare(cfg, heads, TRUTHS, _loss_for(cfg))
        shared = [r[0, :, int(0.23 * r.shape[2]), int(0.52 * r.shape[3])] for r in refs]
        assert any(int((cell[:, 5:] > 0).sum(-1).max()) >= 2 for cell in shared), "no cell holds two classes"


@pytest.mark.parametrize("name", ["yolov3-tiny", "yolov4-tiny", "yolo-fastest-1.1"])
def test_official_cfgs_on_random_maps(name):
    cfg = read_cfg(require_assets() / "weights" / f"{name}.cfg")
    heads = _maps(cfg, seed=1)
    _compare(cfg, heads, TRUTHS, _loss_for(cfg))


@pytest.mark.parametrize("name", ["yolov3-tiny", "yolov4-tiny"])
def test_official_weights_on_dog_jpg(name):
    """Head maps of the official model on dog.jpg (416x416), with its three objects as truths."""
    assets = require_assets()
    cfg = read_cfg(assets / "weights" / f"{name}.cfg")
    model = build_model(cfg)
    read_weights(assets / "weights" / f"{name}.weights", model)
    img = Image.open(assets / "data" / "samples" / "dog.jpg").convert("RGB").resize((416, 416))
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255
    model.train()
    with torch.no_grad():
        maps = model(x, raw=True)
    heads = [m.clone().requires_grad_(True) for m in maps]
    # dog, bicycle, truck (COCO ids 16, 1, 7), boxes from the image (normalised centre/size)
    targets = torch.tensor([[0, 16, 0.29, 0.66, 0.25, 0.55], [0, 1, 0.45, 0.48, 0.60, 0.50],
                            [0, 7, 0.76, 0.21, 0.30, 0.15]])
    loss = DarknetLoss(model)
    total, _ = loss(heads, targets, (416, 416))
    total.backward()
    for i, hd in zip(model.graph.heads, heads):
        ref = darknet_delta(cfg.blocks[i], hd, targets, (416, 416))
        tol = 1e-4 * float(ref.abs().max())
        for comp, sl in COMPONENTS.items():
            err = float((-hd.grad[..., sl] - ref[..., sl]).abs().max())
            assert err <= tol, f"{name} head {i} {comp}: {err:.3g} > {tol:.3g}"


def test_real_model_heads_train_and_loss_value_is_darknets_cost():
    cfg = _cfg("new_coords_ciou")
    model = build_model(cfg).train()
    for name in ("darknet", "v5"):
        heads = [torch.rand_like(p).clamp(0.05, 0.95).requires_grad_(True) for p in model(torch.zeros(2, 3, *HW))]
        total, parts = build_loss(name, model)(heads, TRUTHS, HW)
        total.backward()
        assert torch.isfinite(total) and all(v > 0 for v in parts.values()), (name, parts)
        assert all(torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0 for h in heads)
    deltas = DarknetLoss(model).deltas(heads, TRUTHS, HW)
    box = sum(float((d[..., :4] ** 2).sum()) for d in deltas) / 2
    parts = DarknetLoss(model)(heads, TRUTHS, HW)[1]
    assert math.isclose(parts["box"].item(), box, rel_tol=1e-5)


def test_keys_darknet_trains_with_but_we_do_not_are_refused():
    text = (DATA / "tiny-shortcut.cfg").read_text()
    for key in ("map=data/coco9k.map", "embedding_layer=-2"):
        cfg = parse_cfg(text.replace("[yolo]\n", f"[yolo]\n{key}\n"), "x.cfg")
        with pytest.raises(CompressError, match=r"x\.cfg:\d+: \[yolo\] " + key.split("=")[0] + r"=.*--loss v5"):
            DarknetLoss(build_model(cfg))


def test_unknown_keys_get_one_warning_line(caplog):
    text = (DATA / "tiny-shortcut.cfg").read_text().replace("[yolo]\n", "[yolo]\nfancy_gain=2\nwarp=1\njitter=.3\n")
    with caplog.at_level(logging.WARNING, logger="compress.detection.losses_darknet"):
        DarknetLoss(build_model(parse_cfg(text, "x.cfg")))
    lines = [r.getMessage() for r in caplog.records if "unknown" in r.getMessage()]
    assert lines and all(line.endswith("fancy_gain, warp") for line in lines), lines  # jitter is known


def test_bad_values_are_refused_at_parse_time_with_file_and_line():
    text = (DATA / "tiny-shortcut.cfg").read_text()
    for key, match in (("iou_loss=smooth", "iou_loss=smooth"), ("iou_thresh_kind=mse", "iou_thresh_kind"),
                       ("ignore_thresh=-1", "ignore_thresh"), ("label_smooth_eps=2", "label_smooth_eps")):
        with pytest.raises(CfgError, match=r"x\.cfg:\d+: \[yolo\] " + match):
            build_model(parse_cfg(text.replace("[yolo]\n", f"[yolo]\n{key}\n"), "x.cfg"))
    cfg = parse_cfg(text.replace("[yolo]\n", "[yolo]\ncounters_per_class=1,2,3,4,5\n"), "x.cfg")
    with pytest.raises(CompressError, match="counters_per_class lists 5 values"):
        DarknetLoss(build_model(cfg))
    cfg = parse_cfg(text.replace("[yolo]\n", "[yolo]\niou_loss=CIOU\n"), "x.cfg")
    with pytest.raises(CompressError, match="case-sensitively"):
        DarknetLoss(build_model(cfg))


def test_a_key_set_twice_trains_with_its_first_line_as_darknet_does():
    """Darknet's parser (in the harness) reads a repeated key's first line; so does our loss."""
    text = _with_keys((require_assets() / "weights" / "yolov3-tiny.cfg").read_text(),
                      "iou_loss=ciou\niou_normalizer=0.07\niou_loss=mse\niou_normalizer=1.0")
    cfg = parse_cfg(text, "twice.cfg")
    refs = _compare(cfg, _maps(cfg), TRUTHS, _loss_for(cfg))
    assert any(float(r[..., :4].abs().sum()) > 0 for r in refs), "no positive cell: the case proves nothing"
    assert _loss_for(cfg).opts[0].iou_loss == "ciou" and _loss_for(cfg).opts[0].iou_normalizer == 0.07


def test_registry_and_region_heads():
    assert {"darknet", "v5"} <= set(LOSSES)
    with pytest.raises(CompressError, match="loss 'focal'"):
        build_loss("focal", build_model(parse_cfg((DATA / "tiny-shortcut.cfg").read_text(), "x.cfg")))
    with pytest.raises(CompressError, match=r"\[region\] heads.*--loss v5"):
        DarknetLoss(build_model(read_cfg(require_assets() / "cfg" / "yolov2-tiny.cfg")))
