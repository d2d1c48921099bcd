"""Learned weight rounding for post-training quantization (AdaRound, Nagel et al. 2020, "Up or Down?").

Rounding every weight to the nearest grid point minimises the weight error, not the layer's output error. AdaRound
learns, per weight, whether to round down or up: codes = clamp(floor(w / s) + h(V), qmin, qmax) with h a rectified
sigmoid, V fitted so the quantized layer reproduces the float layer's output on unlabeled calibration images, and a
regulariser (annealed from beta 20 to 2) that drives every h to 0 or 1. The scale s stays the one nearest rounding
uses (MSE clip, pow2, safe range), so only the codes change and every artifact takes them as they are.

Layer by layer, in network order ("asymmetric reconstruction"): the input is what the quantized model, with the
rounding learned so far and its activation quantizers, feeds the layer; the target is the float model's output of
that layer (after its activation). Convolutions are local, so each step fits a random window of the output maps of
a few images: a step costs the same at 320 and 608. `learn_layer` does one conv; `compress.quant.reconstruct`
walks the network (and hands blocks to `compress.quant.brecq`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compress.base.checks import check_range
from compress.base.errors import QuantError
from compress.data.dataset import to_input
from compress.quant.modules import QConvBNAct

__all__ = ["RoundingConfig", "learn_layer", "fit_layer", "layer_error", "regulariser", "ROUNDINGS", "ROUNDING_STEPS",
           "MIXED_ROUNDING_STEPS"]

log = logging.getLogger(__name__)

# learned: layer by layer; block: each block's convs jointly (compress.quant.brecq), layer by layer outside blocks
ROUNDINGS = ("nearest", "learned", "block")
# Adam steps per layer by default: uniform widths, and mixed precision (measured better there: README, issue 24)
ROUNDING_STEPS, MIXED_ROUNDING_STEPS = 300, 600
_ZETA, _GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (Louizos et al. 2018, as in AdaRound)


@dataclass(frozen=True)
class RoundingConfig:
    """How the rounding of each layer is learned (sized for a 2-core CPU: 300 steps take ~3-8 min on yolov4-tiny)."""
    iters: int = ROUNDING_STEPS  # Adam steps per layer
    batch: int = 8              # images per step
    window: int = 24            # output rows/columns per step (a random crop of the layer's output maps)
    lr: float = 1e-2
    reg: float = 0.01           # weight of the rounding regulariser against the relative output error
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2         # share of the steps before the regulariser starts
    max_bits: int = 6           # layers with more weight bits keep nearest rounding (nothing to gain at 8)
    seed: int = 0
    blocks: bool = False        # fit each block's convs jointly to the block's output (BRECQ)
    block_window: int = 32      # block reconstruction: input rows/columns per step

    def __post_init__(self) -> None:
        check_range("--rounding-iters", self.iters, 1, error=QuantError)
        check_range("rounding batch", self.batch, 1, error=QuantError)
        check_range("rounding window", self.window, 1, error=QuantError)
        check_range("block window", self.block_window, 1, error=QuantError)
        check_range("rounding lr", self.lr, 0, lo_open=True, error=QuantError)
        if not 0.0 <= self.warmup < 1.0:
            raise QuantError(f"rounding warmup={self.warmup} must be in [0, 1)")


class _Stop(Exception):
    """Raised by a capture hook: the rest of the network is not needed."""


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)


def _init_v(rest: torch.Tensor) -> torch.Tensor:
    """V with h(V) = rest (the fractional part of w / s): learning starts at the float weight."""
    p = ((rest - _GAMMA) / (_ZETA - _GAMMA)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


@torch.no_grad()
def _capture(model: nn.Module, index: int, images: torch.Tensor, output: bool, device: torch.device,
             chunk: int = 8) -> torch.Tensor:
    """Layer `index`'s input (its first argument) or output for every image, running the model only that far."""
    got: list[torch.Tensor] = []

    def pre(_m: nn.Module, args: tuple) -> None:
        got.append(args[0].detach())
        raise _Stop

    def post(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        got.append(out.detach())
        raise _Stop

    layer = model.layers[index]
    handle = layer.register_forward_hook(post) if output else layer.register_forward_pre_hook(pre)
    model.eval()
    try:
        for k in range(0, len(images), chunk):
            try:
                model(to_input(images[k:k + chunk], device), raw=True)
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(got)


@torch.no_grad()
def _capture_many(model: nn.Module, ids: list[int], images: torch.Tensor, device: torch.device,
                  chunk: int = 8) -> dict[int, torch.Tensor]:
    """The outputs of layers `ids` (-1: the input image as the network sees it) for every image, running the
    model only as far as the last of them."""
    got: dict[int, list[torch.Tensor]] = {i: [] for i in ids}
    last = max(ids)

    def hook(i: int):
        def post(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            got[i].append(out.detach())
            if i == last:
                raise _Stop
        return post

    handles = [model.layers[i].register_forward_hook(hook(i)) for i in ids if i >= 0]
    model.eval()
    try:
        for k in range(0, len(images), chunk):
            x = to_input(images[k:k + chunk], device)
            if -1 in got:
                got[-1].append(model._image(x))
            if last < 0:
                continue
            try:
                model(x, raw=True)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return {i: torch.cat(t) for i, t in got.items()}


def _float_folded(layer: QConvBNAct) -> tuple[torch.Tensor, torch.Tensor]:
    """The folded float weight and bias the quantizer rounds (BN folded with running statistics)."""
    if layer.bn is None:
        return layer.conv.weight.detach(), layer.conv.bias.detach()
    g, b = layer._bn_scale()
    return (layer.conv.weight * g.view(-1, 1, 1, 1)).detach(), b.detach()


def _layer_out(layer: QConvBNAct, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, padded: bool) -> torch.Tensor:
    """The quantized layer's output before its output quantizer (x: its raw input; `padded`: zero padding applied)."""
    c = layer.conv
    if layer.in_quant is not None and not padded:
        x = layer.in_quant(x)
    y = F.conv2d(x, w, b, c.stride, 0 if padded else c.padding, c.dilation, c.groups)
    if layer.pre_quant is not None:
        y = layer.pre_quant(y)
    return layer.act(y)


def _window(x: torch.Tensor, y: torch.Tensor, layer: QConvBNAct, config: RoundingConfig,
            gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of images and a random window of the output, with the input rows/cols that feed it (input
    quantized, then zero-padded like the conv pads)."""
    c = layer.conv
    idx = torch.randint(0, x.shape[0], (min(config.batch, x.shape[0]),), generator=gen)
    xb = x[idx]
    if layer.in_quant is not None:
        xb = layer.in_quant(xb)
    ph, pw = c.padding
    xb = F.pad(xb, (pw, pw, ph, ph))
    (sh, sw), (dh, dw), (kh, kw) = c.stride, c.dilation, c.kernel_size
    oh, ow = min(config.window, y.shape[2]), min(config.window, y.shape[3])
    oy = int(torch.randint(0, y.shape[2] - oh + 1, (1,), generator=gen))
    ox = int(torch.randint(0, y.shape[3] - ow + 1, (1,), generator=gen))
    xs = xb[:, :, oy * sh: oy * sh + (oh - 1) * sh + (kh - 1) * dh + 1,
            ox * sw: ox * sw + (ow - 1) * sw + (kw - 1) * dw + 1]
    return xs, y[idx, :, oy:oy + oh, ox:ox + ow]


def regulariser(h: torch.Tensor, step: int, warm: int, config: RoundingConfig) -> torch.Tensor:
    """AdaRound's rounding regulariser, mean over the weights: zero where h is 0 or 1; beta anneals from
    config.beta[0] (only h near 0.5 is pushed) to config.beta[1] (every h)."""
    beta = config.beta[0] + (config.beta[1] - config.beta[0]) * (step - warm) / max(config.iters - warm, 1)
    return (1 - (2 * h - 1).abs().pow(beta)).mean()


def fit_layer(layer: QConvBNAct, x: torch.Tensor, y: torch.Tensor, config: RoundingConfig,
              gen: torch.Generator) -> torch.Tensor:
    """Learn `layer`'s rounding so that it maps `x` (its input in the quantized model) to `y` (the float layer's
    output); returns the integer codes (not yet fixed in the layer)."""
    w, b = _float_folded(layer)
    qp = layer._nearest(w).qparams
    s, _ = qp.view(w.dim())
    base = torch.floor(w / s)
    v = nn.Parameter(_init_v(w / s - base))
    opt = torch.optim.Adam([v], lr=config.lr)
    warm = int(config.warmup * config.iters)
    for step in range(config.iters):
        xs, ys = _window(x, y, layer, config, gen)
        h = _h(v)
        wq = torch.clamp(base + h, qp.qmin, qp.qmax) * s
        rec = (_layer_out(layer, xs, wq, b, padded=True) - ys).pow(2).mean() / ys.pow(2).mean().clamp_min(1e-12)
        loss = rec
        if step >= warm:
            loss = loss + config.reg * regulariser(h, step, warm, config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return torch.clamp(base + (_h(v) >= 0.5).float(), qp.qmin, qp.qmax).long()


@torch.no_grad()
def layer_error(layer: QConvBNAct, x: torch.Tensor, y: torch.Tensor) -> float:
    """Relative squared output error of the layer as it quantizes now (its fixed codes, or nearest rounding)."""
    wq = layer.folded()
    out = _layer_out(layer, x, wq.weight, _float_folded(layer)[1], padded=False)
    return float((out - y).pow(2).mean() / y.pow(2).mean().clamp_min(1e-12))


def _eligible(layer: nn.Module, config: RoundingConfig) -> bool:
    return isinstance(layer, QConvBNAct) and layer.spec.w_scheme == "symmetric" and \
        layer.spec.w_bits <= config.max_bits


def learn_layer(float_model: nn.Module, qmodel: nn.Module, i: int, images: torch.Tensor, config: RoundingConfig,
                gen: torch.Generator, device: torch.device) -> dict:
    """Learn conv i's rounding on `images` and fix it, unless it ends with a larger output error than nearest
    rounding; returns {"nearest": error, "learned": error, "kept": ...} (relative output error)."""
    layer = qmodel.layers[i]
    x = _capture(qmodel, i, images, False, device)
    y = _capture(float_model, i, images, True, device)
    with torch.enable_grad():
        codes = fit_layer(layer, x, y, config, gen)
    before = layer_error(layer, x, y)
    layer.fix_codes(codes)
    after = layer_error(layer, x, y)
    if after > before:  # a short schedule can end worse than nearest on some layer: keep nearest there
        layer.fixed_codes = None
    log.info("layer %d rounding learned: relative output error %.4f -> %.4f", i, before, after)
    return {"nearest": round(before, 6), "learned": round(after, 6), "kept": "learned" if after <= before
            else "nearest"}
