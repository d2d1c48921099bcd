"""File-level pruning job (what `yolo-compress prune` runs): load, measure, prune, measure, save, report."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compress.base.errors import PruneError
from compress.darknet.model import DarknetModel
from compress.darknet.persist import load, save
from compress.darknet.summary import stage_figures
from compress.detection.evaluate import EvalConfig, evaluate
from compress.prune.api import prune
from compress.prune.registry import PruneConfig, PruneResult

__all__ = ["PruneJob", "run_prune"]

log = logging.getLogger(__name__)
_STAGE_KEYS = ("params", "gflops", "size_mb", "latency_ms", "map50", "map50_95")


@dataclass(frozen=True)
class PruneJob:
    cfg: str
    weights: str | None
    out: str
    config: PruneConfig = field(default_factory=PruneConfig)
    data: str | None = None
    img_size: int | None = None
    dry_run: bool = False
    device: str = "cpu"
    latency_runs: int = 0   # CPU latency repetitions before and after; 0 = not measured (`--latency` sets 5)
    letterbox: bool | None = None   # eval input geometry; None: the cfg's [net] letter_box

    def __post_init__(self) -> None:
        if self.latency_runs < 0:
            raise PruneError(f"latency_runs {self.latency_runs} must be >= 0 (0 = do not measure latency)")
        if self.img_size is not None and self.img_size % 32:
            raise PruneError(f"--img-size {self.img_size} must be a multiple of 32")

    @property
    def outputs(self) -> tuple[Path, Path]:
        stem = f"{Path(self.cfg).stem}-{self.config.method}"
        return Path(self.out) / f"{stem}.cfg", Path(self.out) / f"{stem}.weights"


def _evaluate(model: DarknetModel, job: PruneJob, size: int) -> dict:
    if not job.data:
        return {}
    result = evaluate(model, job.data, EvalConfig(img_size=size, progress=False, letterbox=job.letterbox),
                      job.device)
    return {"map50": result.map50, "map50_95": result.map50_95}


def _figures(model: DarknetModel, job: PruneJob, size: int, paths: tuple) -> dict:
    with torch.no_grad():
        return stage_figures(model, *paths, metrics=_evaluate(model, job, size), img_size=(size, size),
                             latency_runs=job.latency_runs)


def run_prune(job: PruneJob) -> tuple[dict, PruneResult, DarknetModel]:
    """Returns (report dict, PruneResult, original model). Writes nothing when `dry_run`.
    `compress.jobs.run_job(job)` guards the outputs first and writes OUT/report.json."""
    model = load(job.cfg, job.weights, device=job.device)
    size = job.img_size or model.cfg.width
    result = prune(model, job.config)
    cfg_out, weights_out = job.outputs
    if not job.dry_run:
        cfg_out.parent.mkdir(parents=True, exist_ok=True)
        save(result.model, cfg_out, weights_out)
    before = _figures(model, job, size, (job.cfg, job.weights))
    after = _figures(result.model, job, size, (None, None) if job.dry_run else (cfg_out, weights_out))
    report = {**after, **{f"{k}_before": before[k] for k in _STAGE_KEYS},
              **{f"{k}_after": after[k] for k in _STAGE_KEYS}, "method": job.config.method,
              "percent": job.config.percent, "shortcuts": job.config.shortcuts, "round_to": job.config.rounding,
              "img_size": size, "removed_blocks": list(result.removed_blocks),
              "channels": [{"layer": i, "before": b, "after": a} for i, _, b, a in result.channel_rows(model)],
              "info": result.info, "dry_run": job.dry_run}
    return report, result, model
