"""layer: remove the --shortcuts N residual blocks (conv, conv, shortcut) whose conv before the shortcut has
the lowest mean |gamma| (reference 4.5); the removed branch's constant is folded into the next conv."""
from __future__ import annotations

from compress.base.errors import PruneError
from compress.darknet.model import DarknetModel
from compress.darknet.summary import bn_gammas
from compress.prune.coupling import Coupling, prunable_layers, residual_units
from compress.prune.registry import PruneConfig, register_pruner

__all__ = ["select"]


@register_pruner("layer", kind="layer")
def select(model: DarknetModel, coupling: Coupling, config: PruneConfig) -> tuple[set[int], dict]:
    """Shortcut indices of the units to remove. Ties: the earlier unit goes first."""
    units = residual_units(model.graph)
    candidates = prunable_layers(coupling, 2)
    if config.shortcuts < 1:
        raise PruneError("--method layer needs --shortcuts N >= 1 (the number of residual blocks to remove)")
    if config.shortcuts > len(candidates):
        raise PruneError(f"--shortcuts {config.shortcuts} exceeds the {len(candidates)} removable residual blocks "
                         "of this cfg (closed by a linear unweighted [shortcut]: removing one behind an activation "
                         "is not exact); lower it")
    score = {i: float(g.mean()) for i, g in bn_gammas(model, candidates).items()}
    chosen = sorted(candidates, key=lambda i: (score[i], i))[:config.shortcuts]
    shortcut_of = {u[-2]: s for s, u in units.items()}
    info = {"candidates": len(candidates), "removed_units": sorted(shortcut_of[i] for i in chosen),
            "scores": {shortcut_of[i]: round(score[i], 6) for i in chosen}}
    return {shortcut_of[i] for i in chosen}, info
