"""DistillHook: the training hook that adds the knowledge-distillation loss to `fit()`."""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from ..errors import DistillError
from ..losses import build_targets
from ..model import DarknetModel
from ..train.hooks import Hook
from .config import DistillConfig
from .features import FeatureTap, check_compatible, pair_by_stride, pair_heads, validate_pairs
from .losses import STRATEGIES, HeadPositives, KDInputs

__all__ = ["DistillHook", "METRIC_KEYS"]

log = logging.getLogger(__name__)
METRIC_KEYS = frozenset({"kd_bounded_frac"})  # reported by strategies but not loss terms

class DistillHook(Hook):
    """Adds `STRATEGIES[config.strategy]` to the student's loss. The teacher runs in eval mode under
    `torch.no_grad()` with frozen parameters, so gradients reach only the student.

    Example:
        >>> fit(student, data, TrainConfig(epochs=30), hooks=[DistillHook(teacher, DistillConfig(strategy=3))])
    """

    def __init__(self, teacher: DarknetModel, config: DistillConfig = DistillConfig()) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.config = config
        self.pairs: tuple[tuple[int, int], ...] = ()
        self.head_map: list[int] = []
        self.stats: dict[str, float] = {}
        self._taps: tuple[FeatureTap, FeatureTap] | None = None
        self._student: DarknetModel | None = None
        self._sums: dict[str, float] = {}
        self._n = 0

    def setup(self, student: DarknetModel, img_hw: tuple[int, int] | None = None) -> None:
        """Pair heads and features (at the student cfg's input size unless given) and attach the feature taps."""
        check_compatible(student, self.teacher)
        img_hw = img_hw or (student.cfg.height, student.cfg.width)
        self.head_map = pair_heads(student, self.teacher, img_hw)
        if self.config.uses_features:
            self.pairs = (validate_pairs(student, self.teacher, self.config.pairs, img_hw)
                          if self.config.pairs else pair_by_stride(student, self.teacher, img_hw))
            self._taps = (FeatureTap(student, [s for s, _ in self.pairs]),
                          FeatureTap(self.teacher, [t for _, t in self.pairs]))
        self._student = student

    def teardown(self) -> None:
        if self._taps:
            for tap in self._taps:
                tap.remove()
        self._taps, self._student = None, None

    # ------------------------------------------------------------------ Hook interface of compress.train.fit
    def on_fit_start(self, state: Any) -> None:
        self.teacher.to(state.device)
        self.setup(state.model)

    def extra_loss(self, state: Any, imgs: Tensor, targets: Tensor, heads: list[Tensor]) -> dict[str, Tensor]:
        if self._student is not state.model:
            self.teardown()
            self.setup(state.model)
        parts = self.loss(imgs, targets, heads)
        self._accumulate(parts)
        return {k: v for k, v in parts.items() if k not in METRIC_KEYS}

    def on_epoch_end(self, state: Any, metrics: dict) -> None:
        self.stats = {k: v / max(self._n, 1) for k, v in self._sums.items()}
        log.info("epoch %s distillation: %s", getattr(state, "epoch", "?"),
                 ", ".join(f"{k}={v:.4g}" for k, v in self.stats.items()))
        self._sums, self._n = {}, 0

    def on_fit_end(self, state: Any) -> None:
        self.teardown()

    # ------------------------------------------------------------------ the loss itself
    def loss(self, imgs: Tensor, targets: Tensor, heads: list[Tensor]) -> dict[str, Tensor]:
        """KD terms for a batch whose student forward (raw `heads`) already ran with the taps attached."""
        if self._student is None:
            raise DistillError("DistillHook.loss called before setup(student); pass the hook to fit()")
        img_hw = (int(imgs.shape[-2]), int(imgs.shape[-1]))
        self.teacher.eval()
        with torch.no_grad():
            t_all = self.teacher(imgs, raw=True)
        t_heads = [t_all[k] for k in self.head_map]
        for s, t in zip(heads, t_heads):
            if s.shape != t.shape:
                raise DistillError(f"student head {tuple(s.shape)} and teacher head {tuple(t.shape)} differ at input "
                                   f"{img_hw[1]}x{img_hw[0]}; use an input size both models divide")
        inputs = KDInputs(heads, t_heads, self._positives(heads, targets, img_hw), self._features(), img_hw,
                          self._scales())
        return STRATEGIES[self.config.strategy](inputs, self.config)

    def _positives(self, heads: list[Tensor], targets: Tensor, img_hw: tuple[int, int]) -> list[HeadPositives] | None:
        if self.config.strategy < 2:
            return None
        out = []
        for tg, k, p in zip(build_targets(heads, targets, self._student, img_hw), self.head_map, heads):
            stride = torch.tensor([img_hw[1] / p.shape[3], img_hw[0] / p.shape[2]], device=p.device)
            anchors_t = self.teacher.heads[k].anchors.to(p.device, torch.float32)[tg.a] / stride
            out.append(HeadPositives(tg.b, tg.a, tg.gy, tg.gx, tg.tbox, tg.anchors, anchors_t))
        return out

    def _features(self) -> list[tuple[Tensor, Tensor]]:
        if not self._taps:
            return []
        fs, ft = self._taps[0].features, self._taps[1].features
        return [(fs[s], ft[t]) for s, t in self.pairs]

    def _scales(self) -> tuple[tuple[float, float], ...]:
        return tuple((s.scale_x_y, self.teacher.heads[k].scale_x_y) for s, k in zip(self._student.heads, self.head_map))

    def _accumulate(self, parts: dict[str, Tensor]) -> None:
        for k, v in parts.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v.detach())
        self._n += 1
