"""Torch modules for Darknet sections, plus the activation registry.

Every module with weights implements `darknet_tensors()`: its tensors in `.weights` file order, so
reading, writing and counting weights share one definition. Each section entry (`compress.darknet.sections`)
builds its module from here; this module reads blocks through `block`/`geometry` only and never imports the table.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from compress.base.errors import CfgError
from compress.darknet.block import Block
from compress.darknet.geometry import conv_geometry, maxpool_geometry, strides, yolo_anchors, yolo_mask

__all__ = ["ACTIVATIONS", "register_activation", "make_activation", "ConvBNAct", "Route", "Shortcut", "Upsample",
           "MaxPool", "GlobalAvgPool", "ScaleChannels", "SAM", "Dropout", "SE", "CBAM", "ECA", "YOLOLayer",
           "RegionLayer", "BN_EPS", "BN_MOMENTUM"]

BN_EPS = 1e-6
BN_MOMENTUM = 0.03
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {}


def register_activation(*names: str) -> Callable:
    def deco(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        for name in names:
            ACTIVATIONS[name] = factory
        return factory
    return deco


register_activation("linear", "none")(nn.Identity)  # none: the reference dialect's "no activation"
register_activation("leaky")(lambda: nn.LeakyReLU(0.1))
register_activation("relu")(nn.ReLU)
register_activation("relu6")(nn.ReLU6)
register_activation("mish")(nn.Mish)
register_activation("swish", "silu")(nn.SiLU)
register_activation("logistic")(nn.Sigmoid)
register_activation("hardswish", "hard_swish", "h_swish")(nn.Hardswish)
register_activation("tanh")(nn.Tanh)
register_activation("elu")(nn.ELU)
register_activation("gelu")(nn.GELU)


def make_activation(block: Block, default: str = "linear") -> nn.Module:
    name = (block.get("activation", default) or default).lower()
    if name not in ACTIVATIONS:
        raise CfgError(f"{block.where()}: activation={name} is not supported; use one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class ConvBNAct(nn.Module):
    """[convolutional]: conv -> (BN) -> activation, with stable `.conv/.bn/.act` names."""

    def __init__(self, block: Block, in_channels: int, groups: int | None = None) -> None:
        super().__init__()
        k, s, p = conv_geometry(block)
        filters = block.get_int("filters", 1)
        self.batch_normalize = bool(block.get_int("batch_normalize", 0))
        dilation = block.get_int("dilation", 1)  # Darknet pads `pad * dilation` (im2col_cpu_ext)
        self.conv = nn.Conv2d(in_channels, filters, k, strides(block), p * dilation, dilation=dilation,
                              groups=groups or block.get_int("groups", 1), bias=not self.batch_normalize)
        self.bn = nn.BatchNorm2d(filters, eps=BN_EPS, momentum=BN_MOMENTUM) if self.batch_normalize else None
        self.act = make_activation(block, "logistic")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x)

    shared = False

    def share(self, other: "ConvBNAct") -> None:
        """Use `other`'s conv and BN (Darknet's share_index); this layer then stores no weights."""
        self.conv, self.bn, self.shared = other.conv, other.bn, True

    def darknet_tensors(self) -> list[torch.Tensor]:
        if self.shared:
            return []
        if self.bn is not None:
            return [self.bn.bias, self.bn.weight, self.bn.running_mean, self.bn.running_var, self.conv.weight]
        return [self.conv.bias, self.conv.weight]


class Route(nn.Module):
    def __init__(self, block: Block) -> None:
        super().__init__()
        self.groups = block.get_int("groups", 1)
        self.group_id = block.get_int("group_id", 0)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        if self.groups > 1:
            xs = tuple(x.chunk(self.groups, dim=1)[self.group_id] for x in xs)
        return xs[0] if len(xs) == 1 else torch.cat(xs, 1)


class Shortcut(nn.Module):
    """[shortcut] from=a[,b..]: previous + each from-layer where their channels overlap (Darknet's
    shortcut_multilayer_cpu), optionally weighted per input (per_feature) or per input and channel
    (per_channel), the weights normalized by relu or softmax (+1e-4 in the denominator, as Darknet)."""

    def __init__(self, block: Block, in_channels: list[int] | None = None, weights_type: str = "none") -> None:
        super().__init__()
        self.act = make_activation(block, "linear")
        kind = weights_type  # read by the [shortcut] entry (sections.joins.weights_type)
        self.norm = (block.get("weights_normalization", "none") or "none").lower().replace("avg_relu", "relu")
        n, c = len(in_channels or (0, 0)), (in_channels or (1,))[0]
        self.weight = None
        if kind != "none":
            self.weight = nn.Parameter(torch.ones(n, c if kind == "per_channel" else 1))

    def _weights(self) -> torch.Tensor:
        w = self.weight
        if self.norm == "relu":
            w = F.relu(w)
            return w / (w.sum(0, keepdim=True) + 1e-4)
        if self.norm == "softmax":
            e = torch.exp(w - w.amax(0, keepdim=True))
            return e / (e.sum(0, keepdim=True) + 1e-4)
        return w

    def forward(self, x: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self._weights().view(self.weight.shape[0], 1, -1, 1, 1)
        out = x if w is None else x * w[0]
        for k, other in enumerate(others, start=1):
            m = min(out.shape[1], other.shape[1])  # channels beyond the overlap pass unchanged
            add = other[:, :m] if w is None else other[:, :m] * w[k][:, :m]
            out = out + add if m == out.shape[1] else torch.cat((out[:, :m] + add, out[:, m:]), 1)
        return self.act(out)

    def darknet_tensors(self) -> list[torch.Tensor]:
        return [] if self.weight is None else [self.weight]


class Upsample(nn.Module):
    def __init__(self, block: Block) -> None:
        super().__init__()
        self.stride = block.get_int("stride", 2)
        self.scale = block.get_float("scale", 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=float(self.stride), mode="nearest")
        return x if self.scale == 1.0 else x * self.scale


class MaxPool(nn.Module):
    """Darknet maxpool: total padding `size-1` split left/top-first (out-of-image taps ignored).
    `zero_pad`: the reference project's size=2 stride=1 pool (ZeroPad2d right/bottom, so border taps see 0)."""

    def __init__(self, block: Block, zero_pad: bool = False) -> None:
        super().__init__()
        self.zero_pad = zero_pad and maxpool_geometry(block)[:2] == (2, 1)
        self.size, _, padding = maxpool_geometry(block)
        self.stride = strides(block)
        self.pad_lo, self.pad_hi = padding // 2, padding - padding // 2
        self.depth_out = block.get_int("out_channels", 1) if block.get_int("maxpool_depth", 0) else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.depth_out:
            n, c, h, w = x.shape
            reps = -(-c // self.depth_out)
            x = F.pad(x, (0, 0, 0, 0, 0, reps * self.depth_out - c), value=float("-inf"))
            return x.view(n, reps, self.depth_out, h, w).amax(1)
        if self.zero_pad:
            return F.max_pool2d(F.pad(x, (0, 1, 0, 1)), 2, 1)
        if self.pad_lo == self.pad_hi:
            return F.max_pool2d(x, self.size, self.stride, self.pad_lo)
        x = F.pad(x, (self.pad_lo, self.pad_hi, self.pad_lo, self.pad_hi), mode="replicate")
        return F.max_pool2d(x, self.size, self.stride)


class GlobalAvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3), keepdim=True)


