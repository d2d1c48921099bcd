"""Frozen, validated quantization configs. One class per method; the method name keys the registries."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Literal, Optional, Union

from compress.base.checks import check_range
from compress.base.errors import QuantError
from compress.quant.weights import W_CLIPS

__all__ = ["ACT_SCHEMES", "SAFE_RANGES", "DorefaConfig", "GoogleConfig", "QuantConfig", "LayerQuant", "METHOD_CONFIGS", "make_config",
           "config_to_dict"]

Pow2Rounding = Literal["ceil", "nearest"]
# Activation schemes. "asymmetric": uint8 codes with a zero point (onnxruntime fuses every conv, leaky and
# concat into QLinear ops: int8/fp32 latency ~0.5). "symmetric": int8 codes, zero point 0 (what TensorRT
# takes; onnxruntime on x86 fuses fewer ops, ~0.8). Both are exact on x86 CPUs without VNNI only with
# reduced-range weights (|code| <= 63): onnxruntime shifts s8 activations to u8 there, so s8 alone is no fix.
ACT_SCHEMES = ("asymmetric", "symmetric")
# How reduced-range 8-bit weights stay exact without VNNI (compress.quant.weights): "pair": codes in
# [-127, 127], each channel's two largest |codes| sum to <= 128; "half": every |code| <= 63.
SAFE_RANGES = ("pair", "half")


@dataclass(frozen=True)
class LayerQuant:
    """What one conv gets: weight scheme + bits, output activation bits (None = float output)."""
    w_scheme: str
    w_bits: int
    a_bits: Optional[int]
    pre_act_bits: Optional[int]
    per_channel: bool
    pow2: bool
    pow2_rounding: str
    momentum: float
    bn_fold: bool
    act_symmetric: bool = False
    reduce_range: bool = True
    w_clip: str = "max"
    safe_range: str = "half"


@dataclass(frozen=True)
class _Common:
    bn_fold: bool = True
    pow2: bool = False
    pow2_rounding: Pow2Rounding = "ceil"
    per_channel: bool = True
    first_last_bits: Optional[int] = 8
    pre_act_bits: Optional[int] = 8
    ema_momentum: float = 0.1
    act_scheme: str = "asymmetric"
    reduce_range: bool = True
    w_clip: str = "max"
    safe_range: str = "half"
    layer_bits: tuple[tuple[int, int], ...] = ()  # (conv index, weight bits) overriding the uniform width

    def _check_common(self) -> None:
        for i, b in self.layer_bits:
            check_range(f"layer_bits (layer {i})", b, 2, 8, error=QuantError)
        if self.safe_range not in SAFE_RANGES:
            raise QuantError(f"safe_range={self.safe_range!r} is unknown; pass --safe-range "
                             f"{' or '.join(SAFE_RANGES)}")
        if self.act_scheme not in ACT_SCHEMES:
            raise QuantError(f"act_scheme={self.act_scheme!r} is unknown; pass --act-scheme "
                             f"{' or '.join(ACT_SCHEMES)}")
        if self.w_clip not in W_CLIPS:
            raise QuantError(f"w_clip={self.w_clip!r} is unknown; pass --weight-clip {' or '.join(W_CLIPS)}")
        check_range("--first-last-bits", self.first_last_bits, 2, 8, error=QuantError)
        check_range("pre_act_bits", self.pre_act_bits, 2, 8, error=QuantError)
        if self.pow2_rounding not in ("ceil", "nearest"):
            raise QuantError(f"pow2_rounding={self.pow2_rounding!r} is unknown; use 'ceil' or 'nearest'")
        if not 0.0 < self.ema_momentum <= 1.0:
            raise QuantError(f"ema_momentum={self.ema_momentum} must be in (0, 1]; e.g. 0.1 for calibration")
        if not self.bn_fold and (self.pow2 or not self.per_channel):
            raise QuantError("--no-bn-fold needs per-channel weights without --pow2 (folding BN after "
                             "quantization keeps the grid only by rescaling each channel); "
                             "drop --pow2/--per-tensor or use --bn-fold")

    def bits_of(self, index: int, spec: LayerQuant) -> LayerQuant:
        """`spec` with conv `index`'s own weight width when `layer_bits` sets one (mixed precision)."""
        own = dict(self.layer_bits).get(index)
        return spec if own is None else dataclasses.replace(spec, w_bits=own)

    def _layer(self, scheme: str, w_bits: int, a_bits: Optional[int], edge: bool) -> LayerQuant:
        if edge and self.first_last_bits is not None:
            scheme, w_bits, a_bits = "symmetric", self.first_last_bits, self.first_last_bits
        return LayerQuant(scheme, w_bits, a_bits, self.pre_act_bits, self.per_channel, self.pow2,
                          self.pow2_rounding, self.ema_momentum, self.bn_fold, self.act_scheme == "symmetric",
                          self.reduce_range, self.w_clip, self.safe_range)


