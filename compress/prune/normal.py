"""normal: global |gamma| threshold over the mode-0 prune set (residual-stream convs excluded; reference 4.1)."""
from __future__ import annotations

from compress.darknet.model import DarknetModel
from compress.darknet.summary import bn_gammas
from compress.prune.api import finalize_mask
from compress.prune.coupling import Coupling, prunable_layers
from compress.prune.mask import ChannelMask, check_not_emptied, global_threshold, safe_percent, threshold_masks
from compress.prune.registry import PruneConfig, register_pruner

__all__ = ["select", "scores"]


def scores(model: DarknetModel, coupling: Coupling, config: PruneConfig) -> dict:
    """|gamma| of the mode-0 set (what a target ranks channels by)."""
    return bn_gammas(model, prunable_layers(coupling, 0))


@register_pruner("normal", scores=scores)
def select(model: DarknetModel, coupling: Coupling, config: PruneConfig) -> tuple[ChannelMask, dict]:
    """Keep |gamma| >= thr, thr = sorted |gamma|[floor(N * percent)]; a layer emptied by thr is an error
    (naming the largest safe percent) unless --min-keep gives a floor."""
    gammas = scores(model, coupling, config)
    thr = global_threshold(gammas, config.percent)
    mask = threshold_masks(gammas, thr)
    if config.min_keep == 0:
        check_not_emptied(mask, gammas, config.percent, "normal")
    info = {"threshold": thr, "safe_percent": safe_percent(gammas)[0], "prunable_layers": len(gammas)}
    return finalize_mask(mask, coupling, gammas, config), info
