"""regular: normal's threshold, then every layer's kept count rounded UP to a multiple of --round-to
(default 8), clamped to [N, width]; an emptied layer keeps N channels (reference 4.2, without its wrap bug)."""
from __future__ import annotations

from compress.darknet.model import DarknetModel
from compress.prune.api import finalize_mask
from compress.prune.coupling import Coupling
from compress.prune.mask import ChannelMask, global_threshold, safe_percent, threshold_masks
from compress.prune.normal import scores
from compress.prune.registry import PruneConfig, register_pruner

__all__ = ["select"]


@register_pruner("regular", default_round_to=8, scores=scores)
def select(model: DarknetModel, coupling: Coupling, config: PruneConfig) -> tuple[ChannelMask, dict]:
    gammas = scores(model, coupling, config)
    thr = global_threshold(gammas, config.percent)
    mask = threshold_masks(gammas, thr)
    for i, m in mask.items():  # empty layers: rounding keeps the top round_to channels
        if not bool(m.any()):
            m[int(gammas[i].argmax())] = True
    info = {"threshold": thr, "safe_percent": safe_percent(gammas)[0], "prunable_layers": len(gammas),
            "round_to": config.rounding}
    return finalize_mask(mask, coupling, gammas, config), info
