"""Learned rounding for post-training quantization: each block's convs jointly (`compress.quant.brecq`, with
`RoundingConfig.blocks`), every other eligible conv alone (`compress.quant.adaround`), in network order, each fed
its input in the quantized model as fitted so far. `learn_rounding` is what `quantize` calls."""
from __future__ import annotations

import logging

import torch
from torch import nn

from compress.quant.adaround import RoundingConfig, _eligible, learn_layer
from compress.quant.brecq import block_error, find_blocks, fit_block

__all__ = ["learn_rounding", "learn_block"]

log = logging.getLogger(__name__)


def learn_block(float_model: nn.Module, qmodel: nn.Module, block: tuple[int, int], images: torch.Tensor,
                config: RoundingConfig, gen: torch.Generator, device: torch.device) -> dict[int, dict]:
    """Fit the block's rounding jointly and fix it, unless the block's output error ends above nearest rounding's
    (measured on up to 16 calibration images); the report gives each conv the block's errors."""
    sample = images[:16]
    before = block_error(float_model, qmodel, block, sample, device)
    with torch.enable_grad():
        codes = fit_block(float_model, qmodel, block, images, config, gen, device)
    for j, c in codes.items():
        qmodel.layers[j].fix_codes(c)
    after = block_error(float_model, qmodel, block, sample, device)
    if after > before:
        for j in codes:
            qmodel.layers[j].fixed_codes = None
    log.info("block %d-%d rounding learned: relative output error %.4f -> %.4f", *block, before, after)
    entry = {"nearest": round(before, 6), "learned": round(after, 6), "kept": "learned" if after <= before
             else "nearest", "block": list(block)}
    return {j: dict(entry) for j in codes}


def learn_rounding(float_model: nn.Module, qmodel: nn.Module, images: torch.Tensor,
                   config: RoundingConfig = RoundingConfig(), device: str | torch.device = "cpu") -> dict[int, dict]:
    """Learn the rounding of every eligible conv of `qmodel` (calibrated: its activation ranges are set), in
    layer order, on `images` (uint8 or float (N, 3, H, W)); `float_model` is the model it was prepared from.
    Returns {conv: {"nearest": relative output error, "learned": ..., "kept": ...}} on the calibration images
    (for a conv in a block: the block's output error, and "block": [first, last])."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(config.seed)
    blocks = dict(find_blocks(qmodel, config)) if config.blocks else {}
    report: dict[int, dict] = {}
    skip_to = -1
    for i, layer in enumerate(qmodel.layers):
        if i <= skip_to:
            continue
        if i in blocks:
            report.update(learn_block(float_model, qmodel, (i, blocks[i]), images, config, gen, device))
            skip_to = blocks[i]
        elif _eligible(layer, config):
            report[i] = learn_layer(float_model, qmodel, i, images, config, gen, device)
    if not report:
        log.warning("learned rounding: no conv with <= %d-bit symmetric weights; nothing learned", config.max_bits)
    return report
