"""Weight quantizers, a registry by scheme name: "symmetric" (Jacob et al. / Google, k bits) and "dorefa".

Every quantizer returns the dequantized weight (STE gradients), the integer codes and per-output-channel
scales with zero point 0, so `codes * scale` is exactly the weight inference uses.

Weights safe on x86 CPUs without VNNI: onnxruntime's u8 x s8 kernels add pairs of u8 x s8 products of one
output channel in int16 (VPMADDUBSW), which saturates beyond 32767. Two ways to make that impossible:
`max_code` caps every |code| (63: 2 * 255 * 63 = 32130), `pair_max` caps the sum of each channel's two
largest |codes| (128: 255 * 128 = 32640 for any pairing), which keeps [-127, 127] codes and is finer
wherever a channel's largest weight stands out. `w_clip="mse"` picks each channel's clipping range that minimises the squared
error instead of max|w| (the calibration-only answer for 4-bit weights).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from compress.base.errors import QuantError
from compress.quant.fake_quant import QParams, fake_quant, pow2_round, quantize, round_ste

__all__ = ["WeightQ", "WEIGHT_QUANTIZERS", "register_weight_quantizer", "quantize_weight", "symmetric_weight",
           "dorefa_weight", "W_CLIPS", "REDUCED_MAX_CODE", "PAIR_SUM_MAX"]

REDUCED_MAX_CODE = 63
PAIR_SUM_MAX = 128  # 255 * 128 = 32640 <= 32767
W_CLIPS = ("max", "mse")


@dataclass(frozen=True)
class WeightQ:
    """Quantized weight: dequantized tensor (STE gradients), integer codes and per-channel scales."""
    dequant: torch.Tensor
    codes: torch.Tensor
    qparams: QParams


WeightQuantizer = Callable[..., WeightQ]
WEIGHT_QUANTIZERS: dict[str, WeightQuantizer] = {}


def register_weight_quantizer(name: str) -> Callable[[WeightQuantizer], WeightQuantizer]:
    """Quantizers take (w, bits, per_channel, pow2, rounding, max_code=None, w_clip="max", pair_max=None)."""
    def deco(fn: WeightQuantizer) -> WeightQuantizer:
        WEIGHT_QUANTIZERS[name] = fn
        return fn
    return deco


def quantize_weight(w: torch.Tensor, scheme: str, bits: int, per_channel: bool, pow2: bool, rounding: str,
                    max_code: int | None = None, w_clip: str = "max", pair_max: int | None = None) -> WeightQ:
    return WEIGHT_QUANTIZERS[scheme](w, bits, per_channel, pow2, rounding, max_code=max_code, w_clip=w_clip,
                                     pair_max=pair_max)


def _shape(w: torch.Tensor) -> tuple[int, ...]:
    return (-1,) + (1,) * (w.dim() - 1)


def _absmax(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    a = w.detach().abs().flatten(1).amax(1) if per_channel else w.detach().abs().max().expand(w.shape[0])
    return a.clamp_min(1e-8)


@torch.no_grad()
def _mse_scale(w: torch.Tensor, absmax: torch.Tensor, qmax: int, per_channel: bool, pow2: bool,
               steps: int = 40) -> torch.Tensor:
    """Per channel (or tensor), the scale with the least squared rounding+clip error: clips in [0.3, 1] *
    max|w|, or with `pow2` the powers of two from the one covering max|w| down four steps (so rounding the
    scale to a power of two afterwards cannot undo the clip)."""
    flat = w.detach().flatten(1) if per_channel else w.detach().reshape(1, -1)
    top = absmax[:1] if not per_channel else absmax
    if pow2:
        ceil = torch.exp2(torch.ceil(torch.log2(top / qmax)))
        candidates = [ceil * 2.0 ** -k for k in range(5)]
    else:
        candidates = [top * r / qmax for r in torch.linspace(0.3, 1.0, steps, device=w.device)]
    best, best_err = candidates[0].clone(), torch.full_like(top, float("inf"))
    for cand in candidates:
        s = cand.view(-1, 1)
        err = ((torch.clamp(torch.round(flat / s), -qmax, qmax) * s - flat) ** 2).sum(1)
        better = err < best_err
        best, best_err = torch.where(better, cand, best), torch.where(better, err, best_err)
    return best if per_channel else best.expand(w.shape[0])


def _pair_scale(w: torch.Tensor, pair_max: int, per_channel: bool) -> torch.Tensor:
    """The smallest scale whose two largest |codes| of each channel sum to <= pair_max: (|w|(1) + |w|(2)) /
    (pair_max - 1) (rounding adds at most 1 to the sum). `w` is already clipped to its range."""
    flat = w.detach().abs().flatten(1)
    top2 = flat.topk(2, dim=1).values.sum(1) if flat.shape[1] > 1 else flat[:, 0]
    need = top2 / (pair_max - 1)
    return need if per_channel else need.max().expand(w.shape[0])


@register_weight_quantizer("symmetric")
def symmetric_weight(w: torch.Tensor, bits: int, per_channel: bool, pow2: bool, rounding: str,
                     max_code: int | None = None, w_clip: str = "max", pair_max: int | None = None) -> WeightQ:
    """Signed symmetric codes in [-q, q], q = 2^(b-1) - 1 (or `max_code` if smaller), zero point 0; with
    `pair_max` the scale also grows until each channel's two largest |codes| sum to <= pair_max."""
    qmax = 2 ** (bits - 1) - 1
    qmax = min(qmax, max_code) if max_code else qmax
    top = _absmax(w, per_channel)
    scale = _mse_scale(w, top, qmax, per_channel, pow2) if w_clip == "mse" else top / qmax
    if pow2:
        scale = pow2_round(scale, rounding)  # a no-op after the pow2 MSE search
    if pair_max is not None and 2 * qmax > pair_max:
        # the bound holds for the codes actually written: weights beyond the clip are clipped first (their
        # codes would otherwise grow with the pair scale), then the two largest clipped |w| size the scale
        w = _clip(w, scale * qmax)
        scale = torch.maximum(scale, _pair_scale(w, pair_max, per_channel))
        if pow2:
            scale = pow2_round(scale, "ceil")  # a smaller pow2 scale would break the bound
    qp = QParams(scale.float(), torch.zeros_like(scale), -qmax, qmax, axis=0)
    s, z = qp.view(w.dim())
    return WeightQ(fake_quant(w, s, z, -qmax, qmax), quantize(w.detach(), s, z, -qmax, qmax), qp)


