"""layer-channel: slim channel pruning, then layer pruning on the compact model (reference 4.6)."""
from __future__ import annotations

from dataclasses import replace

from compress.darknet.model import DarknetModel
from compress.prune.api import prune
from compress.prune.registry import PruneConfig, PruneResult, register_pruner

__all__ = ["run"]


@register_pruner("layer-channel", kind="model")
def run(model: DarknetModel, config: PruneConfig) -> PruneResult:
    slim = prune(model, replace(config, method="slim"))
    layer = prune(slim.model, replace(config, method="layer"))
    info = {"slim": slim.info, "layer": layer.info}
    return PruneResult(layer.model, slim.mask, layer.removed_blocks, info)
