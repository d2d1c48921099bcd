"""Knowledge distillation: train a (pruned or smaller) student with a teacher's outputs as extra targets.

`distill(student, teacher, data, DistillConfig(strategy=3), TrainConfig(epochs=30), "cpu", out_dir)` runs
`fit()` with a `DistillHook` (strategies 1-5 of the reference, its bugs fixed; see `losses.py`; terms weighted
against the detection loss, see `calibrate.py`) and, with `baseline=True`, the same training without the hook
(same seed, same epochs) for comparison (`api.py`). Under torchrun (`distributed=`) only rank 0 writes.
"""
from __future__ import annotations

from compress.distill.api import DistillResult, distill, distilled_pair
from compress.distill.calibrate import Calibrator
from compress.distill.config import DEFAULT_RATIOS, DEFAULT_STRATEGY, DEFAULT_WEIGHTS, TERMS, DistillConfig, parse_pairs
from compress.distill.features import check_compatible, pair_by_stride, pair_heads, stride_features
from compress.distill.hook import DistillHook
from compress.distill.losses import STRATEGIES, HeadPositives, KDInputs

__all__ = ["distill", "distilled_pair", "DistillResult", "DistillConfig", "DistillHook", "STRATEGIES", "DEFAULT_WEIGHTS",
           "DEFAULT_RATIOS", "DEFAULT_STRATEGY", "TERMS", "Calibrator",
           "HeadPositives", "KDInputs", "parse_pairs", "check_compatible", "pair_by_stride", "pair_heads",
           "stride_features"]
