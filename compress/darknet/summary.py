"""Model figures: per-layer table, params, FLOPs, BN-gamma statistics, size on disk, CPU latency."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

from compress.base.fileio import atomic_write
from compress.base.latency import DEFAULT_RUNS, DEFAULT_THREADS, DEFAULT_WARMUP, Latency, measure
from compress.darknet.sections import conv_geometry
from compress.darknet.model import DarknetModel

__all__ = ["LayerRow", "ModelSummary", "summarize", "bn_gammas", "gamma_stats", "plot_gamma_histogram",
           "measure_latency", "model_latency", "file_size_mb", "format_stage_table", "stage_figures"]


@dataclass(frozen=True)
class LayerRow:
    index: int
    type: str
    in_channels: int
    out_channels: int
    kernel: str
    output: str
    params: int
    mflops: float


@dataclass(frozen=True)
class ModelSummary:
    rows: tuple[LayerRow, ...]
    params: int
    gflops: float
    img_size: tuple[int, int]
    extra: dict = field(default_factory=dict)

    def table(self) -> str:
        body = [(r.index, r.type, f"{r.in_channels} -> {r.out_channels}", r.kernel, r.output, f"{r.params:,}",
                 f"{r.mflops:.1f}") for r in self.rows]
        return tabulate(body, headers=["#", "type", "channels", "k/s", "output", "params", "MFLOPs"],
                        tablefmt="github")

    def to_dict(self) -> dict:
        return {"params": self.params, "gflops": round(self.gflops, 4), "img_size": list(self.img_size),
                "layers": [r.__dict__ for r in self.rows], **self.extra}


def summarize(model: DarknetModel, img_size: tuple[int, int] | None = None) -> ModelSummary:
    """Per-layer channels, output sizes, params and FLOPs (2 x multiply-adds, from the section table) at
    `img_size` (h, w). Raises CfgError when that size cannot flow through the network."""
    h, w = img_size or (model.cfg.height, model.cfg.width)
    graph = model.graph
    shapes = graph.shapes(h, w)
    rows = []
    for i, (block, layer, section) in enumerate(zip(model.cfg.blocks, model.layers, graph.sections)):
        c, oh, ow = shapes[i]
        params = sum(p.numel() for p in layer.parameters())
        if hasattr(layer, "darknet_tensors"):  # BN running stats are stored weights too
            params = sum(t.numel() for t in layer.darknet_tensors())
        ins = [(graph.cfg.channels, h, w) if s < 0 else shapes[s] for s in graph.inputs[i]]
        kernel = ""
        if section.conv:
            k, s, _ = conv_geometry(block)
            kernel = f"{k}x{k}/{s}"
        macs = section.macs(block, layer, ins, shapes[i])
        rows.append(LayerRow(i, block.type, graph.in_channels(i), c, kernel, f"{oh}x{ow}", params, 2 * macs / 1e6))
    return ModelSummary(tuple(rows), sum(r.params for r in rows), sum(r.mflops for r in rows) / 1e3, (h, w))


def bn_gammas(model: DarknetModel, layers: list[int] | None = None) -> dict[int, torch.Tensor]:
    """|gamma| of every BN conv (or of `layers`), detached on CPU."""
    out = {}
    for i, layer in enumerate(model.layers):
        bn = getattr(layer, "bn", None)
        if bn is not None and (layers is None or i in layers):
            out[i] = bn.weight.detach().abs().cpu()
    return out


def gamma_stats(gammas: dict[int, torch.Tensor]) -> dict:
    if not gammas:
        return {"count": 0}
    g = torch.cat(list(gammas.values())).numpy()
    pct = {f"p{q}": float(np.percentile(g, q)) for q in (1, 5, 25, 50, 75, 95, 99)}
    return {"count": int(g.size), "mean": float(g.mean()), **pct,
            "share_below_1e-2": float((g < 1e-2).mean()), "share_below_1e-3": float((g < 1e-3).mean())}


def plot_gamma_histogram(gammas: dict[int, torch.Tensor], path: str | os.PathLike, title: str = "") -> None:
    import matplotlib  # optional and slow to import (~0.5 s): only the gamma plot needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = torch.cat(list(gammas.values())).numpy() if gammas else np.zeros(1)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(g, bins=100, color="#3b75af")
    ax.set_xlabel("|BN gamma|")
    ax.set_ylabel("channels")
    ax.set_yscale("log")
    ax.set_title(title or f"BN gamma histogram ({g.size} channels)")
    fig.tight_layout()
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)


def model_latency(model: torch.nn.Module, img_size: tuple[int, int], runs: int = DEFAULT_RUNS,
                  warmup: int = DEFAULT_WARMUP, device: str | torch.device = "cpu", batch: int = 1,
                  threads: int = DEFAULT_THREADS) -> Latency:
    """Latency of the eval-mode forward of a (batch, 3, h, w) input: `base.latency.measure`, the one
    measurement (`benchmark`'s pytorch row, stage figures, the recipe's stage table)."""
    was_training = model.training
    model.eval()
    x = torch.rand(batch, 3, *img_size, device=device, generator=torch.Generator(device).manual_seed(0))
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else None
    try:
        return measure(lambda: model(x), runs, warmup, threads, sync)
    finally:
        model.train(was_training)


def measure_latency(model: torch.nn.Module, img_size: tuple[int, int], runs: int = 10, warmup: int = 2,
                    device: str | torch.device = "cpu", batch: int = 1, threads: int = DEFAULT_THREADS) -> float:
    """Median ms per forward of a (batch, 3, h, w) input (`model_latency`'s median)."""
    return model_latency(model, img_size, runs, warmup, device, batch, threads).median_ms


def file_size_mb(*paths: str | os.PathLike | None) -> float:
    return sum(Path(p).stat().st_size for p in paths if p and Path(p).exists()) / 1e6


def format_stage_table(rows: list[dict], keys: list[tuple[str, str]]) -> str:
    """Tabulate stage dicts; `keys` = [(dict key, column header)]; missing figures print as '-'."""
    body = [[_fmt(r.get(k)) for k, _ in keys] for r in rows]
    return tabulate(body, headers=[h for _, h in keys], tablefmt="github", disable_numparse=True)  # pre-formatted


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def stage_figures(model: DarknetModel, cfg_path: str | os.PathLike | None = None,
                  weights_path: str | os.PathLike | None = None, metrics: dict | None = None,
                  img_size: tuple[int, int] | None = None, latency_runs: int = 10) -> dict:
    """The figures every model-producing command reports for its output model (see docs/design.md)."""
    summary = summarize(model, img_size)
    figures = {"cfg": str(cfg_path) if cfg_path else None, "weights": str(weights_path) if weights_path else None,
               "params": summary.params, "gflops": round(summary.gflops, 4),
               "size_mb": round(file_size_mb(weights_path), 4) if weights_path else None,
               "latency_ms": round(measure_latency(model, summary.img_size, runs=latency_runs,
                                                   device=next(model.parameters()).device), 3)
               if latency_runs > 0 else None,  # 0: not measured (it can dominate a command's run time)
               "map50": None, "map50_95": None}
    if metrics:
        figures.update({k: metrics.get(k) for k in ("map50", "map50_95")})
    return figures
