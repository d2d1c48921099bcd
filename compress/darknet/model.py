"""Build a torch model from a `Cfg`. The model carries its cfg, so it can always be saved as a Darknet pair.

Each block's module comes from its section-table entry (`compress.darknet.sections`). Before anything is allocated
the weights are estimated from the table, so an absurd cfg (`filters=100000000`) fails with the block's
`file:line` instead of an allocator traceback.
"""
from __future__ import annotations

import torch
from torch import nn

from compress.darknet.cfg import Cfg
from compress.base.errors import CfgError
from compress.darknet.graph import LayerGraph, build_graph

__all__ = ["DarknetModel", "build_model", "estimate_weights", "MAX_WEIGHT_BYTES"]

MAX_WEIGHT_BYTES = 8 * 1024 ** 3   # far above any published YOLO (yolov4-p7: ~1.2 GB)


def estimate_weights(graph: LayerGraph) -> list[int]:
    """Floats each block stores in `.weights`, from the section table alone (nothing allocated)."""
    return [s.params(b, graph.input_channels(i), graph.channels[i], graph.ctx(i))
            for i, (b, s) in enumerate(zip(graph.cfg.blocks, graph.sections))]


def _check_memory(graph: LayerGraph) -> None:
    sizes = estimate_weights(graph)
    total = 4 * sum(sizes)
    if total > MAX_WEIGHT_BYTES:
        i = max(range(len(sizes)), key=sizes.__getitem__)
        block = graph.cfg.blocks[i]
        raise CfgError(f"{block.where()}: [{block.type}] layer {i} alone needs {4 * sizes[i] / 1e9:.1f} GB of "
                       f"weights and the network {total / 1e9:.1f} GB (limit {MAX_WEIGHT_BYTES / 1e9:.1f} GB); "
                       "check its filters=/size=")


class DarknetModel(nn.Module):
    """A Darknet network. `model(x)` in train mode returns the raw head maps (list of N,A,H,W,5+C);
    in eval mode the decoded boxes (N, boxes, 5+C): cx, cy, w, h in input pixels, objectness, class
    scores. `raw=True/False` overrides the mode. A `channels=1` cfg accepts RGB input (converted to gray
    with the weights stb_image uses when Darknet loads an image as one channel).
    """

    def __init__(self, cfg: Cfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.graph: LayerGraph = build_graph(cfg)
        _check_memory(self.graph)
        g = self.graph
        self.layers = nn.ModuleList(s.build(b, g.input_channels(i), g.ctx(i))
                                    for i, (b, s) in enumerate(zip(cfg.blocks, g.sections)))
        for i, (b, s) in enumerate(zip(cfg.blocks, g.sections)):
            if s.bind is not None:
                s.bind(b, i, g, self.layers)
        self._saved = self.graph.kept_outputs
        self._is_head = tuple(s.head for s in g.sections)
        self.header: tuple[int, int, int, int] = (0, 2, 5, 0)  # major, minor, revision, seen

    @property
    def heads(self) -> list[nn.Module]:
        return [self.layers[i] for i in self.graph.heads]

    def _need_head(self) -> None:
        if not self.graph.heads:
            raise CfgError(f"{self.cfg.path or '<cfg>'}: the cfg has no detection head ([yolo], [Gaussian_yolo] or "
                           "[region]); detection needs a detector cfg: end the network with a head")

    @property
    def num_classes(self) -> int:
        self._need_head()
        return self.cfg.classes

    @property
    def stride(self) -> int:
        """Largest downsampling factor: inputs must be a multiple of it."""
        shapes = self.graph.shapes(self.cfg.height, self.cfg.width)
        return max(self.cfg.height // shapes[i][1] for i in self.graph.heads) if self.graph.heads else 1

    def _image(self, x: torch.Tensor) -> torch.Tensor:
        want = self.cfg.channels
        if x.shape[1] == want:
            return x
        if want == 1 and x.shape[1] == 3:
            rgb = torch.tensor([77.0, 150.0, 29.0], dtype=x.dtype, device=x.device) / 256
            return (x * rgb.view(1, 3, 1, 1)).sum(1, keepdim=True)
        raise CfgError(f"{self.cfg.path or '<cfg>'}: [net] channels={want} but the input has {x.shape[1]} channels")

    def forward(self, x: torch.Tensor, raw: bool | None = None):
        raw = self.training if raw is None else raw
        if not raw:
            self._need_head()
        img_hw = (x.shape[-2], x.shape[-1])
        image = self._image(x)
        x, saved, outputs = image, {}, []
        for i, layer in enumerate(self.layers):
            args = [x if s == i - 1 else (image if s < 0 else saved[s]) for s in self.graph.inputs[i]]
            if self._is_head[i]:
                outputs.append(layer(*args, img_hw, raw))
            else:
                x = layer(*args)
            if i in self._saved:
                saved[i] = x
        return outputs if raw else torch.cat(outputs, 1)


def build_model(cfg: Cfg) -> DarknetModel:
    return DarknetModel(cfg)
