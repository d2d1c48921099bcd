"""Quantization-aware modules that replace `ConvBNAct` and wrap graph joins.

`QConvBNAct` follows Jacob et al. (2018) / Krishnamoorthi (2018) for BN folding:
* training, BN not frozen: a float conv gives the batch statistics (mu_B, sigma_B), which also update the
  running statistics; the weights are folded with the *running* sigma, quantized, and the conv output is
  rescaled by sigma/sigma_B and shifted by beta - gamma mu_B / sigma_B (so training sees batch-normalised
  outputs while the quantized weights stay those inference will use);
* after `freeze_bn()` (late in QAT) and in eval mode: fold with the running statistics, no correction.
With `bn_fold=False` the BN stays a separate float op after the quantized conv (folded afterwards by
rescaling each channel's scale, which keeps the weights on their grid).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.darknet.layers import ConvBNAct
from compress.train.distributed import group_size
from compress.quant.config import LayerQuant
from compress.quant.fake_quant import ActQuant, QParams
from compress.quant.weights import PAIR_SUM_MAX, REDUCED_MAX_CODE, WeightQ, quantize_weight

__all__ = ["QConvBNAct", "QuantOut", "FoldedConv"]


class FoldedConv:
    """Eval-mode integer view of a conv: weight codes + scales, float bias, activation params."""

    def __init__(self, codes: torch.Tensor, w_qp: QParams, bias: torch.Tensor) -> None:
        self.codes, self.w_qp, self.bias = codes, w_qp, bias

    @property
    def weight(self) -> torch.Tensor:
        s, _ = self.w_qp.view(self.codes.dim())
        return self.codes.float() * s


def batch_moments(y: torch.Tensor, sync: bool = False) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-channel mean and (biased) variance of a batch of conv outputs, and the count behind them.

    `sync` under a process group (torchrun, `quantize --sync-bn`): the moments of the global batch, from one
    differentiable all-reduce of (sum, sum of squares, count): SyncBatchNorm for the folded BN, which torch's
    SyncBatchNorm conversion does not reach; it runs on gloo (CPU) as well as nccl."""
    c = y.shape[1]
    if not (sync and group_size() > 1):
        return y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False), y.numel() / c
    # autograd-aware all-reduce (gradients see the global batch); lazy: torch.distributed.nn is only needed, and
    # only importable on builds with distributed support, when a process group runs
    from torch.distributed.nn.functional import all_reduce
    count = torch.full((1,), y.numel() / c, dtype=y.dtype, device=y.device)
    total = all_reduce(torch.cat([y.sum((0, 2, 3)), (y * y).sum((0, 2, 3)), count]))
    n = total[-1]
    mu = total[:c] / n
    return mu, (total[c:2 * c] / n - mu * mu).clamp_min(0.0), float(n)


