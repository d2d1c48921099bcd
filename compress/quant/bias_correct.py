"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", section 4.2): rounding the weights
shifts each output channel's mean by (W_q - W) E[x]; adding the opposite to the bias removes that shift.

E[x] is each conv's per-input-channel mean over the calibration images and all positions, as the conv sees
it in the quantized model (its input is quantized; zero padding is ignored). The correction goes into the
float bias that folding uses (BN beta, or the conv bias), so the Darknet pair, the ONNX and the fake-quant
model all carry it.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from compress.data.dataset import to_input
from compress.quant.modules import QConvBNAct

__all__ = ["input_means", "correct_biases", "bias_correction"]


@torch.no_grad()
def input_means(model: torch.nn.Module, batches: Iterable[torch.Tensor],
                device: str | torch.device = "cpu") -> dict[QConvBNAct, torch.Tensor]:
    """Per-input-channel mean of every quantized conv's input over `batches` (eval mode, ranges fixed)."""
    model.eval()
    sums: dict[QConvBNAct, torch.Tensor] = {}
    counts: dict[QConvBNAct, int] = {}

    def hook(module: QConvBNAct, args: tuple) -> None:
        x = args[0]
        sums[module] = sums.get(module, 0) + x.sum((0, 2, 3)).double()
        counts[module] = counts.get(module, 0) + x.numel() // x.shape[1]

    convs = [m for m in model.modules() if isinstance(m, QConvBNAct)]
    handles = [m.register_forward_pre_hook(hook) for m in convs]
    try:
        for imgs in batches:
            model(to_input(imgs, device))  # uint8 loader batches -> float [0, 1]
    finally:
        for h in handles:
            h.remove()
    return {m: (sums[m] / counts[m]).float() for m in sums}


def _float_weight(conv: QConvBNAct) -> torch.Tensor:
    """The folded weight before quantization (what `folded().weight` approximates)."""
    w = conv.conv.weight
    return w if conv.bn is None else w * conv._bn_scale()[0].view(-1, 1, 1, 1)


@torch.no_grad()
def correct_biases(means: dict[QConvBNAct, torch.Tensor]) -> dict[QConvBNAct, torch.Tensor]:
    """bias -= (W_q - W) E[x] for each conv; returns the corrections (added to the folded bias)."""
    out = {}
    for conv, mean in means.items():
        err = conv.folded().weight - _float_weight(conv)
        shift = F.conv2d(mean.view(1, -1, 1, 1), err.sum((2, 3), keepdim=True), groups=conv.conv.groups).view(-1)
        target = conv.bn.bias if conv.bn is not None else conv.conv.bias
        target.sub_(shift)
        out[conv] = -shift
    return out


def bias_correction(model: torch.nn.Module, batches: Iterable[torch.Tensor], device: str | torch.device = "cpu") -> int:
    """Measure input means on `batches` and correct every quantized conv; returns the convs corrected."""
    return len(correct_biases(input_means(model, batches, device)))
