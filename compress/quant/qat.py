"""QAT through `compress.train.fit`: the freeze hook, the train config, and exact resume.

Everything a QAT model needs to continue lives in its state dict (weights, BN running statistics, observer
ranges, the `initialized`/`observing`/`bn_frozen` flags), which `fit` saves in `OUT/qat/last.pt` every epoch
and on Ctrl-C. Resuming rebuilds the fake-quant model from the same cfg and quant config (checked against
`OUT/qat/quant_config.json`) and lets `fit` load that state: no re-calibration, same steps, same RNG.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from compress.base.errors import QuantError
from compress.base.fileio import write_text_atomic
from compress.train import Hook, TrainConfig, fit
from compress.train.config import DistConfig
from compress.quant.config import config_to_dict
from compress.quant.prepare import freeze_bn, freeze_observers, set_act_drop

__all__ = ["QATHook", "run_qat", "resume_checkpoint", "check_resume_config"]

CONFIG_NAME = "quant_config.json"


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


def qat_dir(out: str | Path) -> Path:
    return Path(out) / "qat"


def resume_checkpoint(out: str | Path) -> Path:
    """The checkpoint `quantize --resume` continues from; a clear error when there is none."""
    path = qat_dir(out) / "last.pt"
    if not path.is_file():
        raise QuantError(f"--resume: {path} does not exist; run `quantize --epochs N` into --out {out} first "
                         "(or drop --resume)")
    return path


def _config_record(job: Any) -> dict:
    return {"cfg_stem": Path(job.cfg).stem, "quant_config": config_to_dict(job.config)}


def check_resume_config(job: Any) -> None:
    """The resumed model must be built like the interrupted one (same grids, same layers quantized)."""
    path = qat_dir(job.out) / CONFIG_NAME
    if not path.is_file():
        raise QuantError(f"--resume: {path} is missing, so {job.out} is not a QAT run of this version; "
                         "start again without --resume")
    old, new = json.loads(path.read_text()), _config_record(job)
    diff = [k for k in new["quant_config"] if old["quant_config"].get(k) != new["quant_config"][k]]
    if diff or old["cfg_stem"] != new["cfg_stem"]:
        what = ", ".join(f"{k}: {old['quant_config'].get(k)} -> {new['quant_config'][k]}" for k in diff) or "--cfg"
        raise QuantError(f"--resume: the quantization options differ from the interrupted run in {job.out} ({what}); "
                         "resume with the same --method/--bits/... options")


def run_qat(qmodel: torch.nn.Module, spec: Any, img: int, job: Any, device: str, dist: DistConfig) -> dict:
    """QAT epochs through `fit` (Adam, no warm-up, no EMA: the fake-quant weights are the model)."""
    if dist.is_main and not job.resume:
        qat_dir(job.out).mkdir(parents=True, exist_ok=True)
        write_text_atomic(qat_dir(job.out) / CONFIG_NAME, json.dumps(_config_record(job), indent=2) + "\n")
    tc = TrainConfig(epochs=job.epochs, batch_size=job.batch_size, img_size=img, lr0=job.lr0, optimizer="adam",
                     warmup_epochs=0.0, ema=False, workers=0, progress=False, eval_every=max(job.epochs, 1),
                     resume=job.resume, seed=job.seed,
                     sync_bn=bool(getattr(job, "sync_bn", False)) and not job.config.bn_fold)  # folded BNs sync themselves
    obs, bn = freeze_epochs(job)
    act_drop = float(getattr(job, "act_drop", 0.0))
    set_act_drop(qmodel, act_drop)
    try:
        result = fit(qmodel, spec, tc, hooks=[QATHook(bn, obs)], device=device, out_dir=qat_dir(job.out),
                     distributed=dist)
    finally:
        set_act_drop(qmodel, 0.0)  # calibration, evaluation and export quantize every element
    return {"qat_epochs": result.epochs, "qat_final_loss": result.final_loss, "qat_lr0": job.lr0,
            "qat_freeze_observers_after": obs, "qat_freeze_bn_after": bn, "qat_resumed": job.resume,
            "qat_act_drop": act_drop}


def freeze_epochs(job: Any) -> tuple[int, int]:
    """(observers, BN) freeze points in completed epochs (defaults: half and 80% of the epochs, rounded up)."""
    obs = job.freeze_observers_after if job.freeze_observers_after is not None else math.ceil(job.epochs / 2)
    bn = job.freeze_bn_after if job.freeze_bn_after is not None else math.ceil(0.8 * job.epochs)
    return obs, bn
