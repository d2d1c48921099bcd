"""Sparse training (network slimming): an L1 subgradient on BN gammas, as a `fit()` hook.

`BNL1Hook.after_backward` runs once per optimizer step on UNSCALED gradients (fit's contract), so the
penalty is neither ~65536x too weak under AMP nor multiplied by gradient accumulation (reference bugs).
It adds `s * sign(gamma)` to the BN weight gradients of the mode's prune set (mode 0/1/2, reference 1.2).

Schedules (`SCHEDULES` registry; `decay_at` = fraction of epochs):
* `constant`: s for every epoch;
* `step`: s * 0.01 from `decay_at` on (tanluren "global decay");
* `relax`: from `decay_at` on, the top 15% gammas (above the 85th percentile) get 99% less penalty.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import PruneError
from .model import DarknetModel
from .report import bn_gammas, gamma_stats, plot_gamma_histogram
from .train import Hook, TrainState

__all__ = ["SparsityConfig", "BNL1Hook", "SCHEDULES", "sparsity_layers", "sparse_train"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SparsityConfig:
    s: float = 1e-3
    mode: int = 0
    schedule: str = "constant"
    decay_at: float = 0.5
    keep_top: float = 0.15
    relief: float = 0.99

    def __post_init__(self) -> None:
        if self.s < 0:
            raise PruneError(f"--s {self.s} must be >= 0 (reference default 0.001)")
        if self.mode not in (0, 1, 2):
            raise PruneError(f"--prune {self.mode} must be 0 (normal/regular), 1 (shortcut/slim) or 2 (layer)")
        if self.schedule not in SCHEDULES:
            raise PruneError(f"--s-schedule {self.schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
        if not 0 <= self.decay_at <= 1 or not 0 < self.keep_top < 1 or not 0 <= self.relief <= 1:
            raise PruneError("decay_at/relief must be in [0, 1] and keep_top in (0, 1)")


def _constant(g: torch.Tensor, flat: torch.Tensor, cfg: SparsityConfig, late: bool) -> torch.Tensor:
    return torch.full_like(g, cfg.s)


def _step(g: torch.Tensor, flat: torch.Tensor, cfg: SparsityConfig, late: bool) -> torch.Tensor:
    return torch.full_like(g, cfg.s * (0.01 if late else 1.0))


def _relax(g: torch.Tensor, flat: torch.Tensor, cfg: SparsityConfig, late: bool) -> torch.Tensor:
    s = torch.full_like(g, cfg.s)
    if late:
        thr = torch.quantile(flat, 1.0 - cfg.keep_top)
        s[g.abs() > thr] *= 1.0 - cfg.relief
    return s


# name -> per-channel strength(gamma, all |gammas| of the set, config, past decay_at)
SCHEDULES: dict[str, Callable[[torch.Tensor, torch.Tensor, SparsityConfig, bool], torch.Tensor]] = {
    "constant": _constant, "step": _step, "relax": _relax}


def sparsity_layers(model: DarknetModel, mode: int) -> list[int]:
    """The BN convs penalised for `--prune mode` (the reference's prune set of that mode)."""
    from .prune.coupling import build_coupling, prunable_layers
    return prunable_layers(build_coupling(model.graph), mode)


class BNL1Hook(Hook):
    """`grad(gamma) += strength * sign(gamma)` once per optimizer step; per-epoch gamma statistics + histogram."""

    def __init__(self, config: SparsityConfig, layers: list[int]) -> None:
        self.config, self.layers = config, list(layers)
        self.history: list[dict] = []

    def _bns(self, model: torch.nn.Module) -> list[torch.nn.BatchNorm2d]:
        return [model.layers[i].bn for i in self.layers]

    @torch.no_grad()
    def after_backward(self, state: TrainState) -> None:
        bns = self._bns(state.model)
        if not bns or self.config.s == 0:
            return
        late = state.epoch >= self.config.decay_at * state.epochs
        flat = torch.cat([bn.weight.detach().abs().flatten() for bn in bns])
        strength = SCHEDULES[self.config.schedule]
        for bn in bns:
            g = bn.weight.detach()
            if bn.weight.grad is None:
                bn.weight.grad = torch.zeros_like(g)
            bn.weight.grad.add_(strength(g, flat, self.config, late) * torch.sign(g))

    def on_epoch_end(self, state: TrainState, metrics: dict) -> None:
        gammas = bn_gammas(state.model, self.layers)
        stats = gamma_stats(gammas)
        self.history.append({"epoch": state.epoch, **stats})
        metrics.update({"gamma_p50": stats.get("p50"), "gamma_below_1e-2": stats.get("share_below_1e-2")})
        log.info("epoch %d BN |gamma|: p5=%.4g p50=%.4g p95=%.4g, share < 1e-2 = %.3f", state.epoch,
                 stats.get("p5", 0), stats.get("p50", 0), stats.get("p95", 0), stats.get("share_below_1e-2", 0))
        if state.out_dir is not None and state.rank == 0 and gammas:
            plot_gamma_histogram(gammas, Path(state.out_dir) / f"gamma_epoch{state.epoch:03d}.png",
                                 f"BN |gamma| after epoch {state.epoch}")

    def summary(self, model: DarknetModel) -> dict:
        """Final gamma statistics and the largest --percent that empties no layer (suggestion)."""
        from .prune.mask import safe_percent
        gammas = bn_gammas(model, self.layers)
        out = {"gamma": gamma_stats(gammas), "sparsity_layers": len(self.layers), "history": self.history}
        if gammas:
            out["suggested_max_percent"], out["limiting_layer"] = safe_percent(gammas)
        return out


def sparse_train(model: DarknetModel, data_spec, config: SparsityConfig, train_config, device="cpu",
                 out_dir: str | Path | None = None, distributed=None) -> tuple[object, dict]:
    """`fit()` plus a `BNL1Hook` on the mode's layer set. Returns (TrainResult, sparsity summary)."""
    from .train import fit
    hook = BNL1Hook(config, sparsity_layers(model, config.mode))
    if not hook.layers:
        raise PruneError(f"--prune {config.mode}: this cfg has no BN conv in that prune set; try --prune 1")
    result = fit(model, data_spec, train_config, hooks=[hook], device=device, out_dir=out_dir,
                 distributed=distributed)
    return result, hook.summary(model)


@dataclass(frozen=True)
class SparseTrainJob:
    """What `yolo-compress sparse-train` runs: load, fit with BNL1Hook, save DIR/<cfgstem>-sparse pair + report."""
    cfg: str
    weights: str | None
    data: str
    out: str
    sparsity: SparsityConfig = SparsityConfig()
    train: "TrainConfig | None" = None  # default: TrainConfig() at the cfg's size
    device: str = "cpu"
    distributed: object = None          # a compress.train.DistConfig under torchrun


def run_sparse_train(job: SparseTrainJob) -> dict:
    """Returns the report dict (also written to OUT/report.json)."""
    import json

    from .data import load_data_spec
    from .fileio import write_text_atomic
    from .persist import load, save
    from .report import stage_figures
    from .train import TrainConfig
    model = load(job.cfg, job.weights, device=job.device)
    out = Path(job.out)
    train_config = job.train or TrainConfig(img_size=model.cfg.width, progress=False)
    result, summary = sparse_train(model, load_data_spec(job.data), job.sparsity, train_config, job.device, out,
                                   job.distributed)
    if job.distributed is not None and job.distributed.rank != 0:
        return {}  # rank 0 writes the pair and the report
    final = load(result.last_cfg, result.last_weights) if result.last_weights else model
    cfg_out, weights_out = out / f"{Path(job.cfg).stem}-sparse.cfg", out / f"{Path(job.cfg).stem}-sparse.weights"
    save(final, cfg_out, weights_out)
    size = (train_config.img_size, train_config.img_size)
    report = {**stage_figures(final, cfg_out, weights_out, result.metrics, size),
              **{k: v for k, v in summary.items() if k != "history"}, "s": job.sparsity.s,
              "prune": job.sparsity.mode, "s_schedule": job.sparsity.schedule, "epochs": train_config.epochs,
              "gamma_history": summary["history"]}
    write_text_atomic(out / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    return report
