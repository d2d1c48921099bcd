"""Resumable training checkpoints (`last.pt`): model, optimizer, EMA, AMP scaler, progress, RNG states.

Written atomically through `compress.darknet.persist.save_checkpoint`, so the file embeds the cfg text and is
also a loadable `.pt` model (`compress.load(None, "last.pt")`).
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from compress.darknet.cfg import format_cfg
from compress.darknet.persist import read_checkpoint, save_checkpoint
from compress.train.config import TrainConfig, TrainError
from compress.train.hooks import TrainState

__all__ = ["save_train_checkpoint", "restore_train_checkpoint", "rng_state", "set_rng_state", "seed_all"]

log = logging.getLogger(__name__)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def save_train_checkpoint(path: Path, state: TrainState, completed_epochs: int, progress: dict,
                          rng: dict | None = None) -> None:
    """`completed_epochs` = epochs fully trained; `progress` = best fitness, history, and for a run stopped
    mid-epoch `partial` (batches of the next epoch already trained); `rng` = the RNG states to resume with
    (default: the current ones)."""
    save_checkpoint(state.model, path, optimizer=state.optimizer.state_dict(),
                    ema=state.ema.state_dict() if state.ema is not None else None,
                    scaler=state.scaler.state_dict() if state.scaler is not None else None,
                    epoch=completed_epochs, step=state.step, rng=rng or rng_state(),
                    train_config=state.config.to_dict(), progress=progress)


def restore_train_checkpoint(path: Path, state: TrainState) -> tuple[int, dict]:
    """Load `path` into the state's model/optimizer/EMA/scaler; returns (completed_epochs, progress)."""
    if not path.is_file():
        raise TrainError(f"{path}: nothing to resume: no checkpoint (the run never ended an epoch, or never "
                         f"ran); run the same command without --resume, which starts afresh in {path.parent} "
                         f"(a folder holding no report or checkpoint is not an earlier run)")
    ckpt = read_checkpoint(path)
    if ckpt.get("cfg") != format_cfg(state.model.cfg):
        raise TrainError(f"{path}: checkpoint was trained with another cfg; resume with the same --cfg")
    if "optimizer" not in ckpt:
        raise TrainError(f"{path}: a model checkpoint, not a training checkpoint; it cannot be resumed")
    state.model.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    if state.ema is not None and ckpt.get("ema"):
        state.ema.load_state_dict(ckpt["ema"])
    if state.scaler is not None and ckpt.get("scaler"):
        state.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    state.step = ckpt.get("step", 0)
    _warn_changed(path, TrainConfig.from_dict(ckpt.get("train_config", {})), state.config)
    log.info("resumed %s after epoch %d", path, ckpt["epoch"])
    return ckpt["epoch"], ckpt.get("progress", {})


def _warn_changed(path: Path, old: TrainConfig, new: TrainConfig) -> None:
    changed = [k for k, v in new.to_dict().items() if k != "resume" and old.to_dict().get(k) != v]
    if changed:
        log.warning("%s: resuming with changed options %s", path, ", ".join(changed))
