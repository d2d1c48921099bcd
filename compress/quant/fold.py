"""BN folding: `fold_bn(conv, bn)` (pure) and `fold_model(model)` (new cfg with batch_normalize=0)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from compress.darknet.cfg import Cfg
from compress.darknet.model import DarknetModel, build_model
from compress.darknet.sections import lookup

__all__ = ["fold_bn", "fold_model", "folded_cfg"]


@torch.no_grad()
def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new conv equal to bn(conv(x)) in eval mode: W' = W g, b' = beta + (b - mu) g, g = gamma / sqrt(var + eps)."""
    g = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    out = out.to(device=conv.weight.device, dtype=conv.weight.dtype)
    out.weight.copy_(conv.weight * g.view(-1, 1, 1, 1))
    b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    out.bias.copy_(bn.bias + (b - bn.running_mean) * g)
    return out


def folded_cfg(cfg: Cfg) -> Cfg:
    """The same network with every `batch_normalize=1` conv rewritten as `batch_normalize=0`."""
    blocks = [b.replace(batch_normalize=0) if lookup(b).conv and b.get_int("batch_normalize", 0) else b
              for b in cfg.blocks]
    return cfg.with_blocks(blocks)


@torch.no_grad()
def fold_model(model: DarknetModel) -> DarknetModel:
    """A new DarknetModel (new cfg, batch_normalize=0) whose eval output equals `model`'s."""
    new = build_model(folded_cfg(model.cfg)).to(next(model.parameters()).device)
    for section, old_layer, new_layer in zip(model.graph.sections, model.layers, new.layers):
        if section.conv and old_layer.bn is not None:
            folded = fold_bn(old_layer.conv, old_layer.bn)
            new_layer.conv.weight.copy_(folded.weight)
            new_layer.conv.bias.copy_(folded.bias)
        else:
            new_layer.load_state_dict(copy.deepcopy(old_layer.state_dict()))
    new.header = model.header
    return new.eval()
