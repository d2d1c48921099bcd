"""Mixed-precision weights: measure how much each conv's low-bit weights disturb the network's output at each
width, then give each conv a width (from --bits to 8) within an average-bits budget (weighted by each conv's
weight count).

Sensitivity of conv i at b bits: the relative squared error of the raw head maps on calibration images when only
conv i's folded weights are rounded to b bits (every other weight and every activation float). Cheap (one forward
of a few images per conv and width), and it measures what matters downstream instead of the weight error alone.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from compress.base.errors import QuantError
from compress.data.dataset import to_input
from compress.quant.modules import QConvBNAct

__all__ = ["layer_sensitivity", "assign_bits", "average_bits", "HIGH_BITS"]

log = logging.getLogger(__name__)

HIGH_BITS = 8


def _heads_error(model: nn.Module, x: torch.Tensor, ref: list[torch.Tensor]) -> float:
    out = model(x, raw=True)
    num = sum(float((o - r).pow(2).sum()) for o, r in zip(out, ref))
    return num / max(sum(float(r.pow(2).sum()) for r in ref), 1e-12)


@torch.no_grad()
def layer_sensitivity(float_model: nn.Module, qmodel: nn.Module, images: torch.Tensor,
                      device: str | torch.device = "cpu") -> dict[int, float]:
    """{conv index: relative head-map error with only that conv's weights quantized as in `qmodel`} for every conv
    `qmodel` quantizes below 8 bits. `float_model` is restored afterwards."""
    float_model.eval()
    x = to_input(images, device)
    ref = float_model(x, raw=True)
    sens: dict[int, float] = {}
    for i, q in enumerate(qmodel.layers):
        if not isinstance(q, QConvBNAct) or q.spec.w_bits >= HIGH_BITS:
            continue
        conv = float_model.layers[i].conv
        saved = conv.weight.detach().clone()
        g = q._bn_scale()[0].view(-1, 1, 1, 1) if q.bn is not None else torch.ones(1)
        # the low-bit folded weight, unfolded again (a channel with gamma 0 has no output to disturb)
        conv.weight.copy_(torch.where(g != 0, q.folded().weight / g, saved))
        try:
            sens[i] = _heads_error(float_model, x, ref)
        finally:
            conv.weight.copy_(saved)
    return sens


def average_bits(bits: dict[int, int], sizes: dict[int, int]) -> float:
    """Weight-count-weighted average of the per-conv weight bits."""
    return sum(bits[i] * sizes[i] for i in bits) / max(sum(sizes[i] for i in bits), 1)


def assign_bits(sensitivity: dict[int, dict[int, float]], sizes: dict[int, int], bits: dict[int, int],
                avg_bits: float, high: int = HIGH_BITS) -> dict[int, int]:
    """Widen convs, the largest output-error reduction per added weight bit first, while the average stays
    <= `avg_bits`.

    Any width measured in `sensitivity` (or `high`, taken as error 0) may be chosen, not only `high`: one more
    bit roughly quarters a conv's error, so at a budget of half a bit per weight, widening the sensitive large
    convs by one bit removes more error than raising a few of them to 8 (yolov4-tiny at 4.5 bits: summed head
    error 0.012 against 0.025 with 8-bit only).

    Args:
        sensitivity: {conv: {bits: output error with that conv alone at those bits}} for the convs that may be
            widened; each holds its current width.
        sizes: {conv: weight count} of every quantized conv.
        bits: {conv: bits} of every quantized conv before mixing (edges already at their own width).
        avg_bits: the budget (weight-count-weighted average over every quantized conv).
    """
    out = dict(bits)
    floor = average_bits(out, sizes)
    if floor > avg_bits + 1e-9:
        raise QuantError(f"--avg-bits {avg_bits} is below the {floor:.3f} average bits the model has with every "
                         f"conv at its lowest width (first/last convs included); pass --avg-bits >= {floor:.2f}")
    budget = avg_bits * sum(sizes[i] for i in out)
    used = sum(out[i] * sizes[i] for i in out)

    def error(i: int, b: int) -> float:
        return 0.0 if b >= high else sensitivity[i][b]

    while True:
        steps = [((error(i, out[i]) - error(i, b)) / ((b - out[i]) * sizes[i]), i, b)
                 for i in sensitivity for b in {*sensitivity[i], high}
                 if b > out[i] and used + (b - out[i]) * sizes[i] <= budget]
        if not steps:
            break
        gain, i, b = max(steps)
        if gain <= 0:
            break
        used += (b - out[i]) * sizes[i]
        out[i] = b
    log.info("mixed precision: bits %s, average %.3f", dict(sorted(out.items())), average_bits(out, sizes))
    return out
