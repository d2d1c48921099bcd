"""layer: remove the --shortcuts N residual blocks (conv, conv, shortcut) whose conv before the shortcut has
the lowest mean |gamma| (reference 4.5); the removed branch's constant is folded into the next conv."""
from __future__ import annotations

from compress.base.errors import PruneError
from compress.darknet.model import DarknetModel
from compress.darknet.summary import bn_gammas
from compress.prune.coupling import Coupling, prunable_layers, residual_units, unit_conv
from compress.prune.registry import PruneConfig, register_pruner

__all__ = ["select", "ranked_units"]


@register_pruner("layer", kind="layer")
def select(model: DarknetModel, coupling: Coupling, config: PruneConfig) -> tuple[set[int], dict]:
    """Shortcut indices of the `--shortcuts` least important units (`ranked_units`)."""
    candidates = prunable_layers(coupling, 2)
    if config.shortcuts < 1:
        raise PruneError("--method layer needs --shortcuts N >= 1 (the number of residual blocks to remove)")
    if config.shortcuts > len(candidates):
        raise PruneError(f"--shortcuts {config.shortcuts} exceeds the {len(candidates)} removable residual blocks "
                         "of this cfg (closed by a linear unweighted [shortcut]: removing one behind an activation "
                         "is not exact); lower it")
    ranked = ranked_units(model, coupling)[:config.shortcuts]
    info = {"candidates": len(candidates), "removed_units": sorted(s for s, _ in ranked),
            "scores": {s: round(score, 6) for s, score in ranked}}
    return {s for s, _ in ranked}, info


def ranked_units(model: DarknetModel, coupling: Coupling) -> list[tuple[int, float]]:
    """Every removable residual unit as (its shortcut index, mean |gamma| of its closing conv), least important
    first (ties: the earlier unit). The one order `layer` and latency targets (`latency_target`) remove in."""
    units = residual_units(model.graph)
    shortcut_of = {unit_conv(model.graph, u): s for s, u in units.items()}
    score = {i: float(g.mean()) for i, g in bn_gammas(model, prunable_layers(coupling, 2)).items()}
    return [(shortcut_of[i], score[i]) for i in sorted(score, key=lambda i: (score[i], i))]