class QConvBNAct(nn.Module):
    """conv (+BN folded) -> [pre-activation quant] -> activation -> [output quant]."""

    sync_bn = False  # QAT under torchrun with --sync-bn: the folded BN's batch moments are global

    def __init__(self, src: ConvBNAct, spec: LayerQuant, in_quant: ActQuant | None = None,
                 in_source: ActQuant | None = None) -> None:
        super().__init__()
        self._in_source = [in_source] if in_source is not None else []  # producer's quantizer (not owned)
        self.conv, self.bn, self.act, self.batch_normalize = src.conv, src.bn, src.act, src.batch_normalize
        self.spec = spec
        self.in_quant = in_quant
        linear = isinstance(self.act, nn.Identity)
        mk = lambda bits: ActQuant(bits, spec.momentum, spec.pow2, spec.pow2_rounding,  # noqa: E731
                                   symmetric=spec.act_symmetric)
        self.pre_quant = mk(spec.pre_act_bits) if spec.a_bits and spec.pre_act_bits and not linear else None
        self.act_quant = mk(spec.a_bits) if spec.a_bits else None
        self.register_buffer("bn_frozen", torch.tensor(False))
        # learned rounding (PTQ reconstruction, `quant.adaround`): the folded weight's codes, fixed; None = nearest
        self.register_buffer("fixed_codes", None)

    def input_qparams(self) -> QParams | None:
        """Quantization params of this conv's input (its own input quantizer or the producer's)."""
        src = self.in_quant if self.in_quant is not None else (self._in_source[0] if self._in_source else None)
        return src.qparams() if src is not None and bool(src.initialized) else None

    def freeze_bn(self) -> None:
        """Fold with running statistics from now on and stop updating them."""
        self.bn_frozen.fill_(True)

    def _bn_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """gamma / sigma_running and the folded bias beta - mu gamma / sigma."""
        bn = self.bn
        g = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return g, bn.bias - bn.running_mean * g

    def fix_codes(self, codes: torch.Tensor) -> None:
        """Keep these integer codes (on the grid `_quant` gives the folded weight) instead of rounding to nearest."""
        self.fixed_codes = codes.detach().to(torch.int8).clone()

    def _quant(self, w: torch.Tensor) -> WeightQ:
        wq = self._nearest(w)
        if self.fixed_codes is None:
            return wq
        sc, _ = wq.qparams.view(w.dim())
        codes = self.fixed_codes.long()
        return WeightQ(codes.to(w.dtype) * sc, codes, wq.qparams)

    def _nearest(self, w: torch.Tensor) -> WeightQ:
        s = self.spec
        safe = self.reduced_range
        return quantize_weight(w, s.w_scheme, s.w_bits, s.per_channel, s.pow2, s.pow2_rounding,
                               REDUCED_MAX_CODE if safe and s.safe_range == "half" else None, s.w_clip,
                               PAIR_SUM_MAX if safe and s.safe_range == "pair" else None)

    @property
    def reduced_range(self) -> bool:
        """Reduced-range weights only where an integer kernel runs: a conv with a float output (the heads)
        stays DequantizeLinear + float Conv in onnxruntime, so no int16 pair sum exists to saturate."""
        return self.spec.reduce_range and self.spec.a_bits is not None

    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        c = self.conv
        return F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)

    def _batch_fold(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        y = self._conv(x, self.conv.weight)
        mu, var, n = batch_moments(y, self.sync_bn)
        with torch.no_grad():
            bn.running_mean.lerp_(mu.detach(), bn.momentum)
            bn.running_var.lerp_(var.detach() * n / max(n - 1, 1), bn.momentum)
            bn.num_batches_tracked += 1
        g, _ = self._bn_scale()
        sigma_b = torch.sqrt(var + bn.eps)
        sigma = torch.sqrt(bn.running_var + bn.eps)
        y = self._conv(x, self._quant(self.conv.weight * g.view(-1, 1, 1, 1)).dequant)
        return y * (sigma / sigma_b).view(1, -1, 1, 1) + (bn.bias - mu * bn.weight / sigma_b).view(1, -1, 1, 1)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is None:
            wq = self._quant(self.conv.weight)
            b = self.conv.bias if self.training else self._bias_int32(self.conv.bias, wq.qparams)
            return self._conv(x, wq.dequant, b)
        if not self.spec.bn_fold:
            return self.bn(self._conv(x, self._quant(self.conv.weight).dequant))
        if self.training and not bool(self.bn_frozen):
            return self._batch_fold(x)
        g, b = self._bn_scale()
        wq = self._quant(self.conv.weight * g.view(-1, 1, 1, 1))
        return self._conv(x, wq.dequant, b if self.training else self._bias_int32(b, wq.qparams))

    def _bias_int32(self, b: torch.Tensor, w_qp: QParams) -> torch.Tensor:
        """Eval: the bias as deployed, int32 codes with scale s_in * s_w (tiny change; keeps ONNX parity)."""
        in_qp = self.input_qparams()
        if in_qp is None:
            return b
        s = in_qp.scale * w_qp.scale
        return torch.round(b / s) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_quant is not None:
            x = self.in_quant(x)
        y = self._linear(x)
        if self.pre_quant is not None:
            y = self.pre_quant(y)
        y = self.act(y)
        return self.act_quant(y) if self.act_quant is not None else y

    @torch.no_grad()
    def folded(self) -> FoldedConv:
        """Eval-mode weights: codes and scales of the folded, quantized weight, plus the float bias."""
        if self.bn is None:
            wq = self._quant(self.conv.weight)
            return FoldedConv(wq.codes, wq.qparams, self.conv.bias.detach().clone())
        g, b = self._bn_scale()
        if self.spec.bn_fold:
            wq = self._quant(self.conv.weight * g.view(-1, 1, 1, 1))
            return FoldedConv(wq.codes, wq.qparams, b.detach().clone())
        wq = self._quant(self.conv.weight)  # BN after quantization: absorb gamma/sigma into each channel's scale
        sign = torch.where(g < 0, -1, 1)
        qp = wq.qparams
        scaled = QParams((qp.scale * g.abs()).float(), qp.zero_point, qp.qmin, qp.qmax, qp.axis)
        return FoldedConv(wq.codes * sign.view(-1, 1, 1, 1), scaled, b.detach().clone())

    def darknet_tensors(self) -> list[torch.Tensor]:
        if self.bn is not None:
            return [self.bn.bias, self.bn.weight, self.bn.running_mean, self.bn.running_var, self.conv.weight]
        return [self.conv.bias, self.conv.weight]


class QuantOut(nn.Module):
    """Wraps a non-conv layer: `quant(layer(*xs))`. With `shared=` the output reuses the producer's
    quantizer without observing (max-pool, upsample and slices keep their input's grid)."""

    def __init__(self, layer: nn.Module, quant: ActQuant | None = None, shared: ActQuant | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.quant = quant
        self._shared = [shared] if shared is not None else []  # not registered: owned by the producer

    @property
    def source(self) -> ActQuant:
        return self.quant if self.quant is not None else self._shared[0]

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        y = self.layer(*xs)
        if self.quant is not None:
            return self.quant(y)
        src = self._shared[0]
        was = src.training
        src.train(False)  # reuse without observing
        try:
            return src(y)
        finally:
            src.train(was)

    def darknet_tensors(self) -> list[torch.Tensor]:
        return self.layer.darknet_tensors() if hasattr(self.layer, "darknet_tensors") else []
