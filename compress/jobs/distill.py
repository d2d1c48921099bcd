"""`yolo-compress distill`: fine-tune a student with knowledge distilled from a teacher (strategies 1-5)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

from compress.base.guard import Output
from compress.darknet.persist import load
from compress.data.dataset import load_data_spec
from compress.distill import distill, distilled_pair
from compress.distill.config import DEFAULT_STRATEGY, DistillConfig, parse_pairs
from compress.train.config import DistConfig, TrainConfig
from compress.jobs.base import PathLike, Report, out_folder, paths, register_job
from compress.jobs.ranks import process_device
from compress.jobs.training import TrainingJob, data_path, dataset_files
from compress.train.checkpoint import seed_all

__all__ = ["DistillJob"]


@register_job
@dataclass(frozen=True)
class DistillJob(TrainingJob):
    """The student cfg/weights fine-tuned with the teacher t_cfg/t_weights on `data`; writes
    `out`/distilled.cfg + .weights (training runs in `out`/kd, `out`/baseline)."""

    command: ClassVar[str] = "distill"
    produces_model: ClassVar[bool] = True  # recipes continue from its report's cfg/weights
    in_summary: ClassVar[bool] = True
    train_defaults: ClassVar[Mapping[str, Any]] = {"epochs": 30}
    flags: ClassVar[Mapping[str, str]] = {"t_cfg": "--t_cfg", "t_weights": "--t_weights"}

    cfg: PathLike
    weights: PathLike | None
    t_cfg: PathLike
    t_weights: PathLike
    data: PathLike
    out: PathLike
    train: TrainConfig | None = None
    val: PathLike | None = None
    kd: int = DEFAULT_STRATEGY
    temperature: float | None = None
    ratio_soft: float | None = None
    ratio_box: float | None = None
    ratio_feat: float | None = None
    logit_kd: str | None = None
    feature_kd: str | None = None
    reference: bool = False
    baseline: bool = False
    pairs: str | None = None
    w_soft: float | None = None
    w_box: float | None = None
    w_feat: float | None = None
    reference_kd1: bool = False
    device: str = "auto"      # resolved when it runs (auto: a GPU if one is visible)
    hyp: PathLike | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.distill_config()

    def distill_config(self) -> DistillConfig:
        given = dict(temperature=self.temperature, logits=self.logit_kd, feature=self.feature_kd)
        options = dict(w_soft=self.w_soft, w_box=self.w_box, w_feat=self.w_feat,
                       ratios=(self.ratio_soft, self.ratio_box, self.ratio_feat), pairs=parse_pairs(self.pairs),
                       baseline=self.baseline, reference_kd1=self.reference_kd1,
                       **{k: v for k, v in given.items() if v is not None})
        if self.reference:
            return DistillConfig.reference(self.kd, **options)
        return DistillConfig(strategy=self.kd, **options)

    def inputs(self) -> tuple[Path, ...]:
        return paths(self.cfg, self.weights, self.t_cfg, self.t_weights, data_path(self.data), self.val, self.hyp)

    def data_files(self) -> tuple[Path, ...]:
        return dataset_files(self.data, self.val)

    def outputs(self) -> tuple[Output, ...]:
        return out_folder(self.out, *distilled_pair(self.out)) + self.cache_output()

    def out_dir(self) -> Path:
        return Path(self.out)

    def checkpoints(self) -> tuple[Path, ...]:
        return (Path(self.out) / "kd" / "last.pt", Path(self.out) / "baseline" / "last.pt")   # distill's two runs

    def run(self, dist: DistConfig | None = None) -> Report:
        device = process_device(self.device, dist)
        data = load_data_spec(self.data, self.val, training=True)
        seed_all(self.train.seed)  # a student without --weights starts from --seed's initialisation
        student = load(self.cfg, self.weights, device=device)
        teacher = load(self.t_cfg, self.t_weights, device=device)
        result = distill(student, teacher, data, self.distill_config(), self.train, device, self.out, dist,
                         outputs=distilled_pair(self.out))
        return self.report(result.to_dict())
