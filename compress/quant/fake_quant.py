"""Fake-quantization primitives: `round_ste` (defined here only), affine fake quant, EMA observers and
power-of-two scale rounding (the weight quantizers are in `weights`).

Conventions (match ONNX QuantizeLinear, so torch and onnxruntime agree): `q = clamp(round(x / s) + z, qmin, qmax)`,
`x_hat = (q - z) * s`, round half to even, float32 scales, integer-valued zero points.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from compress.train.distributed import group_size
from compress.quant.qdq import qdq_symbolic
from compress.quant.qparams import QParams

__all__ = ["round_ste", "fake_quant", "quantize", "pow2_round", "pow2_exponent", "QParams", "affine_qparams",
           "symmetric_qparams", "ActQuant", "FakeQuantFn"]


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
        return qdq_symbolic(g, x, held.value)


def symmetric_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, pow2: bool, rounding: str,
                      fixed: bool = False) -> QParams:
    """Signed symmetric params (zero point 0, codes in [-2^(b-1), 2^(b-1)-1]) covering max(|lo|, |hi|).

    Why signed: onnxruntime's u8 x s8 integer kernels saturate their int16 pair sums on x86 CPUs without
    VNNI (AVX2 only), s8 x s8 does not; TensorRT takes only zero point 0. A fixed range (the image input)
    rounds a pow2 scale down (2^-7 for [0, 1]): the top value clips by < one step instead of losing a bit.
    """
    qmax = 2 ** (bits - 1) - 1
    scale = (torch.maximum(lo.abs(), hi.abs()) / qmax).clamp_min(1e-8)
    if pow2:
        scale = torch.exp2(torch.floor(torch.log2(scale))) if fixed else pow2_round(scale, rounding)
    return QParams(scale.float().reshape(()), torch.zeros((), dtype=torch.float32), -qmax - 1, qmax)


def affine_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, pow2: bool, rounding: str,
                   fixed: bool = False) -> QParams:
    """Asymmetric unsigned params for the range [lo, hi] (widened to hold 0). The zero point is an integer in
    [0, 2^b - 1], so 0.0 is exact; it is nudged inside the window that covers [lo, hi] when there is one
    (always, in pow2 mode with 'ceil' rounding). A fixed range rounds a pow2 scale down (2^-8 for [0, 1]).
    """
    qmin, qmax = 0, 2 ** bits - 1
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    if pow2 and fixed:
        scale = torch.exp2(torch.floor(torch.log2(((hi - lo) / (qmax - qmin)).clamp_min(1e-8))))
    elif pow2:  # one spare step so an integer zero point always fits: with 'ceil' nothing in [lo, hi] clips
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
    """Per-tensor activation fake quant with an EMA min/max observer: signed symmetric (`symmetric=True`,
    zero point 0, int8 container) or unsigned asymmetric (uint8 container, integer zero point).

    The observer updates only in training mode (QAT, or `calibrate()`, which puts only these modules in
    training mode); the first observed batch initialises the range. `fixed=(lo, hi)` pins the range
    (used for the [0, 1] image input).
    """

    def __init__(self, bits: int = 8, momentum: float = 0.1, pow2: bool = False, rounding: str = "ceil",
                 fixed: tuple[float, float] | None = None, symmetric: bool = True) -> None:
        super().__init__()
        self.bits, self.momentum, self.pow2, self.rounding = bits, momentum, pow2, rounding
        self.symmetric = symmetric
        self.fixed = fixed is not None
        lo, hi = fixed or (0.0, 0.0)
        self.register_buffer("min_val", torch.tensor(float(lo)))
        self.register_buffer("max_val", torch.tensor(float(hi)))
        self.register_buffer("initialized", torch.tensor(self.fixed))
        self.register_buffer("observing", torch.tensor(True))  # False: QAT keeps the range fixed (late epochs)
        self._frozen: QParams | None = None
        self.drop = 0.0  # QDrop: share of elements that skip fake quantization in training (`set_act_drop`)

    def freeze_params(self) -> None:
        """Fix the params as constants (computed once, outside any trace); the observer stops."""
        self._frozen = self.qparams() if bool(self.initialized) else None

    def stop_observing(self) -> None:
        """Keep the current range for the rest of QAT (still fake-quantizing with STE gradients)."""
        self.observing.fill_(False)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        lo, hi = _global_min_max(x.detach())
        if not bool(self.initialized):
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
            self.initialized.fill_(True)
        else:
            self.min_val.lerp_(lo, self.momentum)
            self.max_val.lerp_(hi, self.momentum)

    def qparams(self) -> QParams:
        make = symmetric_qparams if self.symmetric else affine_qparams
        return make(self.min_val, self.max_val, self.bits, self.pow2, self.rounding, self.fixed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._frozen is not None:
            return FakeQuantFn.apply(x, Holder(self._frozen))
        if self.training and not self.fixed and bool(self.observing):
            self.observe(x)
        if not bool(self.initialized):
            return x
        qp = self.qparams()
        if self.training or x.requires_grad:
            y = fake_quant(x, qp.scale, qp.zero_point, qp.qmin, qp.qmax)
            if self.training and self.drop > 0:
                y = torch.where(torch.rand_like(x) < self.drop, x, y)
            return y
        return FakeQuantFn.apply(x, Holder(qp))

    def extra_repr(self) -> str:
        kind = "s" if self.symmetric else "u"
        return f"{kind}{self.bits}, range=({float(self.min_val):.4g}, {float(self.max_val):.4g}), pow2={self.pow2}"

    def to_dict(self) -> dict:
        qp = self.qparams()
        d = {"bits": self.bits, "min": float(self.min_val), "max": float(self.max_val), **qp.to_dict()}
        if self.pow2:
            d["exponent"] = int(pow2_exponent(qp.scale))
        return d


def _global_min_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """min/max of the batch; under data parallelism (a process group is up) of the whole global batch, so
    every process moves its ranges the same way (a single process with the whole batch would see the same)."""
    lo, hi = x.min().float(), x.max().float()
    if group_size() > 1:
        both = torch.stack([-lo, hi])
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        lo, hi = -both[0], both[1]
    return lo, hi


def bits_of(qmin: int, qmax: int) -> int:
    return int(math.log2(qmax - qmin + 1) + 0.5)
