"""`yolo-compress train`: plain training / fine-tuning (single process or under torchrun)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

from compress.base.checks import check_range
from compress.base.guard import Output
from compress.data.dataset import load_data_spec
from compress.train.config import DistConfig, TrainConfig, TrainError
from compress.jobs.base import PathLike, Report, out_folder, paths, register_job
from compress.jobs.ranks import process_device
from compress.jobs.training import FIT_OPTIONS, TrainingJob, data_path, dataset_files
from compress.train.api import train_model

__all__ = ["TrainJob"]


@register_job
@dataclass(frozen=True)
class TrainJob(TrainingJob):
    """cfg (+ weights, the first `cutoff` layers) trained on `data` (`val` replaces its valid split) into `out`
    (best/last pairs, last.pt, results.csv). `hyp`: the YAML the training options were resolved with.

    Training options (in `train`) take their precedence from `make_train`: TrainConfig defaults < fine-tune
    defaults (with --weights) < the --hyp file < options the user gave."""

    command: ClassVar[str] = "train"
    produces_model: ClassVar[bool] = True  # recipes continue from its report's cfg/weights
    in_summary: ClassVar[bool] = True
    train_options: ClassVar[tuple[str, ...]] = FIT_OPTIONS + (
        "scheduler", "resume", "no_ema", "amp", "accumulate", "no_augment", "eval_every")

    cfg: PathLike
    weights: PathLike | None
    data: PathLike
    out: PathLike
    train: TrainConfig | None = None
    val: PathLike | None = None
    device: str = "auto"      # resolved when it runs (auto: a GPU if one is visible)
    cutoff: int | None = None
    hyp: PathLike | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("--cutoff", self.cutoff, 1, error=TrainError)

    @classmethod
    def pretrained(cls, options: Mapping[str, Any]) -> bool:
        return options.get("weights") is not None and options.get("cutoff") is None  # --cutoff: transfer

    def inputs(self) -> tuple[Path, ...]:
        return paths(self.cfg, self.weights, data_path(self.data), self.val, self.hyp)

    def data_files(self) -> tuple[Path, ...]:
        return dataset_files(self.data, self.val)

    def outputs(self) -> tuple[Output, ...]:
        return out_folder(self.out) + self.fit_outputs(self.out) + self.cache_output()

    def out_dir(self) -> Path:
        return Path(self.out)

    def run(self, dist: DistConfig | None = None) -> Report:
        device = process_device(self.device, dist)
        data = load_data_spec(self.data, self.val, training=True)
        figures = train_model(self.cfg, self.weights, data, self.train, self.out, device, self.cutoff, dist)
        return self.report(figures)
