"""Pairing teacher and student layers (heads and features) by stride, and capturing features with hooks."""
from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from compress.base.errors import DistillError
from compress.darknet.model import DarknetModel

__all__ = ["check_compatible", "stride_features", "pair_by_stride", "pair_every_conv", "validate_pairs",
           "pair_heads", "FeatureTap"]

log = logging.getLogger(__name__)
Stride = tuple[float, float]  # (img_h / H, img_w / W)


def _name(model: DarknetModel) -> str:
    return str(getattr(model.cfg, "path", None) or "<cfg>")


def check_compatible(student: DarknetModel, teacher: DarknetModel) -> None:
    """Same number of classes and at least one [yolo] head in each, else DistillError naming both cfgs."""
    if not student.heads or not teacher.heads:
        raise DistillError(f"student {_name(student)} / teacher {_name(teacher)}: both need [yolo] heads")
    if student.num_classes != teacher.num_classes:
        raise DistillError(f"student {_name(student)} has {student.num_classes} classes but teacher {_name(teacher)} "
                           f"has {teacher.num_classes}; distil from a teacher trained on the same classes")


def _strides(model: DarknetModel, img_hw: tuple[int, int]) -> list[Stride | None]:
    shapes = model.graph.shapes(*img_hw)
    return [(img_hw[0] / h, img_hw[1] / w) if h and w else None for _, h, w in shapes]


def stride_features(model: DarknetModel, img_hw: tuple[int, int]) -> dict[Stride, int]:
    """One feature layer per output stride: the input of a head's prediction conv where a head has that stride,
    else the last conv block at that stride (prediction convs, those feeding a [yolo] directly, excluded)."""
    g = model.graph
    strides = _strides(model, img_hw)
    pred_convs = {g.inputs[h][0] for h in g.heads}
    chosen: dict[Stride, int] = {}
    for i, section in enumerate(g.sections):
        if section.conv and i not in pred_convs and strides[i] is not None:
            chosen[strides[i]] = i
    for h in g.heads:  # prefer the feature each head predicts from
        src = g.inputs[g.inputs[h][0]]
        if len(src) == 1 and src[0] >= 0 and strides[src[0]] == strides[h]:
            chosen[strides[h]] = src[0]
    return dict(sorted(chosen.items()))


def pair_by_stride(student: DarknetModel, teacher: DarknetModel, img_hw: tuple[int, int],
                   heads_only: bool = False) -> tuple[tuple[int, int], ...]:
    """(student layer, teacher layer) for every stride both models have (`heads_only`: only the strides of the
    student's heads, i.e. the neck features the heads predict from), finest first."""
    fs, ft = stride_features(student, img_hw), stride_features(teacher, img_hw)
    strides = _strides(student, img_hw)
    keep = {strides[h] for h in student.graph.heads}
    pairs = tuple((fs[s], ft[s]) for s in fs if s in ft and (not heads_only or s in keep))
    if not pairs:
        raise DistillError(f"student {_name(student)} and teacher {_name(teacher)} share no feature stride at "
                           f"{img_hw[1]}x{img_hw[0]}; give --pairs 's:t,...' or use --kd 1..3")
    log.info("feature pairs by stride: %s", ", ".join(f"{s}:{t}" for s, t in pairs))
    return pairs


def _conv_features(model: DarknetModel) -> list[int]:
    """The reference's feature set: every conv block whose output does not feed a [yolo] head directly."""
    g = model.graph
    pred_convs = {g.inputs[h][0] for h in g.heads}
    return [i for i, section in enumerate(g.sections) if section.conv and i not in pred_convs]


def pair_every_conv(student: DarknetModel, teacher: DarknetModel, img_hw: tuple[int, int]
                    ) -> tuple[tuple[int, int], ...]:
    """The reference's pairing (KDstr 4/5): the k-th such conv of the student with the k-th of the teacher; the
    two models must have as many of them, of equal sizes (a channel-pruned student), else DistillError."""
    fs, ft = _conv_features(student), _conv_features(teacher)
    if len(fs) != len(ft):
        raise DistillError(f"student {_name(student)} has {len(fs)} conv blocks outside its heads, teacher "
                           f"{_name(teacher)} {len(ft)}: the reference's feature pairing (--reference) needs a "
                           "channel-pruned copy of the teacher; give --pairs 's:t,...' or drop --reference")
    return validate_pairs(student, teacher, tuple(zip(fs, ft)), img_hw)


def validate_pairs(student: DarknetModel, teacher: DarknetModel, pairs: Iterable[tuple[int, int]],
                   img_hw: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """Check that each pair exists and has the same spatial size at `img_hw`."""
    ss, ts = student.graph.shapes(*img_hw), teacher.graph.shapes(*img_hw)
    pairs = tuple(pairs)
    for s, t in pairs:
        if s >= len(ss) or t >= len(ts):
            raise DistillError(f"--pairs {s}:{t}: layer index out of range (student has {len(ss)} layers, "
                               f"teacher {len(ts)})")
        if ss[s][1:] != ts[t][1:]:
            raise DistillError(f"--pairs {s}:{t}: student layer {s} is {ss[s][1]}x{ss[s][2]} but teacher layer {t} "
                               f"is {ts[t][1]}x{ts[t][2]} at input {img_hw[1]}x{img_hw[0]}; pair layers of equal "
                               "stride")
    return pairs


def pair_heads(student: DarknetModel, teacher: DarknetModel, img_hw: tuple[int, int]) -> list[int]:
    """For each student head (in order) the position of the teacher head with the same stride and anchor count."""
    ss, ts = _strides(student, img_hw), _strides(teacher, img_hw)
    t_by_stride = {ts[h]: k for k, h in enumerate(teacher.graph.heads)}
    out = []
    for h, layer in zip(student.graph.heads, student.heads):
        k = t_by_stride.get(ss[h])
        if k is None or teacher.heads[k].num_anchors != layer.num_anchors:
            raise DistillError(
                f"student head {student.cfg.blocks[h].where()} (stride {ss[h][0]:g}, {layer.num_anchors} anchors) "
                f"has no teacher head of the same stride and anchor count in {_name(teacher)}; "
                "distil between models with matching [yolo] heads")
        out.append(k)
    return out


class FeatureTap:
    """Keeps the latest output of the given layers (torch forward hooks); `remove()` detaches them."""

    def __init__(self, model: DarknetModel, layers: Iterable[int]) -> None:
        self.features: dict[int, torch.Tensor] = {}
        self._handles = [model.layers[i].register_forward_hook(self._saver(i)) for i in sorted(set(layers))]

    def _saver(self, i: int):
        def save(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.features[i] = output
        return save

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.features.clear()
