"""`QParams`: the frozen quantization parameters of one tensor (scale, zero point, integer range, axis).

A module of its own below both users: `fake_quant` computes them, `qdq` writes them as ONNX ops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["QParams"]


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
