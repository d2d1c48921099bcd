"""QAT through `compress.train.fit`: the freeze hook, the train config, and exact resume.

Everything a QAT model needs to continue lives in its state dict (weights, BN running statistics, observer
ranges, the `initialized`/`observing`/`bn_frozen` flags), which `fit` saves in `OUT/qat/last.pt` every epoch
and on Ctrl-C. Resuming rebuilds the fake-quant model from the same cfg and quant config (checked against
`OUT/qat/quant_config.json`) and lets `fit` load that state: no re-calibration, same steps, same RNG.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from compress.base.errors import QuantError
from compress.base.fileio import write_text_atomic
from compress.base.jsonio import read_json, require
from compress.train import Hook
from compress.train.config import DistConfig, TrainConfig
from compress.quant.config import QuantConfig, config_to_dict
from compress.quant.prepare import freeze_bn, freeze_observers, set_act_drop
from compress.train.loop import fit

__all__ = ["QATHook", "QDropHook", "run_qat", "qat_train_config", "resume_checkpoint", "check_resume_config",
           "freeze_epochs", "act_drop_at"]

CONFIG_NAME = "quant_config.json"


class QDropHook(Hook):
    """Sets each epoch's QDrop share (`act_drop_at`) before it trains; on resume `state.epoch` is the first
    epoch left, so a resumed run drops exactly where the uninterrupted one would have."""

    def __init__(self, p: float, after: int) -> None:
        self.p, self.after = p, after

    def on_fit_start(self, state: Any) -> None:
        set_act_drop(state.model, act_drop_at(state.epoch, self.p, self.after))

    def on_epoch_end(self, state: Any, metrics: dict) -> None:
        metrics["act_drop"] = act_drop_at(state.epoch, self.p, self.after)  # the share this epoch trained with
        set_act_drop(state.model, act_drop_at(state.epoch + 1, self.p, self.after))


def act_drop_at(epoch: int, p: float, after: int) -> float:
    """QDrop share of 0-based `epoch`: off for the first `after` epochs (the weights first adapt to the fully
    quantized model the int8 ONNX runs), `p` from then on (then also to float activations, as in the Darknet
    pair). On yolov4-tiny W4A8-pow2 the last third alone did not make the pair verify (README, issue 24)."""
    return p if epoch >= after else 0.0


class QATHook(Hook):
    """Jacob et al. (2018): after `freeze_observers_after` epochs the activation ranges stop moving; after
    `freeze_bn_after` epochs BN folds with its running statistics (no batch statistics any more).
    The flags are buffers, so a resumed run gets them back from its checkpoint."""

    def __init__(self, freeze_bn_after: int, freeze_observers_after: int | None = None) -> None:
        self.freeze_bn_after = freeze_bn_after
        self.freeze_observers_after = freeze_observers_after

    def on_fit_start(self, state: Any) -> None:
        self._apply(state, 0, {})  # 0-epoch freeze points

    def on_epoch_end(self, state: Any, metrics: dict) -> None:
        self._apply(state, state.epoch + 1, metrics)

    def _apply(self, state: Any, done: int, metrics: dict) -> None:
        if self.freeze_observers_after is not None and done >= self.freeze_observers_after:
            freeze_observers(state.model)
            metrics["observers_frozen"] = 1
        if done >= self.freeze_bn_after:
            freeze_bn(state.model)
            metrics["bn_frozen"] = 1


def resume_checkpoint(qat_dir: Path) -> Path:
    """The checkpoint `quantize --resume` continues from; a clear error when there is none."""
    path = qat_dir / "last.pt"
    if not path.is_file():
        raise QuantError(f"--resume: {path} does not exist; run `quantize --epochs N` into --out {qat_dir.parent} "
                         "first (or drop --resume)")
    return path


def _config_record(cfg: str | os.PathLike, config: QuantConfig) -> dict:
    return {"cfg_stem": Path(cfg).stem, "quant_config": config_to_dict(config)}


def check_resume_config(qat_dir: Path, cfg: str | os.PathLike, config: QuantConfig) -> None:
    """The resumed model must be built like the interrupted one (same grids, same layers quantized)."""
    path, out = qat_dir / CONFIG_NAME, qat_dir.parent
    if not path.is_file():
        raise QuantError(f"--resume: {path} is missing, so {out} is not a QAT run of this version; "
                         "start again without --resume")
    fix = f"start again without --resume (or remove {out})"
    old = require(read_json(path, QuantError, fix), {"cfg_stem": str, "quant_config": dict}, path, QuantError, fix)
    new = _config_record(cfg, config)
    diff = [k for k in new["quant_config"] if old["quant_config"].get(k) != new["quant_config"][k]]
    if diff or old["cfg_stem"] != new["cfg_stem"]:
        what = ", ".join(f"{k}: {old['quant_config'].get(k)} -> {new['quant_config'][k]}" for k in diff) or "--cfg"
        raise QuantError(f"--resume: the quantization options differ from the interrupted run in {out} ({what}); "
                         "resume with the same --method/--bits/... options")


def qat_train_config(epochs: int, batch_size: int, img_size: int, lr0: float, seed: int, resume: bool,
                     sync_bn: bool) -> TrainConfig:
    """QAT's loop: Adam from the pretrained weights, no warm-up, no EMA (the fake-quant weights are the model),
    one evaluation at the end. `sync_bn` only for plain BatchNorms (folded ones synchronise themselves)."""
    return TrainConfig(epochs=epochs, batch_size=batch_size, img_size=img_size, lr0=lr0, optimizer="adam",
                       warmup_epochs=0.0, ema=False, workers=0, progress=False, eval_every=max(epochs, 1),
                       resume=resume, seed=seed, sync_bn=sync_bn)


def run_qat(qmodel: torch.nn.Module, spec: Any, train: TrainConfig, settings: Any, qat_dir: Path,
            source: tuple[str | os.PathLike, QuantConfig], device: str, dist: DistConfig) -> dict:
    """QAT epochs through `fit` with `train` in `qat_dir`; `settings` (a QuantSettings) gives the freeze points
    and act_drop; `source` (cfg, quant config) is recorded for --resume."""
    if dist.is_main and not train.resume:
        qat_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(qat_dir / CONFIG_NAME, json.dumps(_config_record(*source), indent=2) + "\n")
    obs, bn = freeze_epochs(train.epochs, settings.freeze_observers_after, settings.freeze_bn_after)
    qdrop = QDropHook(settings.act_drop, settings.act_drop_after)
    try:
        result = fit(qmodel, spec, train, hooks=[QATHook(bn, obs), qdrop], device=device, out_dir=qat_dir,
                     distributed=dist)
    finally:
        set_act_drop(qmodel, 0.0)  # calibration, evaluation and export quantize every element
    return {"qat_epochs": result.epochs, "qat_final_loss": result.final_loss, "qat_lr0": train.lr0,
            "qat_freeze_observers_after": obs, "qat_freeze_bn_after": bn, "qat_resumed": train.resume,
            "qat_act_drop": float(settings.act_drop), "qat_act_drop_after": settings.act_drop_after,
            **{f"qat_{k}": v for k, v in result.health().items()}}


def freeze_epochs(epochs: int, observers_after: int | None, bn_after: int | None) -> tuple[int, int]:
    """(observers, BN) freeze points in completed epochs (defaults: half and 80% of the epochs, rounded up)."""
    obs = observers_after if observers_after is not None else math.ceil(epochs / 2)
    bn = bn_after if bn_after is not None else math.ceil(0.8 * epochs)
    return obs, bn
