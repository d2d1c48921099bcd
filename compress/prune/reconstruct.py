"""Least-squares reconstruction after channel pruning (He, Zhang & Sun 2017, "Channel Pruning for Accelerating Very
Deep Neural Networks"; Luo et al. 2017, ThiNet): every conv that lost input channels gets new weights that make
its output, fed what the PRUNED model now feeds it, reproduce the ORIGINAL model's output on calibration images.

Why: a cut that is not exact (channels with non-zero gamma) leaves each consumer summing fewer inputs than it was
trained on; on a pretrained model that was never sparse-trained every criterion lands near mAP 0 (official
yolov4-tiny to 0.5x FLOPs: slim 0.006, l1 0.039, taylor 0.030 on the held-out COCO128 images). The remaining input
channels can stand in for much of what was removed, and a linear least-squares fit finds how, in closed form.

How: the convs that lost input channels and (`downstream`, default) every plain conv after the first of them,
whose inputs changed too, in network order (so each sees the inputs its already-reconstructed predecessors
give; refitting only the narrowed convs left yolov4-tiny's second head further from the original); for conv j,
forward hooks take its input in the pruned model and the pre-BN output of the same conv in the original (the
output channels j keeps; one forward of the original per batch serves every layer, kept only at the sampled
positions), `unfold` turns sampled output positions into patch rows, and the normal equations
(float64, with an intercept column, ridge `ridge` x mean diagonal) are accumulated over the images and solved.
The intercept goes into the BN running mean (or is the conv bias without BN), so the constants of removed channels
(surgery's compensation) are re-fitted too. After layer removal (residual units: `--method layer`, a latency
target out of reach of channel widths) the pruned model's layers are the original's minus the removed blocks,
and every conv after the first removed block is refitted. tests/test_reconstruct.py checks the solve against
numpy's lstsq.
Depthwise/grouped and shared-weight convs keep their weights.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compress.base.errors import PruneError
from compress.darknet.model import DarknetModel
from compress.data.dataset import to_input
from compress.prune.blocks import kept_layers

__all__ = ["ReconstructConfig", "reconstruct", "refit_layers"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconstructConfig:
    """positions: output positions sampled per image; ridge: Tikhonov weight relative to the mean diagonal of the
    normal matrix; seed: the position sampling."""
    positions: int = 256
    ridge: float = 1e-2
    downstream: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.positions < 1:
            raise PruneError(f"reconstruction positions {self.positions} must be >= 1")
        if not self.ridge >= 0:
            raise PruneError(f"reconstruction ridge {self.ridge} must be >= 0")


def refit_layers(original: DarknetModel, pruned: DarknetModel, downstream: bool = False,
                 removed: Sequence[int] = ()) -> list[int]:
    """Convs of `pruned` (its numbering) whose input width shrank (plain convs with groups=1, not shared): what to
    refit; with `downstream`, every such conv from the first one that lost inputs, or the first after a removed
    block, on (their inputs changed too)."""
    out: list[int] = []
    first_gap = min(removed, default=len(original.layers))
    kept = kept_layers(len(original.layers), removed)
    if len(kept) != len(pruned.layers):
        raise PruneError(f"the pruned model has {len(pruned.layers)} layers, the original {len(original.layers)} "
                         f"less the {len(removed)} removed blocks given: pass the pruning's removed blocks")
    for j, i in enumerate(kept):
        conv_a, conv_b = getattr(original.layers[i], "conv", None), getattr(pruned.layers[j], "conv", None)
        if not isinstance(conv_b, nn.Conv2d) or getattr(pruned.layers[j], "shared", False) or conv_b.groups != 1:
            continue
        if conv_b.in_channels < conv_a.in_channels or (downstream and (out or i > first_gap)):
            out.append(j)
    return out


class _Capture(Exception):
    pass


def _capture(model: DarknetModel, j: int, x: torch.Tensor) -> torch.Tensor:
    """Layer j's conv input for batch `x`; the rest of the net is skipped."""
    got: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        got.append(inputs[0])
        raise _Capture

    handle = model.layers[j].conv.register_forward_hook(hook)
    try:
        model(x, raw=True)
    except _Capture:
        pass
    finally:
        handle.remove()
    return got[0].detach()


