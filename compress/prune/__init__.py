"""Channel and layer pruning: `prune(model, PruneConfig(method=...)) -> PruneResult` with a NEW compact model.

Methods live one per file and register themselves with `@register_pruner(name, kind)` (`registry`); `api`
dispatches on the method's kind. Importing this package imports every method module, so `METHODS` is complete.

Example:
    >>> result = prune(model, PruneConfig(method="slim", percent=0.5))
    >>> compress.save(result.model, "out/slim.cfg", "out/slim.weights")
"""
from __future__ import annotations

# each method module registers itself in METHODS on import (this order is the registry order)
from compress.prune import normal, regular, shortcut, slim, layer, layer_channel, tp  # noqa: F401
from compress.prune.api import finalize_mask, prune, select_mask
from compress.prune.registry import METHODS, PruneConfig, Pruner, PruneResult, register_pruner

__all__ = ["PruneConfig", "PruneResult", "Pruner", "METHODS", "register_pruner", "prune", "select_mask",
           "finalize_mask"]
