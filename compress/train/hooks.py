"""The hook protocol through which sparsity, distillation and QAT plug into `fit` without branches."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["Hook", "TrainState", "HookList"]


@dataclass
class TrainState:
    """What hooks see. `model` is the unwrapped DarknetModel (never the DDP wrapper); `step` counts
    optimizer steps; `epoch` is 0-based; `rank` is 0 for the process that logs and saves."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    epochs: int
    device: torch.device
    out_dir: Path | None
    epoch: int = 0
    step: int = 0
    rank: int = 0
    world_size: int = 1
    config: Any = None
    ema: Any = None
    scaler: Any = None
    extra: dict = field(default_factory=dict)


class Hook:
    """Base class; every method is optional (default no-op). Call order per run:

    on_fit_start(state)
      per micro-batch: extra_loss(state, imgs, targets, heads) -> {name: scalar tensor}
      per optimizer step (after gradients are unscaled and clipped): after_backward(state)
      per optimizer step, right after optimizer.step() (before the EMA update): after_step(state)
      per epoch: on_epoch_end(state, metrics)  (may add entries to `metrics`; they are logged)
    on_fit_end(state)

    Extra loss terms are added to the detection parts (box/obj/cls, per-image means after gains), so
    `total = batch_size * (box + obj + cls + sum(extra))`; `heads` are the raw head maps of the batch.
    """

    def on_fit_start(self, state: TrainState) -> None:
        pass

    def extra_loss(self, state: TrainState, imgs: torch.Tensor, targets: torch.Tensor,
                   heads: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {}

    def after_backward(self, state: TrainState) -> None:
        pass

    def after_step(self, state: TrainState) -> None:
        pass

    def on_epoch_end(self, state: TrainState, metrics: dict) -> None:
        pass

    def on_fit_end(self, state: TrainState) -> None:
        pass


class HookList:
    """Calls every hook in order; merges `extra_loss` dicts (duplicate names are an error)."""

    def __init__(self, hooks: Sequence[Hook]) -> None:
        self.hooks = list(hooks)

    def on_fit_start(self, state: TrainState) -> None:
        for h in self.hooks:
            h.on_fit_start(state)

    def extra_loss(self, state: TrainState, imgs: torch.Tensor, targets: torch.Tensor,
                   heads: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for h in self.hooks:
            for name, value in (h.extra_loss(state, imgs, targets, heads) or {}).items():
                if name in out or name in ("box", "obj", "cls"):
                    raise ValueError(f"{type(h).__name__}.extra_loss: loss name {name!r} is already used")
                out[name] = value
        return out

    def after_backward(self, state: TrainState) -> None:
        for h in self.hooks:
            h.after_backward(state)

    def after_step(self, state: TrainState) -> None:
        for h in self.hooks:
            h.after_step(state)

    def on_epoch_end(self, state: TrainState, metrics: dict) -> None:
        for h in self.hooks:
            h.on_epoch_end(state, metrics)

    def on_fit_end(self, state: TrainState) -> None:
        for h in self.hooks:
            h.on_fit_end(state)