def _clip(w: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """w clamped to [-top, top] per output channel (zero gradient outside, as the clip has)."""
    t = top.view(_shape(w)).to(w.dtype)
    return torch.minimum(torch.maximum(w, -t), t)


def _odd_round(x: torch.Tensor) -> torch.Tensor:
    """Nearest odd integer (STE)."""
    return 2 * round_ste((x - 1) / 2) + 1


@register_weight_quantizer("dorefa")
def dorefa_weight(w: torch.Tensor, bits: int, per_channel: bool, pow2: bool, rounding: str,
                  max_code: int | None = None, w_clip: str = "max", pair_max: int | None = None) -> WeightQ:
    """DoReFa (Zhou et al. 2016) on the per-channel normalised weight: t = tanh(w / max|w|),
    u = t / (2 max|t|) + 1/2, c = round((2^k - 1) u) in [0, 2^k - 1] (2^k levels), code = 2c - (2^k - 1)
    (odd integers in [-(2^k - 1), 2^k - 1]).

    Normalising first keeps tanh's input in [-1, 1] whatever BN folding did to the magnitudes (folded
    weights reach |w| ~ 20, where tanh saturates). The scale is each channel's least-squares fit
    sum(w code) / sum(code^2), which removes the gain tanh adds to small weights. With `pow2` the scale is
    rounded to a power of two and the weights are re-quantized onto that grid (odd codes, clamped), so
    pow2 never rescales a weight by more than one grid step.
    """
    n = 2 ** bits - 1
    max_code = max_code if pair_max is None else (max_code or pair_max // 2)  # odd codes: no finer pair bound
    if max_code is not None and n > max_code:
        raise QuantError(f"DoReFa {bits}-bit codes reach +-{n}, beyond the +-{max_code} allowed by reduced-range "
                         "weights; use --bits <= 6, --method google, or --full-range")
    shape = _shape(w)
    top = _absmax(w, per_channel).view(shape)
    t = torch.tanh(w / top)
    tmax = t.detach().abs().flatten(1).amax(1) if per_channel else t.detach().abs().max().expand(w.shape[0])
    code = 2 * round_ste(n * (t / (2 * tmax.clamp_min(1e-8).view(shape)) + 0.5)) - n
    cd, wd = code.detach().flatten(1), w.detach().flatten(1)
    if per_channel:
        scale = (wd * cd).sum(1) / (cd * cd).sum(1).clamp_min(1e-12)
    else:
        scale = ((wd * cd).sum() / (cd * cd).sum().clamp_min(1e-12)).expand(w.shape[0])
    scale = scale.clamp_min(1e-8)
    if pow2:
        s2 = pow2_round(scale, rounding)
        code = torch.clamp(_odd_round(code * (scale / s2).view(shape)), -n, n)
        scale = s2
    qp = QParams(scale.float(), torch.zeros_like(scale), -n, n, axis=0)
    return WeightQ(code * scale.view(shape), code.detach().round().long(), qp)
