"""The detection-loss registry: `LOSSES[name](model, train_config) -> loss`, filled by `@register_loss(name)`.

A module of its own so that every loss module (`losses` for "v5", `losses_darknet` for "darknet") imports the
registry instead of one another; `compress.detection.losses` imports them all and offers `build_loss`.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

__all__ = ["LOSSES", "register_loss"]

# name -> factory(model, train_config) -> callable(heads, targets, img_hw) -> (total, parts)
LOSSES: dict[str, Callable[[nn.Module, Any], Callable]] = {}


def register_loss(name: str) -> Callable:
    def deco(f: Callable) -> Callable:
        LOSSES[name] = f
        return f
    return deco