def _rows(conv: nn.Conv2d, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Patch rows (positions, C_in*k*k + 1 intercept) of input `x` at flat output positions `idx` (per image)."""
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (N, C*k*k, L)
    picked = torch.gather(cols, 2, idx.unsqueeze(1).expand(-1, cols.shape[1], -1))  # (N, C*k*k, R)
    rows = picked.permute(0, 2, 1).reshape(-1, cols.shape[1]).double()
    return torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype)], 1)


@torch.no_grad()
def _targets(original: DarknetModel, layers: Sequence[int], mask: dict[int, torch.Tensor],
             batches: Sequence[torch.Tensor], config: ReconstructConfig, gen: torch.Generator
             ) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per refit layer and batch: (sampled flat output positions, the original's pre-BN output of the kept channels
    at them as (positions, C) float64 rows). One forward of the original per batch serves every layer (it never
    changes) instead of one per layer and batch; only the sampled positions are kept. Positions are drawn from
    `gen` layer by layer, batch by batch (so the sample does not depend on how the forwards are grouped)."""
    grabbed: dict[int, torch.Tensor] = {}
    hooks = [original.layers[j].conv.register_forward_hook(
        lambda m, i, o, j=j: grabbed.__setitem__(j, o.detach())) for j in layers]
    try:
        original(batches[0][:1], raw=True)  # output sizes per layer (the same for every batch: one input size)
        cells = {j: grabbed[j].shape[2] * grabbed[j].shape[3] for j in layers}
        idx = {j: [torch.rand(len(x), cells[j], generator=gen).argsort(1)[:, :config.positions] for x in batches]
               for j in layers}
        out: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {j: [] for j in layers}
        for b, x in enumerate(batches):
            original(x, raw=True)
            for j in layers:
                y = grabbed[j].cpu()
                y = y[:, mask[j]] if j in mask else y
                n, c = y.shape[:2]
                at = torch.gather(y.reshape(n, c, -1), 2, idx[j][b].unsqueeze(1).expand(-1, c, -1))
                out[j].append((idx[j][b], at.permute(0, 2, 1).reshape(-1, c).double()))
            grabbed.clear()
    finally:
        for h in hooks:
            h.remove()
    return out


@torch.no_grad()
def _refit(original: DarknetModel, pruned: DarknetModel, j: int, i: int, keep: torch.Tensor | None,
           batches: Sequence[torch.Tensor], targets: list[tuple[torch.Tensor, torch.Tensor]],
           config: ReconstructConfig) -> None:
    """Refit `pruned`'s conv j to reproduce the original's conv i (the same layer before any renumbering)."""
    conv, layer = pruned.layers[j].conv, pruned.layers[j]
    d = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] + 1
    xtx = torch.zeros(d, d, dtype=torch.float64)
    xty = torch.zeros(d, conv.out_channels, dtype=torch.float64)
    for x, (idx, target) in zip(batches, targets):
        rows = _rows(conv, _capture(pruned, j, x).cpu(), idx)
        xtx += rows.T @ rows
        xty += rows.T @ target
    lam = config.ridge * float(xtx.diagonal()[:-1].mean())
    reg = torch.eye(d, dtype=torch.float64) * lam
    reg[-1, -1] = 0.0  # the intercept is not shrunk
    sol = torch.linalg.solve(xtx + reg, xty)  # (d, C_out)
    w, b = sol[:-1].T.reshape(conv.weight.shape), sol[-1]
    conv.weight.copy_(w.to(conv.weight.dtype))
    if layer.bn is not None:
        mean = original.layers[i].bn.running_mean.cpu()
        mean = mean[keep] if keep is not None else mean
        layer.bn.running_mean.copy_((mean.double() - b).to(layer.bn.running_mean.dtype))
    else:
        conv.bias.copy_(b.to(conv.bias.dtype))


def reconstruct(original: DarknetModel, pruned: DarknetModel, mask: dict[int, torch.Tensor],
                batches: Iterable[torch.Tensor], config: ReconstructConfig = ReconstructConfig(),
                device: str | torch.device = "cpu", removed: Sequence[int] = ()) -> dict:
    """Refit, in place, every conv of `pruned` that lost input channels (`refit_layers`) on the uint8 image
    `batches` (`mask`: the pruning's kept output channels per conv; `removed`: blocks the pruning removed; both
    in the original's numbering). Returns report figures (`reconstructed_convs` in `pruned`'s numbering)."""
    layers = refit_layers(original, pruned, config.downstream, removed)
    origin = kept_layers(len(original.layers), removed)
    data = [to_input(b, device) for b in batches]
    if not data:
        raise PruneError("reconstruction needs calibration images (--data)")
    gen = torch.Generator().manual_seed(config.seed)
    modes = (original.training, pruned.training)
    original.eval(), pruned.eval()
    try:
        targets = _targets(original, [origin[j] for j in layers], mask, data, config, gen)
        for j in layers:
            _refit(original, pruned, j, origin[j], mask.get(origin[j]), data, targets.pop(origin[j]), config)
    finally:
        original.train(modes[0]), pruned.train(modes[1])
    log.info("reconstruction: %d convs refitted on %d images", len(layers), sum(len(b) for b in data))
    return {"reconstructed_convs": layers, "reconstruct_images": sum(len(b) for b in data),
            "reconstruct_positions": config.positions, "reconstruct_ridge": config.ridge}
