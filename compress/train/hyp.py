"""Hyper-parameter files (`--hyp FILE.yaml`, Ultralytics keys) and the fine-tune defaults.

Precedence when a training command (train, sparse-train, distill) builds its TrainConfig, lowest first: TrainConfig's defaults < the
fine-tune defaults (only when starting from pretrained `--weights`) < the `--hyp` file < options given on
the command line. The loss itself defaults to "darknet" for fine-tuning (the loss the weights were trained
with: its assignment and objectness targets keep their calibration) and to "v5" from scratch (the recipes'
learning rates are tuned for it).
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

from compress.base.yamlio import load_yaml, read_yaml_text
from compress.train.config import TrainConfig, TrainError

__all__ = ["HYP_KEYS", "IGNORED_KEYS", "load_hyp", "finetune_defaults", "resolve_train_config"]

log = logging.getLogger(__name__)

# key -> (type, meaning); every key is also a TrainConfig field of the same name
HYP_KEYS: dict[str, tuple[type, str]] = {
    "lr0": (float, "initial learning rate (SGD ~0.01 from scratch; Adam ~0.001)"),
    "lrf": (float, "final learning rate as a fraction of lr0 (cosine/linear schedules)"),
    "momentum": (float, "SGD momentum / Adam beta1"),
    "weight_decay": (float, "L2 on conv weights (scaled by batch * accumulate / 64)"),
    "warmup_epochs": (float, "epochs of linear lr warm-up (fractions allowed)"),
    "warmup_momentum": (float, "momentum at the start of the warm-up"),
    "box": (float, "v5 loss: box (CIoU) gain"),
    "obj": (float, "v5 loss: objectness gain"),
    "cls": (float, "v5 loss: class gain"),
    "anchor_t": (float, "v5 loss: anchor/target size-ratio threshold for a match"),
    "iou_kind": (str, "v5 loss: ciou | giou"),
    "hsv_h": (float, "augmentation: hue jitter (fraction)"),
    "hsv_s": (float, "augmentation: saturation jitter (fraction)"),
    "hsv_v": (float, "augmentation: value jitter (fraction)"),
    "fliplr": (float, "augmentation: horizontal-flip probability"),
    "translate": (float, "augmentation: translation (+- fraction of the image)"),
    "scale": (float, "augmentation: scale gain range (+- fraction)"),
    "mosaic": (float, "augmentation: 4-image mosaic probability"),
    "clip_grad": (float, "gradient-norm clip (null = none)"),
    "freeze_bn_stats": (bool, "keep BatchNorm running statistics fixed while training"),
    "bn_momentum": (float, "BatchNorm running-average momentum (null = the model's 0.03)"),
}
# Ultralytics keys this trainer has no counterpart for: accepted at their neutral value only.
IGNORED_KEYS: dict[str, float | None] = {
    "degrees": 0.0, "shear": 0.0, "perspective": 0.0, "flipud": 0.0, "mixup": 0.0, "copy_paste": 0.0,
    "fl_gamma": 0.0, "cls_pw": 1.0, "obj_pw": 1.0, "label_smoothing": 0.0,
    "iou_t": None, "warmup_bias_lr": None, "anchors": None,  # None: any value, ignored
}

# Fine-tuning pretrained Darknet weights (benchmarks/finetune.py measures the darknet row): small steps with
# no warm-up from zero (Darknet's own learning_rate / batch), BatchNorm statistics kept as trained (batches of
# 8 give noisy ones). v5: the best of lr0 0.01 / 0.001 / 0.001 + frozen BN on yolov4-tiny (README).
FINETUNE: dict[str, dict[str, Any]] = {
    "darknet": {"lr0": 4e-5, "warmup_epochs": 0.0, "freeze_bn_stats": True},
    "v5": {"lr0": 1e-3},
}


# Every loss: the starting model is evaluated, and a final mAP@.5 below 0.3x of it is reported as a collapse.
FINETUNE_ANY: dict[str, Any] = {"collapse_ratio": 0.3}

FINETUNE_LOSS = "darknet"


def finetune_defaults(loss: str) -> dict[str, Any]:
    """Defaults used when training starts from pretrained weights, for loss `loss` (every trainer: train,
    sparse-train, distill; QAT its loss)."""
    return {**FINETUNE_ANY, **FINETUNE.get(loss, {})}


def load_hyp(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a hyp YAML file: a mapping of HYP_KEYS (and neutral IGNORED_KEYS) to values."""
    path = Path(path)
    data = load_yaml(read_yaml_text(path, TrainError), str(path), TrainError)
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise TrainError(f"{path}: a hyp file is a mapping of key: value, got {type(data).__name__}")
    out = {}
    for key, value in data.items():
        if key in IGNORED_KEYS:
            _check_ignored(path, key, value)
            continue
        if key not in HYP_KEYS:
            raise TrainError(f"{path}: unknown hyp key {key!r}; known keys: {', '.join(sorted(HYP_KEYS))}")
        out[key] = _convert(path, key, value)
    return out


def _check_ignored(path: Path, key: str, value: Any) -> None:
    neutral = IGNORED_KEYS[key]
    if neutral is not None and value != neutral:
        raise TrainError(f"{path}: hyp key {key}={value!r} is not supported here; set it to {neutral} or "
                         "remove it")
    log.info("%s: hyp key %s is ignored (no counterpart in this trainer)", path, key)


def _convert(path: Path, key: str, value: Any) -> Any:
    kind = HYP_KEYS[key][0]
    if value is None and key in ("clip_grad", "bn_momentum"):
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise TrainError(f"{path}: hyp key {key} must be true or false, got {value!r}")
        return value
    if kind is str:
        return str(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TrainError(f"{path}: hyp key {key} must be a number, got {value!r}")
    return float(value)


def resolve_train_config(values: dict[str, Any], explicit: set[str], hyp_path: str | os.PathLike | None,
                         pretrained: bool) -> TrainConfig:
    """TrainConfig from the command's option values, applying the fine-tune defaults (when `pretrained`)
    and the hyp file to every field not in `explicit` (the options the user typed)."""
    merged = dict(values)
    merged.setdefault("loss", FINETUNE_LOSS if pretrained else TrainConfig.loss)
    if pretrained:
        for key, value in finetune_defaults(merged["loss"]).items():
            if key not in explicit:
                merged[key] = value
    hyp = load_hyp(hyp_path) if hyp_path else {}
    merged.update({k: v for k, v in hyp.items() if k not in explicit})
    try:
        return TrainConfig(**merged)
    except TrainError as exc:
        bad = next((k for k in hyp if f"option {k} " in str(exc)), None)
        if bad is not None:
            raise TrainError(f"{hyp_path}: hyp key {bad}: {exc}") from None
        raise
