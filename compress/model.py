"""Build a torch model from a `Cfg`. The model carries its cfg, so it can always be saved as a Darknet pair."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .cfg import Block, Cfg
from .graph import LayerGraph, build_graph
from . import layers as L

__all__ = ["DarknetModel", "build_model", "BUILDERS", "register_builder"]

# section type -> factory(block, in_channels) -> module
BUILDERS: dict[str, Callable[[Block, int], nn.Module]] = {
    "convolutional": L.ConvBNAct,
    "route": lambda b, c: L.Route(b),
    "shortcut": lambda b, c: L.Shortcut(b),
    "upsample": lambda b, c: L.Upsample(b),
    "maxpool": lambda b, c: L.MaxPool(b),
    "avgpool": lambda b, c: L.GlobalAvgPool(),
    "scale_channels": lambda b, c: L.ScaleChannels(),
    "sam": lambda b, c: L.SAM(),
    "dropout": lambda b, c: L.Dropout(b),
    "se": L.SE,
    "cbam": L.CBAM,
    "eca": lambda b, c: L.ECA(b),
    "yolo": lambda b, c: L.YOLOLayer(b),
    "region": lambda b, c: L.RegionLayer(b),
}


def register_builder(section: str) -> Callable:
    def deco(factory: Callable[[Block, int], nn.Module]) -> Callable[[Block, int], nn.Module]:
        BUILDERS[section] = factory
        return factory
    return deco


class DarknetModel(nn.Module):
    """A Darknet network. `model(x)` in train mode returns the raw head maps (list of N,A,H,W,5+C);
    in eval mode the decoded boxes (N, boxes, 5+C): cx, cy, w, h in input pixels, objectness, class
    scores. `raw=True/False` overrides the mode.
    """

    def __init__(self, cfg: Cfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.graph: LayerGraph = build_graph(cfg)
        self.layers = nn.ModuleList(
            BUILDERS[b.type](b, self.graph.in_channels(i)) for i, b in enumerate(cfg.blocks))
        self._saved = self.graph.kept_outputs
        self.header: tuple[int, int, int, int] = (0, 2, 5, 0)  # major, minor, revision, seen

    @property
    def heads(self) -> list[L.YOLOLayer]:
        return [self.layers[i] for i in self.graph.heads]

    @property
    def num_classes(self) -> int:
        return self.cfg.classes

    @property
    def stride(self) -> int:
        """Largest downsampling factor: inputs must be a multiple of it."""
        shapes = self.graph.shapes(self.cfg.height, self.cfg.width)
        return max(self.cfg.height // shapes[i][1] for i in self.graph.heads) if self.graph.heads else 1

    def forward(self, x: torch.Tensor, raw: bool | None = None):
        raw = self.training if raw is None else raw
        img_hw = (x.shape[-2], x.shape[-1])
        image, saved, outputs = x, {}, []
        for i, layer in enumerate(self.layers):
            srcs = self.graph.inputs[i]
            if isinstance(layer, L.YOLOLayer):
                outputs.append(layer(x, img_hw, raw))
            else:
                args = [x if s == i - 1 else (image if s < 0 else saved[s]) for s in srcs]
                x = layer(*args)
            if i in self._saved:
                saved[i] = x
        return outputs if raw else torch.cat(outputs, 1)


def build_model(cfg: Cfg) -> DarknetModel:
    return DarknetModel(cfg)
