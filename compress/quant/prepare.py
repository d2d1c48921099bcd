"""Fake-quant models: `prepare_qat` swaps convs for fake-quant ones (`QATModel`), `calibrate` sets activation
ranges, `convert` freezes them, `to_darknet` folds and writes weights on the quantization grid.

Example:
    >>> qmodel = prepare_qat(model, GoogleConfig(bits=8))
    >>> calibrate(qmodel, batches)
    >>> compress.save(qmodel, "out.cfg", "out.weights")   # folded, weights on the int8 grid
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Iterable

import torch
from torch import nn

from compress.base.errors import QuantError
from compress.darknet.finite import describe_layer, first_nonfinite_output
from compress.darknet.layers import ConvBNAct
from compress.darknet.model import DarknetModel, build_model
from compress.quant.config import DorefaConfig, GoogleConfig, LayerQuant, QuantConfig
from compress.quant.fake_quant import ActQuant
from compress.quant.fold import folded_cfg
from compress.quant.modules import QConvBNAct, QuantOut
from compress.data.dataset import to_input

__all__ = ["prepare_qat", "calibrate", "convert", "to_darknet", "QATModel", "edge_convs", "freeze_bn",
           "freeze_observers", "set_act_drop"]

log = logging.getLogger(__name__)


class QATModel(DarknetModel):
    """A DarknetModel whose convs are `QConvBNAct`; `compress.save` writes it through `to_darknet()`."""

    qconfig: QuantConfig

    def to_darknet(self) -> DarknetModel:
        return to_darknet(self)


def edge_convs(model: DarknetModel) -> set[int]:
    """The first conv and the convs that feed a detection head (the first/last policy applies to them)."""
    convs = [i for i, section in enumerate(model.graph.sections) if section.conv]
    heads = {p for h in model.graph.heads for p in model.graph.inputs[h]}
    return ({convs[0]} if convs else set()) | (heads & set(convs))


def prepare_qat(model: DarknetModel, config: QuantConfig, skip: Iterable[int] | None = None) -> QATModel:
    """A fake-quant copy of `model` (the input is not modified).

    Args:
        model: float model (BN convs keep their BN; it is folded per `config.bn_fold`).
        config: `DorefaConfig` or `GoogleConfig`.
        skip: conv indices kept at `config.first_last_bits` (default: first conv and head convs).
    """
    if not isinstance(config, (DorefaConfig, GoogleConfig)):
        raise QuantError(f"{type(config).__name__} is not a quantization config; use DorefaConfig or GoogleConfig")
    q = copy.deepcopy(model)
    q.__class__ = QATModel  # same layout, adds to_darknet()
    q.qconfig = config
    edges = edge_convs(model) if skip is None else set(skip)
    g, momentum = model.graph, config.ema_momentum
    head_inputs = {p for h in g.heads for p in g.inputs[h]}
    sources: dict[int, ActQuant | None] = {-1: None}
    for i, layer in enumerate(q.layers):
        srcs, section = g.inputs[i], g.sections[i]
        if section.conv:
            spec = config.bits_of(i, config.layer(i in edges))
            if i in head_inputs:  # head maps stay float: the [yolo] decode runs in float
                spec = dataclasses.replace(spec, a_bits=None)
            q.layers[i] = _make_qconv(layer, spec, sources.get(srcs[0]), srcs[0], config)
            sources[i] = q.layers[i].act_quant
            continue
        rule = section.quant(len(srcs))  # the section's rule: keep its input's grid, a new observer, or float
        if rule == "keep" and sources.get(srcs[0]) is not None:
            q.layers[i] = QuantOut(layer, shared=sources[srcs[0]])
        elif rule == "new":
            q.layers[i] = QuantOut(layer, quant=ActQuant(config.layer(False).a_bits, momentum, config.pow2,
                                                         config.pow2_rounding, symmetric=_symmetric(config)))
        sources[i] = q.layers[i].source if isinstance(q.layers[i], QuantOut) else None
    log.info("prepared %s quantization: %d convs, edges %s", config.method,
             sum(isinstance(m, QConvBNAct) for m in q.layers), sorted(edges))
    return q


def _make_qconv(layer: ConvBNAct, spec: LayerQuant, src: ActQuant | None, producer: int,
                config: QuantConfig) -> QConvBNAct:
    in_quant = None
    if src is None:  # float input: quantize it here (the image has a fixed [0, 1] range)
        fixed = (0.0, 1.0) if producer < 0 else None
        in_quant = ActQuant(8, config.ema_momentum, config.pow2, config.pow2_rounding, fixed, _symmetric(config))
    return QConvBNAct(layer, spec, in_quant, src)


def _symmetric(config: QuantConfig) -> bool:
    return config.act_scheme == "symmetric"


@torch.no_grad()
def calibrate(model: QATModel, batches: Iterable[torch.Tensor], device: str | torch.device = "cpu") -> int:
    """Post-training calibration: run `batches` (uint8 loader batches or floats in [0, 1]) with only the observers in
    training mode (BN keeps its running statistics). Returns the number of images seen."""
    model.eval()
    observers = [m for m in model.modules() if isinstance(m, ActQuant)]
    for m in observers:
        m.train()
    seen = 0
    try:
        for imgs in batches:
            x = to_input(imgs, device)  # uint8 loader batches -> float [0, 1]
            out = model(x)
            if not bool(torch.isfinite(out).all()):  # ranges of NaN would "verify" at 0 vs 0: refuse before writing
                i = first_nonfinite_output(model, x)  # observers still observing: the same forward again
                where = describe_layer(model, i) if i is not None else "the model"
                raise QuantError(f"calibration: {where} outputs NaN/Inf on the calibration images; the model "
                                 "cannot be quantized; check that layer's weights and cfg values")
            seen += imgs.shape[0]
    finally:
        model.eval()
    if not seen:
        raise QuantError("calibration saw no images; check --data (it has no validation images?)")
    return seen


def freeze_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, QConvBNAct):
            m.freeze_bn()


def freeze_observers(model: nn.Module) -> None:
    """Stop every activation observer (ranges fixed; QAT continues against them, Jacob et al. 2018)."""
    for m in model.modules():
        if isinstance(m, ActQuant):
            m.stop_observing()


def set_act_drop(model: nn.Module, p: float) -> None:
    """QDrop (Wei et al., ICLR 2022): in training, each activation element skips its fake quantization with
    probability `p`, so the weights also fit float activations (the Darknet pair has no activation
    quantization) and settle where quantization noise matters less. 0 turns it off."""
    for m in model.modules():
        if isinstance(m, ActQuant):
            m.drop = float(p)


def convert(model: QATModel) -> QATModel:
    """A frozen eval copy: BN folded with running statistics, observers off (scales fixed)."""
    frozen = copy.deepcopy(model).eval()
    freeze_bn(frozen)
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


@torch.no_grad()
def to_darknet(model: QATModel) -> DarknetModel:
    """Folded Darknet model (`batch_normalize=0`) whose conv weights are the dequantized codes."""
    out = build_model(folded_cfg(model.cfg)).to(next(model.parameters()).device)
    for src, dst in zip(model.layers, out.layers):
        if isinstance(src, QConvBNAct):
            f = src.folded()
            dst.conv.weight.copy_(f.weight)
            dst.conv.bias.copy_(f.bias)
        else:
            inner = src.layer if isinstance(src, QuantOut) else src
            dst.load_state_dict(copy.deepcopy(inner.state_dict()))
    out.header = model.header
    return out.eval()
