"""Optimizer and learning-rate schedule registries, and the decay / no-decay parameter split."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

__all__ = ["OPTIMIZERS", "SCHEDULERS", "register_optimizer", "register_scheduler", "param_groups",
           "build_optimizer", "lr_factor", "warmup_step"]

# name -> factory(param_groups, lr, momentum) -> Optimizer
OPTIMIZERS: dict[str, Callable[[list[dict], float, float], torch.optim.Optimizer]] = {}
# name -> factor(epoch, epochs, lrf) -> lr multiplier in (0, 1]
SCHEDULERS: dict[str, Callable[[int, int, float], float]] = {}


def register_optimizer(name: str) -> Callable:
    def deco(f: Callable) -> Callable:
        OPTIMIZERS[name] = f
        return f
    return deco


def register_scheduler(name: str) -> Callable:
    def deco(f: Callable) -> Callable:
        SCHEDULERS[name] = f
        return f
    return deco


@register_optimizer("sgd")
def _sgd(groups: list[dict], lr: float, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)


@register_optimizer("adam")
def _adam(groups: list[dict], lr: float, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=lr, betas=(momentum, 0.999))


@register_optimizer("adamw")
def _adamw(groups: list[dict], lr: float, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))


@register_scheduler("cosine")
def _cosine(epoch: int, epochs: int, lrf: float) -> float:
    """One half cosine from 1 to lrf over the run."""
    return ((1 - math.cos(epoch * math.pi / epochs)) / 2) * (lrf - 1) + 1


@register_scheduler("linear")
def _linear(epoch: int, epochs: int, lrf: float) -> float:
    return (1 - epoch / epochs) * (1.0 - lrf) + lrf


@register_scheduler("step")
def _step(epoch: int, epochs: int, lrf: float) -> float:
    """Darknet `policy=steps`: x0.1 at 80% and again at 90% of the run."""
    return 0.1 ** ((epoch >= 0.8 * epochs) + (epoch >= 0.9 * epochs))


def lr_factor(name: str, epoch: int, epochs: int, lrf: float) -> float:
    return SCHEDULERS[name](epoch, epochs, lrf)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Group 0: weights with ndim > 1 (conv/linear kernels), decayed. Group 1: everything 1-D or scalar
    (BN gamma/beta, biases, learned quantizer scales), never decayed, so an L1 penalty on BN gamma is
    the only force on it."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: nn.Module, name: str, lr: float, momentum: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    return OPTIMIZERS[name](param_groups(model, weight_decay), lr, momentum)


def warmup_step(optimizer: torch.optim.Optimizer, it: int, n_warmup: int, target_lr: float, momentum: float,
                warmup_momentum: float) -> None:
    """Linear warm-up of lr (0 -> target) and, for SGD, momentum (warmup_momentum -> momentum)."""
    frac = min(1.0, (it + 1) / max(n_warmup, 1))
    for g in optimizer.param_groups:
        g["lr"] = target_lr * frac
        if "momentum" in g:
            g["momentum"] = warmup_momentum + (momentum - warmup_momentum) * frac