class ScaleChannels(nn.Module):
    """[scale_channels] from=F: output = layer F * previous (an N,C,1,1 attention vector)."""

    def forward(self, att: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * att


class SAM(nn.Module):
    """[sam] from=F: spatial attention, output = layer F * previous."""

    def forward(self, att: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * att


class Dropout(nn.Module):
    def __init__(self, block: Block) -> None:
        super().__init__()
        self.drop = nn.Dropout(block.get_float("probability", 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x)


def _mlp(c: int, reduction: int, hidden: int | None = None) -> tuple[nn.Conv2d, nn.Conv2d]:
    hidden = hidden or max(1, c // reduction)
    return nn.Conv2d(c, hidden, 1, bias=False), nn.Conv2d(hidden, c, 1, bias=False)


class SE(nn.Module):
    """[se] reduction=16: squeeze-excitation on the previous layer (Hu et al. 2018). Weights: fc1, fc2.
    The reference dialect's SE uses a hard-sigmoid gate (relu6(x + 3) / 6)."""

    def __init__(self, block: Block, channels: int, hidden: int | None = None, gate: str = "sigmoid") -> None:
        super().__init__()
        self.fc1, self.fc2 = _mlp(channels, block.get_int("reduction", 16), hidden)
        self.gate = F.hardsigmoid if gate == "hard_sigmoid" else torch.sigmoid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * self.gate(att)

    def darknet_tensors(self) -> list[torch.Tensor]:
        return [self.fc1.weight, self.fc2.weight]


class CBAM(nn.Module):
    """[cbam] reduction=16 kernel=7: channel then spatial attention (Woo et al. 2018). Weights: fc1, fc2, spatial."""

    def __init__(self, block: Block, channels: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = _mlp(channels, block.get_int("reduction", 16))
        k = block.get_int("kernel", 7)
        self.spatial = nn.Conv2d(2, 1, k, padding=k // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mlp = lambda t: self.fc2(F.relu(self.fc1(t)))  # noqa: E731 - shared MLP of CBAM
        x = x * torch.sigmoid(mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), keepdim=True)))
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return x * torch.sigmoid(self.spatial(pooled))

    def darknet_tensors(self) -> list[torch.Tensor]:
        return [self.fc1.weight, self.fc2.weight, self.spatial.weight]


class ECA(nn.Module):
    """[eca] size=3: efficient channel attention (Wang et al. 2020), a 1-D conv across channels."""

    def __init__(self, block: Block) -> None:
        super().__init__()
        k = block.get_int("size", 3)
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = self.conv(x.mean((2, 3)).unsqueeze(1)).squeeze(1)
        return x * torch.sigmoid(att)[..., None, None]

    def darknet_tensors(self) -> list[torch.Tensor]:
        return [self.conv.weight]


def _grid_and_stride(p: torch.Tensor, img_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell offsets (H, W, 2) as (x, y) and the (x, y) stride in input pixels of a (N, A, H, W, .) head map."""
    h, w = p.shape[2], p.shape[3]
    stride = torch.tensor([img_hw[1] / w, img_hw[0] / h], device=p.device, dtype=p.dtype)
    gy, gx = torch.meshgrid(torch.arange(h, device=p.device, dtype=p.dtype),
                            torch.arange(w, device=p.device, dtype=p.dtype), indexing="ij")
    return torch.stack((gx, gy), -1), stride


class YOLOLayer(nn.Module):
    """[yolo] head. Raw output (N, A, H, W, 5+C); decoded output (N, A*H*W, 5+C) in input pixels."""

    def __init__(self, block: Block) -> None:
        super().__init__()
        pairs = yolo_anchors(block)
        self.mask = yolo_mask(block)
        self.classes = block.get_int("classes", 20)
        self.scale_x_y = block.get_float("scale_x_y", 1.0)
        self.new_coords = bool(block.get_int("new_coords", 0))
        self.register_buffer("anchors", torch.tensor([pairs[m] for m in self.mask], dtype=torch.float32),
                             persistent=False)

    @property
    def num_anchors(self) -> int:
        return len(self.mask)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        return x.view(n, self.num_anchors, self.classes + 5, h, w).permute(0, 1, 3, 4, 2).contiguous()

    def decode(self, p: torch.Tensor, img_hw: tuple[int, int]) -> torch.Tensor:
        n, a, h, w, _ = p.shape
        grid, stride = _grid_and_stride(p, img_hw)
        anchors = self.anchors.to(p.dtype).view(1, a, 1, 1, 2)
        s = self.scale_x_y
        if self.new_coords:  # scaled-YOLOv4: the conv already applied logistic
            xy = p[..., :2] * s - (s - 1) / 2
            wh = (2 * p[..., 2:4]) ** 2 * anchors
            scores = p[..., 4:]
        else:
            xy = torch.sigmoid(p[..., :2]) * s - (s - 1) / 2
            wh = torch.exp(p[..., 2:4]) * anchors
            scores = torch.sigmoid(p[..., 4:])
        xy = (xy + grid) * stride
        return torch.cat((xy, wh, scores), -1).view(n, -1, self.classes + 5)

    def forward(self, x: torch.Tensor, img_hw: tuple[int, int], raw: bool) -> torch.Tensor:
        p = self.raw(x)
        return p if raw else self.decode(p, img_hw)


class RegionLayer(YOLOLayer):
    """YOLOv2 [region] head (inference only): anchors in grid cells, softmax over classes."""

    def __init__(self, block: Block) -> None:
        nn.Module.__init__(self)
        pairs = yolo_anchors(block)
        self.mask = tuple(range(len(pairs)))
        self.classes = block.get_int("classes", 20)
        self.scale_x_y, self.new_coords = 1.0, False
        self.register_buffer("anchors", torch.tensor(pairs, dtype=torch.float32), persistent=False)

    def decode(self, p: torch.Tensor, img_hw: tuple[int, int]) -> torch.Tensor:
        n, a, h, w, _ = p.shape
        grid, stride = _grid_and_stride(p, img_hw)
        xy = (torch.sigmoid(p[..., :2]) + grid) * stride
        wh = torch.exp(p[..., 2:4]) * self.anchors.to(p.dtype).view(1, a, 1, 1, 2) * stride
        obj = torch.sigmoid(p[..., 4:5])
        cls = torch.softmax(p[..., 5:], -1)
        return torch.cat((xy, wh, obj, cls), -1).view(n, -1, self.classes + 5)
