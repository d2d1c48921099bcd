"""Fake-quantization primitives: `round_ste` (defined here only), affine fake quant, EMA observers,
weight quantizers (registry by scheme name) and power-of-two scale rounding.

Conventions (match ONNX QuantizeLinear, so torch and onnxruntime agree): `q = clamp(round(x / s) + z, qmin, qmax)`,
`x_hat = (q - z) * s`, round half to even, float32 scales, integer-valued zero points.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["round_ste", "fake_quant", "quantize", "pow2_round", "pow2_exponent", "QParams", "WeightQ",
           "WEIGHT_QUANTIZERS", "register_weight_quantizer", "quantize_weight", "affine_qparams", "ActQuant",
           "FakeQuantFn"]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize-dequantize with STE; the gradient is zero outside the clamp range."""
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Integer codes (as an int64 tensor) for `x`."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax).long()


def pow2_round(scale: torch.Tensor, rounding: str = "ceil") -> torch.Tensor:
    """Round scales to powers of two. 'ceil' never shrinks the range (never clips); 'nearest' may clip."""
    log = torch.log2(scale)
    return torch.exp2(torch.ceil(log) if rounding == "ceil" else torch.round(log))


def pow2_exponent(scale: torch.Tensor) -> torch.Tensor:
    """n with scale = 2^-n (integers for pow2 scales)."""
    return (-torch.log2(scale)).round().long()


