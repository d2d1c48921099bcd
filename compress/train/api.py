"""`train_model`: the whole `train` command as one library call (load, fit, save, report)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from compress.data.dataset import DataSpec, load_data_spec
from compress.detection.losses import init_head_biases
from compress.darknet.persist import load
from compress.darknet.summary import stage_figures
from compress.train.checkpoint import seed_all
from compress.train.config import DistConfig, TrainConfig, TrainError
from compress.train.hooks import Hook
from compress.train.loop import TrainResult, fit

__all__ = ["train_model"]

log = logging.getLogger(__name__)


def train_model(cfg: str | os.PathLike, weights: str | os.PathLike | None, data: str | os.PathLike | DataSpec,
                config: TrainConfig, out_dir: str | os.PathLike, device: str | torch.device = "cpu",
                cutoff: int | None = None, distributed: DistConfig | None = None,
                hooks: tuple[Hook, ...] = ()) -> dict:
    """Load cfg (+ weights, the first `cutoff` layers only if given), train on `data`, write `TrainFiles(out_dir)`
    and return the report figures ({} on torchrun ranks > 0: rank 0 writes and measures).
    Without weights the detection-head biases get prior initialisation (training from scratch).
    `compress.jobs.run_job(TrainJob(...))` is the whole command: it guards the outputs first and writes
    `out_dir/report.json`."""
    seed_all(config.seed)  # from scratch (or past --cutoff) the initial weights come from --seed too
    model = load(cfg, weights, device=device, cutoff=cutoff)
    if weights is None or cutoff is not None:
        init_head_biases(model, config.img_size, start=0 if weights is None else cutoff)
    spec = load_data_spec(data)
    if spec.nc != model.num_classes:
        raise TrainError(f"{cfg}: [yolo] classes={model.num_classes} but {data} has {spec.nc} classes; "
                         "set classes= (and the filters before each [yolo]) to match the data")
    result = fit(model, spec, config, hooks=hooks, device=device, out_dir=Path(out_dir), distributed=distributed)
    if distributed is not None and not distributed.is_main:
        return {}
    return {**_report(result, config, device), "world_size": distributed.world_size if distributed else 1}


def _report(result: TrainResult, config: TrainConfig, device: str | torch.device) -> dict:
    best = load(result.best_cfg, result.best_weights, device=device)
    rows = [r for r in result.history if r.get("map50") is not None]
    best_row = max(rows, key=lambda r: r["map50"]) if rows else {}
    figures = stage_figures(best, result.best_cfg, result.best_weights, metrics=best_row,
                            img_size=(config.img_size, config.img_size))
    return {**figures, "epochs": result.epochs, "final_loss": result.final_loss,
            "best_epoch": best_row.get("epoch"), "last_cfg": str(result.last_cfg),
            "last_weights": str(result.last_weights), "checkpoint": str(result.checkpoint),
            **result.health(), "train_config": config.to_dict(), "history": result.history}
