"""slim: network slimming (SlimYOLOv3; reference 4.4). Keep |gamma| > thr over the mode-1 set with a
per-layer floor max(1, floor(C * layer_keep)) (`PruneConfig.keep_floor`), then the union over each residual
chain."""
from __future__ import annotations

from compress.darknet.model import DarknetModel
from compress.darknet.summary import bn_gammas
from compress.prune.api import finalize_mask
from compress.prune.coupling import Coupling, prunable_layers
from compress.prune.mask import ChannelMask, apply_floor, global_threshold, safe_percent, threshold_masks
from compress.prune.registry import PruneConfig, register_pruner

__all__ = ["select", "scores"]


def scores(model: DarknetModel, coupling: Coupling, config: PruneConfig) -> dict:
    """|gamma| of the mode-1 set (what a target ranks channels by)."""
    return bn_gammas(model, prunable_layers(coupling, 1))


@register_pruner("slim", scores=scores)
def select(model: DarknetModel, coupling: Coupling, config: PruneConfig) -> tuple[ChannelMask, dict]:
    gammas = scores(model, coupling, config)
    thr = global_threshold(gammas, config.percent)
    mask = apply_floor(threshold_masks(gammas, thr, strict=True), gammas, config.keep_floor)
    info = {"threshold": thr, "safe_percent": safe_percent(gammas)[0], "prunable_layers": len(gammas),
            "layer_keep": config.keep_floor}
    return finalize_mask(mask, coupling, gammas, config, merge="union"), info