@dataclass(frozen=True)
class DorefaConfig(_Common):
    """DoReFa (Zhou et al. 2016): k-bit weights through tanh normalisation (exactly 2^k levels), k-bit
    activations on the activation output with a calibrated/EMA range (no fixed prescale).

    Example:
        >>> DorefaConfig(w_bits=4, a_bits=8)
    """
    w_bits: int = 4
    a_bits: int = 8
    method = "dorefa"

    def __post_init__(self) -> None:
        check_range("--bits", self.w_bits, 2, 8, error=QuantError)
        check_range("--a-bits", self.a_bits, 2, 8, error=QuantError)
        self._check_common()
        if self.reduce_range and self.w_bits > 6:
            raise QuantError(f"DoReFa {self.w_bits}-bit weights have codes up to +-{2 ** self.w_bits - 1}, beyond "
                             "the +-63 of reduced-range weights; use --method google at 7-8 bits, or --full-range")

    def layer(self, edge: bool) -> LayerQuant:
        return self._layer("dorefa", self.w_bits, self.a_bits, edge)


@dataclass(frozen=True)
class GoogleConfig(_Common):
    """Jacob et al. (2018) integer-arithmetic quantization: symmetric per-channel weights in
    [-(2^(b-1)-1), 2^(b-1)-1], asymmetric uint activations with EMA min/max and an exact zero.

    Example:
        >>> GoogleConfig(bits=8, per_channel=True, pow2=False, bn_fold=True)
    """
    bits: int = 8
    a_bits: int = 8
    method = "google"

    def __post_init__(self) -> None:
        check_range("--bits", self.bits, 2, 8, error=QuantError)
        check_range("--a-bits", self.a_bits, 2, 8, error=QuantError)
        self._check_common()

    def layer(self, edge: bool) -> LayerQuant:
        return self._layer("symmetric", self.bits, self.a_bits, edge)


QuantConfig = Union[DorefaConfig, GoogleConfig]
METHOD_CONFIGS: dict[str, type] = {"dorefa": DorefaConfig, "google": GoogleConfig}
_FROM_BITS = {
    "dorefa": lambda bits, a_bits, common: DorefaConfig(w_bits=bits, a_bits=a_bits, **common),
    "google": lambda bits, a_bits, common: GoogleConfig(bits=bits, a_bits=a_bits, **common),
}


def make_config(method: Optional[str], bits: int = 8, a_bits: Optional[int] = None, **common: object) -> QuantConfig:
    """Config from CLI-style options. No method: Google (symmetric per-channel) at every width; below 8 bits
    its weight range defaults to the MSE-optimal clip (`w_clip=None` picks it).

    Why not DoReFa at 4 bits (measured on yolov4-tiny's folded inner convs, relative weight error, 4 bits):
    Google + MSE clip 0.168, DoReFa 0.185, Google + max 0.230; with pow2 0.215 vs DoReFa 0.289 (3 bits:
    0.29 vs 0.35). Google's codes are also plain int-k ([-7, 7] at 4 bits) that int4 runtimes take, where
    DoReFa's 2^k odd codes need a k+1-bit container."""
    method = method or "google"
    if method not in METHOD_CONFIGS:
        raise QuantError(f"--method {method} is unknown; use one of {', '.join(METHOD_CONFIGS)}")
    if common.get("w_clip") is None:
        common["w_clip"] = "mse" if bits < 8 and method == "google" else "max"
    return _FROM_BITS[method](bits, a_bits if a_bits is not None else 8, common)


def config_to_dict(config: QuantConfig) -> dict:
    """The config as JSON holds it (pairs as lists, so a record read back compares equal)."""
    d = {"method": config.method, **asdict(config)}
    d["layer_bits"] = [list(p) for p in config.layer_bits]
    return d
