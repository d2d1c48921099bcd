"""QDQ ONNX export of a fake-quant model: int8 weight initializers with DequantizeLinear, activation
QuantizeLinear -> DequantizeLinear pairs carrying the calibrated scales, and the [yolo] decode in float.

Sub-8-bit tensors use int8/uint8 containers with a Clip to the k-bit code range between Q and DQ ("QCDQ").
onnxruntime fuses DQ -> Conv -> Q into QLinearConv and DQ -> LeakyRelu -> Q into QLinearLeakyRelu.
"""
from __future__ import annotations

import copy
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from compress.base.fileio import write_bytes_atomic
from compress.deploy.onnx_io import OnnxPredictor, onnx_latency, torch_to_onnx
from compress.deploy.onnx_io import session as _session
from compress.quant.fake_quant import ActQuant, Holder, QParams
from compress.quant.modules import QConvBNAct
from compress.quant.qdq import const as _const
from compress.quant.qdq import qdq_symbolic

__all__ = ["export_qdq_onnx", "qdq_symbolic", "QConvExport", "exportable", "OnnxPredictor", "onnx_latency",
           "optimized_op_counts"]

log = logging.getLogger(__name__)


class _ConstDQ(torch.autograd.Function):
    """Constant integer codes -> DequantizeLinear (per output channel). `anchor` only ties it to the trace."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, const: tuple) -> torch.Tensor:  # type: ignore[override]
        codes, qp = const.value
        s, z = qp.view(codes.dim())
        return (codes.to(anchor.dtype) - z) * s

    @staticmethod
    def symbolic(g, anchor, const: tuple):  # type: ignore[no-untyped-def]
        codes, qp = const.value
        dtype = torch.int32 if codes.dtype == torch.int32 else torch.int8
        scale = _const(g, qp.scale.detach().cpu().float())
        zp = _const(g, torch.zeros(qp.scale.shape, dtype=dtype))
        return g.op("DequantizeLinear", _const(g, codes.detach().cpu()), scale, zp, axis_i=0)


class QConvExport(nn.Module):
    """Frozen eval conv: int8 codes + per-channel scales, int32 bias (scale s_in * s_w) when the input
    is quantized, then the same activation quantizers as the fake-quant module."""

    def __init__(self, q: QConvBNAct) -> None:
        super().__init__()
        f = q.folded()
        conv = q.conv
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.in_quant, self.pre_quant, self.act, self.act_quant = q.in_quant, q.pre_quant, q.act, q.act_quant
        fits = int(f.codes.abs().max()) <= 127
        if not fits:
            log.warning("conv codes need more than int8 (%d bits DoReFa); exported as float weights", q.spec.w_bits)
        self.codes = f.codes.to(torch.int8) if fits else None
        self.w_qp = f.w_qp
        self.weight = f.weight.float()
        in_qp = q.input_qparams()
        self.bias_qp = None
        self.bias = f.bias.float()
        if in_qp is not None and fits:
            bscale = (in_qp.scale * f.w_qp.scale).float()
            self.bias_qp = QParams(bscale, torch.zeros_like(bscale), -2 ** 31, 2 ** 31 - 1, axis=0)
            self.bias_codes = torch.round(f.bias / bscale).to(torch.int32)
            self.bias = self.bias_codes.float() * bscale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_quant is not None:
            x = self.in_quant(x)
        w = _ConstDQ.apply(x, Holder((self.codes, self.w_qp))) if self.codes is not None else self.weight
        b = _ConstDQ.apply(x, Holder((self.bias_codes, self.bias_qp))) if self.bias_qp is not None else self.bias
        y = F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)
        if self.pre_quant is not None:
            y = self.pre_quant(y)
        y = self.act(y)
        return self.act_quant(y) if self.act_quant is not None else y


def exportable(model: nn.Module) -> nn.Module:
    """Eval copy of a fake-quant model with each `QConvBNAct` replaced by its frozen integer form."""
    m = copy.deepcopy(model).eval()
    for aq in m.modules():
        if isinstance(aq, ActQuant):
            aq.freeze_params()
    for i, layer in enumerate(m.layers):
        if isinstance(layer, QConvBNAct):
            m.layers[i] = QConvExport(layer)
    return m


class _RawHeads(nn.Module):
    """Head maps (logits) flattened and concatenated: (N, sum A*H*W*(5+C)); used by parity checks."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([h.flatten(1) for h in self.model(x, raw=True)], 1)


def export_qdq_onnx(model: nn.Module, path: str | os.PathLike, img_size: tuple[int, int], opset: int = 13,
                    raw: bool = False) -> None:
    """Write the decoded eval-mode QDQ model (input `images` (N,3,H,W) in [0,1], output `output` (N,boxes,5+C)).
    `raw=True` writes the head logits instead (see `_RawHeads`)."""
    m = exportable(model).cpu()
    m = _RawHeads(m) if raw else m
    data = torch_to_onnx(m, torch.rand(1, 3, *img_size), opset=opset,
                         dynamic_axes={"images": {0: "batch"}, "output": {0: "batch"}}, what=f"{path} (QDQ)")
    write_bytes_atomic(path, data)


def optimized_op_counts(path: str | os.PathLike, optimized_path: str | os.PathLike) -> dict[str, int]:
    """Op types of the graph onnxruntime actually runs (after its QDQ fusions), e.g. QLinearConv counts."""
    from collections import Counter

    import onnx

    _session(path, 1, optimized_path=optimized_path)
    return dict(Counter(n.op_type for n in onnx.load(str(optimized_path)).graph.node).most_common())
