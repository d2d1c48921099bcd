"""shortcut: global threshold over the mode-1 set; each residual chain takes its root conv's mask
(the stage's first conv; reference 4.3). An emptied layer is an error naming the largest safe percent."""
from __future__ import annotations

from compress.darknet.model import DarknetModel
from compress.darknet.summary import bn_gammas
from compress.prune.api import finalize_mask
from compress.prune.coupling import Coupling, prunable_layers
from compress.prune.mask import ChannelMask, check_not_emptied, global_threshold, merge_coupled, safe_percent, threshold_masks
from compress.prune.registry import PruneConfig, register_pruner

__all__ = ["select", "scores"]


def scores(model: DarknetModel, coupling: Coupling, config: PruneConfig) -> dict:
    """Each mode-1 conv scored by its chain root's |gamma| (what a target ranks channels by)."""
    layers = prunable_layers(coupling, 1)
    gammas = bn_gammas(model, layers)
    return {i: gammas[coupling.root(i)] for i in layers}


@register_pruner("shortcut", scores=scores)
def select(model: DarknetModel, coupling: Coupling, config: PruneConfig) -> tuple[ChannelMask, dict]:
    layers = prunable_layers(coupling, 1)
    gammas = bn_gammas(model, layers)
    thr = global_threshold(gammas, config.percent)
    mask = merge_coupled(threshold_masks(gammas, thr), coupling, "root")
    deciding = {i: gammas[i] for i in layers if coupling.root(i) == i}  # singletons and chain roots
    if config.min_keep == 0:  # the threshold ran over all of `gammas`: so must the safe percent
        check_not_emptied({i: mask[i] for i in deciding}, gammas, config.percent, "shortcut", deciding)
    root_scores = {i: gammas[coupling.root(i)] for i in layers}
    info = {"threshold": thr, "safe_percent": safe_percent(gammas, deciding)[0], "prunable_layers": len(layers)}
    return finalize_mask(mask, coupling, root_scores, config, merge="root"), info
