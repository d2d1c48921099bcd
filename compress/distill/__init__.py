"""Knowledge distillation: train a (pruned or smaller) student with a teacher's outputs as extra targets.

`distill(student, teacher, data, DistillConfig(strategy=3), TrainConfig(epochs=30), "cpu", out_dir)` runs
`fit()` with a `DistillHook` (strategies 1-5 of the reference, its bugs fixed; see `losses.py`) and, with
`baseline=True`, the same training without the hook (same seed, same epochs) for comparison.
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..data import DataSpec
from ..model import DarknetModel
from ..persist import load, save
from ..report import stage_figures
from ..train import TrainConfig, TrainResult, fit
from .config import DEFAULT_WEIGHTS, DistillConfig, parse_pairs
from .features import check_compatible, pair_by_stride, pair_heads, stride_features
from .hook import DistillHook
from .losses import STRATEGIES, HeadPositives, KDInputs

__all__ = ["distill", "DistillResult", "DistillConfig", "DistillHook", "STRATEGIES", "DEFAULT_WEIGHTS",
           "HeadPositives", "KDInputs", "parse_pairs", "check_compatible", "pair_by_stride", "pair_heads",
           "stride_features"]

log = logging.getLogger(__name__)
OUT_NAME = "distilled"


@dataclass
class DistillResult:
    """The distilled student (`model`, saved as `cfg`/`weights` when an out_dir was given), its figures,
    and the no-KD baseline's mAP when it was trained."""
    model: DarknetModel
    config: DistillConfig
    kd: TrainResult
    baseline: TrainResult | None = None
    cfg: Path | None = None
    weights: Path | None = None
    figures: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        kd, base = self.kd.metrics, self.baseline.metrics if self.baseline else {}
        return {**self.figures, "strategy": self.config.strategy, "temperature": self.config.temperature,
                "kd_weights": dict(zip(("soft", "box", "feat"), self.config.weights)),
                "pairs": [list(p) for p in self.config.pairs] if self.config.pairs else None,
                "epochs": self.kd.epochs,
                "map50_kd": kd.get("map50"), "map50_95_kd": kd.get("map50_95"),
                "map50_baseline": base.get("map50"), "map50_95_baseline": base.get("map50_95")}


def distill(student: DarknetModel, teacher: DarknetModel, data_spec: DataSpec, config: DistillConfig = DistillConfig(),
            train_config: TrainConfig = TrainConfig(), device: str = "cpu",
            out_dir: str | os.PathLike | None = None) -> DistillResult:
    """Train `student` in place with knowledge distilled from `teacher` (frozen, eval mode, no_grad).

    With `out_dir`: training runs in `out_dir/kd` (and `out_dir/baseline`), and the final student (EMA when
    `train_config.ema`) is written as `out_dir/distilled.cfg` + `.weights`.

    Example:
        >>> res = distill(load("s.cfg", "s.weights"), load("t.cfg", "t.weights"), load_data_spec("d.data"),
        ...               DistillConfig(strategy=3, baseline=True), TrainConfig(epochs=30), "cpu", "runs/kd")
        >>> res.to_dict()["map50_kd"], res.to_dict()["map50_baseline"]
    """
    check_compatible(student, teacher)
    if teacher is student:  # "distil from yourself": the teacher must be a frozen copy
        teacher = copy.deepcopy(teacher)
    out = Path(out_dir) if out_dir is not None else None
    base_model = copy.deepcopy(student) if config.baseline else None
    hook = DistillHook(teacher, config)
    log.info("distilling with strategy %d (T=%g, weights soft/box/feat=%s)", config.strategy, config.temperature,
             config.weights)
    kd = fit(student, data_spec, train_config, hooks=[hook], device=device, out_dir=_sub(out, "kd"))
    config = _with_pairs(config, hook)
    baseline = None
    if base_model is not None:
        log.info("training the no-KD baseline for %d epochs", train_config.epochs)
        baseline = fit(base_model, data_spec, train_config, hooks=[], device=device, out_dir=_sub(out, "baseline"))
    model, cfg_path, weights_path = _output(student, kd, out, device)
    img = (train_config.img_size, train_config.img_size)
    figures = stage_figures(model, cfg_path, weights_path, kd.metrics, img)
    return DistillResult(model, config, kd, baseline, cfg_path, weights_path, figures)


def _sub(out: Path | None, name: str) -> Path | None:
    return out / name if out is not None else None


def _with_pairs(config: DistillConfig, hook: DistillHook) -> DistillConfig:
    """Record the feature pairs actually used (chosen by stride when none were given)."""
    if config.uses_features and config.pairs is None and hook.pairs:
        return DistillConfig(**{**_fields(config), "pairs": hook.pairs})
    return config


def _fields(config: DistillConfig) -> dict:
    return {k: getattr(config, k) for k in config.__dataclass_fields__ if not k.startswith("_")}


def _output(student: DarknetModel, kd: TrainResult, out: Path | None,
            device: str) -> tuple[DarknetModel, Path | None, Path | None]:
    """The final student: fit's saved last model (EMA) copied to out/distilled.*, else the trained module."""
    if out is None or kd.last_cfg is None:
        return student.eval(), None, None
    model = load(kd.last_cfg, kd.last_weights, device=device)
    cfg_path, weights_path = out / f"{OUT_NAME}.cfg", out / f"{OUT_NAME}.weights"
    save(model, cfg_path, weights_path)
    return model, cfg_path, weights_path
