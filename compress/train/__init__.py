"""Training: `fit(model, data_spec, TrainConfig(...), hooks=...)`. Sub-modules: `config` (TrainConfig,
DistConfig), `hooks` (Hook, TrainState), `optim` (optimizer/scheduler registries), `ema`, `checkpoint`,
`distributed`, `log` (results.csv/png), `loop` (fit)."""
from __future__ import annotations

from compress.train.config import DistConfig, TrainConfig, TrainError
from compress.train.hooks import Hook, TrainState
from compress.train.api import train_model
from compress.train.loop import TrainResult, fit
from compress.train.optim import OPTIMIZERS, SCHEDULERS, register_optimizer, register_scheduler

__all__ = ["fit", "train_model", "TrainConfig", "DistConfig", "TrainError", "TrainResult", "Hook", "TrainState",
           "OPTIMIZERS", "SCHEDULERS", "register_optimizer", "register_scheduler"]