@dataclass(frozen=True)
class QParams:
    """Frozen quantization parameters of one tensor (per-tensor: 0-d scale; per-channel: (C,) along axis)."""
    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    axis: int | None = None

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    def view(self, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.axis is None:
            return self.scale, self.zero_point
        shape = [1] * ndim
        shape[self.axis] = -1
        return self.scale.view(shape), self.zero_point.view(shape)

    def to_dict(self) -> dict:
        d = {"scale": self.scale.tolist(), "zero_point": self.zero_point.long().tolist(), "qmin": self.qmin,
             "qmax": self.qmax}
        if self.axis is not None:
            d["axis"] = self.axis
        return d


class Holder:
    """Opaque to the ONNX tracer (dataclasses are not): constants reach a symbolic as Python objects."""

    def __init__(self, value: object) -> None:
        self.value = value


class FakeQuantFn(torch.autograd.Function):
    """Eval-time fake quant whose ONNX symbolic is QuantizeLinear -> (Clip) -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, held: Holder) -> torch.Tensor:  # type: ignore[override]
        qp = held.value
        if qp.axis is None:  # Python floats: the tracer cannot reuse one constant tensor across calls
            s, z = float(qp.scale), float(qp.zero_point)
            return (torch.clamp(torch.round(x / s) + z, qp.qmin, qp.qmax) - z) * s
        s, z = qp.view(x.dim())
        return (torch.clamp(torch.round(x / s) + z, qp.qmin, qp.qmax) - z) * s

    @staticmethod
    def symbolic(g, x, held: Holder):  # type: ignore[no-untyped-def]
        from .onnx_qdq import qdq_symbolic
        return qdq_symbolic(g, x, held.value)


@dataclass(frozen=True)
class WeightQ:
    """Quantized weight: dequantized tensor (STE gradients), integer codes and per-channel scales."""
    dequant: torch.Tensor
    codes: torch.Tensor
    qparams: QParams


WeightQuantizer = Callable[[torch.Tensor, int, bool, bool, str], WeightQ]
WEIGHT_QUANTIZERS: dict[str, WeightQuantizer] = {}


def register_weight_quantizer(name: str) -> Callable[[WeightQuantizer], WeightQuantizer]:
    def deco(fn: WeightQuantizer) -> WeightQuantizer:
        WEIGHT_QUANTIZERS[name] = fn
        return fn
    return deco


def quantize_weight(w: torch.Tensor, scheme: str, bits: int, per_channel: bool, pow2: bool, rounding: str) -> WeightQ:
    return WEIGHT_QUANTIZERS[scheme](w, bits, per_channel, pow2, rounding)


def _absmax(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    a = w.detach().abs().flatten(1).amax(1) if per_channel else w.detach().abs().max().expand(w.shape[0])
    return a.clamp_min(1e-8)


@register_weight_quantizer("symmetric")
def symmetric_weight(w: torch.Tensor, bits: int, per_channel: bool, pow2: bool, rounding: str) -> WeightQ:
    """Signed symmetric codes in [-(2^(b-1)-1), 2^(b-1)-1] (int8: [-127, 127]), zero point 0."""
    qmax = 2 ** (bits - 1) - 1
    scale = _absmax(w, per_channel) / qmax
    if pow2:
        scale = pow2_round(scale, rounding)
    qp = QParams(scale.float(), torch.zeros_like(scale), -qmax, qmax, axis=0)
    s, z = qp.view(w.dim())
    return WeightQ(fake_quant(w, s, z, -qmax, qmax), quantize(w.detach(), s, z, -qmax, qmax), qp)


@register_weight_quantizer("dorefa")
def dorefa_weight(w: torch.Tensor, bits: int, per_channel: bool, pow2: bool, rounding: str) -> WeightQ:
    """DoReFa: u = tanh(w) / (2 max|tanh w|) + 1/2, c = round((2^k - 1) u) in [0, 2^k - 1] (2^k levels).

    The paper's w_q = 2c/(2^k-1) - 1 lies in [-1, 1]; we rescale by max|w| (per channel by default) so
    a pretrained model keeps its magnitudes. Stored codes are the odd integers 2c - (2^k - 1) with
    scale max|w| / (2^k - 1), i.e. w_q = scale * code, zero point 0.
    """
    n = 2 ** bits - 1
    t = torch.tanh(w)
    tmax = t.detach().abs().flatten(1).amax(1) if per_channel else t.detach().abs().max().expand(w.shape[0])
    shape = (-1,) + (1,) * (w.dim() - 1)
    u = t / (2 * tmax.clamp_min(1e-8).view(shape)) + 0.5
    c = round_ste(n * u)
    scale = _absmax(w, per_channel) / n
    if pow2:
        scale = pow2_round(scale, rounding)
    code = 2 * c - n
    qp = QParams(scale.float(), torch.zeros_like(scale), -n, n, axis=0)
    return WeightQ(code * scale.view(shape), code.detach().round().long(), qp)


def affine_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, pow2: bool, rounding: str) -> QParams:
    """Asymmetric unsigned params for the range [lo, hi] (widened to hold 0). The zero point is an integer in
    [0, 2^b - 1], so 0.0 is exact; it is nudged inside the window that covers [lo, hi] when there is one
    (always, in pow2 mode with 'ceil' rounding).
    """
    qmin, qmax = 0, 2 ** bits - 1
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    if pow2:  # one spare step so an integer zero point always fits: with 'ceil' nothing in [lo, hi] clips
        scale = pow2_round(((hi - lo) / (qmax - qmin - 1)).clamp_min(1e-8), rounding)
    else:  # standard nudging (TF / Jacob et al.): the range ends may move by < half a step
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-8)
    ideal = qmin - lo / scale
    zp = torch.round(ideal)
    z_lo, z_hi = torch.ceil(ideal - 1e-6), torch.floor(qmax - hi / scale + 1e-6)
    if z_lo <= z_hi:
        zp = torch.clamp(zp, z_lo, z_hi)
    zp = torch.clamp(zp, qmin, qmax)
    return QParams(scale.float().reshape(()), zp.float().reshape(()), qmin, qmax)


class ActQuant(nn.Module):
    """Per-tensor asymmetric activation fake quant with an EMA min/max observer.

    The observer updates only in training mode (QAT, or `calibrate()`, which puts only these modules in
    training mode); the first observed batch initialises the range. `fixed=(lo, hi)` pins the range
    (used for the [0, 1] image input).
    """

    def __init__(self, bits: int = 8, momentum: float = 0.1, pow2: bool = False, rounding: str = "ceil",
                 fixed: tuple[float, float] | None = None) -> None:
        super().__init__()
        self.bits, self.momentum, self.pow2, self.rounding = bits, momentum, pow2, rounding
        self.fixed = fixed is not None
        lo, hi = fixed or (0.0, 0.0)
        self.register_buffer("min_val", torch.tensor(float(lo)))
        self.register_buffer("max_val", torch.tensor(float(hi)))
        self.register_buffer("initialized", torch.tensor(self.fixed))
        self._frozen: QParams | None = None

    def freeze_params(self) -> None:
        """Fix the params as constants (computed once, outside any trace); the observer stops."""
        self._frozen = self.qparams() if bool(self.initialized) else None

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().min().float(), x.detach().max().float()
        if not bool(self.initialized):
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
            self.initialized.fill_(True)
        else:
            self.min_val.lerp_(lo, self.momentum)
            self.max_val.lerp_(hi, self.momentum)

    def qparams(self) -> QParams:
        return affine_qparams(self.min_val, self.max_val, self.bits, self.pow2, self.rounding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._frozen is not None:
            return FakeQuantFn.apply(x, Holder(self._frozen))
        if self.training and not self.fixed:
            self.observe(x)
        if not bool(self.initialized):
            return x
        qp = self.qparams()
        if self.training or x.requires_grad:
            return fake_quant(x, qp.scale, qp.zero_point, qp.qmin, qp.qmax)
        return FakeQuantFn.apply(x, Holder(qp))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, range=({float(self.min_val):.4g}, {float(self.max_val):.4g}), pow2={self.pow2}"

    def to_dict(self) -> dict:
        qp = self.qparams()
        d = {"bits": self.bits, "min": float(self.min_val), "max": float(self.max_val), **qp.to_dict()}
        if self.pow2:
            d["exponent"] = int(pow2_exponent(qp.scale))
        return d


def bits_of(qmin: int, qmax: int) -> int:
    return int(math.log2(qmax - qmin + 1) + 0.5)
