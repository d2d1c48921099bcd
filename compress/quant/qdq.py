"""ONNX symbolic of one fake-quant op: QuantizeLinear -> (Clip) -> DequantizeLinear.

Kept apart from `onnx_qdq` so that `fake_quant` can name it without importing the export modules.
"""
from __future__ import annotations

import torch

from compress.quant.qparams import QParams

__all__ = ["qdq_symbolic", "const", "zp_tensor"]


def const(g, t: torch.Tensor):  # type: ignore[no-untyped-def]
    return g.op("Constant", value_t=t)


def zp_tensor(qp: QParams, dtype: torch.dtype) -> torch.Tensor:
    return qp.zero_point.detach().cpu().round().to(dtype)


def qdq_symbolic(g, x, qp: QParams):  # type: ignore[no-untyped-def]
    """QuantizeLinear (uint8 if qmin >= 0 else int8) -> Clip to [qmin, qmax] when narrower -> DequantizeLinear."""
    dtype, full = (torch.int8, (-128, 127)) if qp.signed else (torch.uint8, (0, 255))
    kw = {"axis_i": qp.axis} if qp.axis is not None else {}
    scale = const(g, qp.scale.detach().cpu().float())
    zp = const(g, zp_tensor(qp, dtype))
    q = g.op("QuantizeLinear", x, scale, zp, **kw)
    if (qp.qmin, qp.qmax) != full:
        lo, hi = torch.tensor(qp.qmin, dtype=dtype), torch.tensor(qp.qmax, dtype=dtype)
        q = g.op("Clip", q, const(g, lo), const(g, hi))
    return g.op("DequantizeLinear", q, scale, zp, **kw)
