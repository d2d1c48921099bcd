"""The distillation run: `distill(...)` trains a student with a `DistillHook` (and an optional no-KD baseline).

`distill(student, teacher, data, DistillConfig(strategy=3), TrainConfig(epochs=30), "cpu", out_dir)` runs
`fit()` with a `DistillHook` (strategies 1-5 of the reference, its bugs fixed; see `losses.py`; terms weighted
against the detection loss, see `calibrate.py`) and, with `baseline=True`, the same training without the hook
(same seed, same epochs) for comparison. Under torchrun (`distributed=`) only rank 0 writes.
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compress.data.dataset import DataSpec
from compress.darknet.model import DarknetModel
from compress.darknet.persist import load, pair_paths, save
from compress.darknet.summary import stage_figures
from compress.train import DistConfig, TrainConfig, TrainResult, fit
from compress.train import distributed as D
from compress.distill.config import TERMS, DistillConfig
from compress.distill.features import check_compatible
from compress.distill.hook import DistillHook

__all__ = ["distill", "distilled_pair", "DistillResult", "OUT_NAME"]

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
    weights_used: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    shares: list = field(default_factory=list)
    world_size: int = 1

    def to_dict(self) -> dict:
        kd, base, c = self.kd.metrics, self.baseline.metrics if self.baseline else {}, self.config
        return {**self.figures, "strategy": c.strategy, "temperature": c.temperature, "calibrate": c.calibrate,
                "logits": c.logits, "feature": c.feature if c.uses_features else None,
                "kd_ratios": dict(zip(TERMS, c.ratios)) if c.calibrate else None,
                "kd_weights": self.weights_used, "kd_calibration": self.calibration,
                "kd_shares": {"first_epoch": self.shares[0] if self.shares else None,
                              "last_epoch": self.shares[-1] if self.shares else None},
                "kd_shares_per_epoch": self.shares,
                "pairs": [list(p) for p in c.pairs] if c.pairs else None,
                "epochs": self.kd.epochs, "world_size": self.world_size,
                "map50_kd": kd.get("map50"), "map50_95_kd": kd.get("map50_95"), **self.kd.health(),
                "map50_baseline": base.get("map50"), "map50_95_baseline": base.get("map50_95")}


def distill(student: DarknetModel, teacher: DarknetModel, data_spec: DataSpec, config: DistillConfig = DistillConfig(),
            train_config: TrainConfig = TrainConfig(), device: str = "cpu",
            out_dir: str | os.PathLike | None = None, distributed: DistConfig | None = None,
            outputs: tuple[Path, Path] | None = None) -> DistillResult:
    """Train `student` in place with knowledge distilled from `teacher` (frozen, eval mode, no_grad).

    With `out_dir`: training runs in `out_dir/kd` (and `out_dir/baseline`), and the final student (EMA when
    `train_config.ema`) is written as `outputs` (cfg, weights; default `distilled_pair(out_dir)`). `train_config.resume` continues
    both runs from their `last.pt` (and the calibrated KD weights from `kd/kd_state.json`). `distributed`
    (one process of a torchrun job): DDP training, only rank 0 writes files and reports figures.

    Example:
        >>> res = distill(load("s.cfg", "s.weights"), load("t.cfg", "t.weights"), load_data_spec("d.data"),
        ...               DistillConfig(strategy=3, baseline=True), TrainConfig(epochs=30), "cpu", "runs/kd")
        >>> res.to_dict()["map50_kd"], res.to_dict()["map50_baseline"]
    """
    check_compatible(student, teacher)
    if teacher is student:  # "distil from yourself": the teacher must be a frozen copy
        teacher = copy.deepcopy(teacher)
    dist_cfg = distributed or DistConfig()
    D.check_sync_bn(train_config.sync_bn, dist_cfg, torch.device(device))  # before the process group
    created = D.setup(dist_cfg, torch.device(device))  # one process group for the KD and the baseline runs
    try:
        pair = outputs or (distilled_pair(out_dir) if out_dir is not None else None)
        return _run(student, teacher, data_spec, config, train_config, device, out_dir, dist_cfg, pair)
    finally:
        D.barrier(dist_cfg)
        D.teardown(created)


def _run(student: DarknetModel, teacher: DarknetModel, data_spec: DataSpec, config: DistillConfig,
         train_config: TrainConfig, device: str, out_dir: str | os.PathLike | None,
         dist_cfg: DistConfig, pair: tuple[Path, Path] | None) -> DistillResult:
    out = Path(out_dir) if out_dir is not None else None
    base_model = copy.deepcopy(student) if config.baseline else None
    hook = DistillHook(teacher, config)
    log.info("distilling with strategy %d (T=%g, %s)", config.strategy, config.temperature,
             f"weights calibrated to ratios {config.ratios}" if config.calibrate else f"weights {config.fixed_weights}")
    kd = fit(student, data_spec, train_config, hooks=[hook], device=device, out_dir=_sub(out, "kd"),
             distributed=dist_cfg)
    config = _with_pairs(config, hook)
    baseline = None
    if base_model is not None:
        log.info("training the no-KD baseline for %d epochs", train_config.epochs)
        base_cfg = train_config
        if train_config.resume and (out is None or not (out / "baseline" / "last.pt").is_file()):
            base_cfg = TrainConfig(**{**train_config.to_dict(), "resume": False})  # interrupted before it began
        baseline = fit(base_model, data_spec, base_cfg, hooks=[], device=device, out_dir=_sub(out, "baseline"),
                       distributed=dist_cfg)
    calibration = {**hook.calibrator.start_values(), "ratios": dict(zip(TERMS, config.ratios)),
                   "weight_cap": config.weight_cap, "drift": config.drift,
                   "recalibrations": hook.calibrator.recalibrations} \
        if config.calibrate else {}
    extras = dict(weights_used=hook.weights, calibration=calibration, shares=hook.shares,
                  world_size=dist_cfg.world_size)
    if not dist_cfg.is_main:
        return DistillResult(student.eval(), config, kd, baseline, **extras)
    model, cfg_path, weights_path = _output(student, kd, pair, device)
    img = (train_config.img_size, train_config.img_size)
    figures = stage_figures(model, cfg_path, weights_path, kd.metrics, img)
    return DistillResult(model, config, kd, baseline, cfg_path, weights_path, figures, **extras)


def _sub(out: Path | None, name: str) -> Path | None:
    return out / name if out is not None else None


def _with_pairs(config: DistillConfig, hook: DistillHook) -> DistillConfig:
    """Record the feature pairs actually used (chosen by stride when none were given)."""
    if config.uses_features and config.pairs is None and hook.pairs:
        return DistillConfig(**{**_fields(config), "pairs": hook.pairs})
    return config


def _fields(config: DistillConfig) -> dict:
    return {k: getattr(config, k) for k in config.__dataclass_fields__ if not k.startswith("_")}


def distilled_pair(out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Where the distilled student goes in `out_dir` (the distill command's output pair)."""
    return pair_paths(out_dir, OUT_NAME)


def _output(student: DarknetModel, kd: TrainResult, pair: tuple[Path, Path] | None,
            device: str) -> tuple[DarknetModel, Path | None, Path | None]:
    """The final student: fit's saved last model (EMA) copied to `pair`, else the trained module."""
    if pair is None or kd.last_cfg is None:
        return student.eval(), None, None
    model = load(kd.last_cfg, kd.last_weights, device=device)
    save(model, *pair)
    return model, *pair
