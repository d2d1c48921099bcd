"""`yolo-compress prune` and `yolo-compress sparse-train`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from compress.darknet.persist import pair_paths
from compress.base.guard import Output
from compress.data.dataset import load_data_spec
from compress.train.config import DistConfig, TrainConfig
from compress.jobs.base import Job, PathLike, Report, out_folder, paths, register_job
from compress.jobs.ranks import process_device
from compress.jobs.training import TrainingJob, data_path, dataset_files
from compress.prune import PruneConfig
from compress.prune.costs import Target
from compress.prune.latency_target import LatencySettings
from compress.prune.pipeline import Measure, prune_files
from compress.prune.sparsity import SparsityConfig, run_sparse_train
from compress.base.checks import check_range
from compress.base.errors import PruneError
from compress.train.bn_adapt import DEFAULT_BN_ADAPT

__all__ = ["PruneJob", "SparseTrainJob", "LATENCY_RUNS"]

LATENCY_RUNS = 5  # --latency: CPU latency is the median of this many runs, before and after
TABLE_NAME = "latency_table.json"  # a latency target's table in --out when no --latency-table is given


@register_job
@dataclass(frozen=True)
class PruneJob(Job):
    """Channel or layer pruning of cfg/weights -> `out`/<cfg stem>-<method>.cfg/.weights (nothing with
    `dry_run`); mAP before/after on `data` when given. One of `target_latency` (ratio of the latency measured on
    `runtime` with `threads`), `target_ms`, `target_flops`, `target_params` replaces `percent`."""

    command: ClassVar[str] = "prune"
    produces_model: ClassVar[bool] = True  # recipes continue from its report's cfg/weights
    in_summary: ClassVar[bool] = True

    cfg: PathLike
    weights: PathLike | None
    out: PathLike
    method: str = PruneConfig.method            # the library config's defaults, stated once
    percent: float = PruneConfig.percent
    shortcuts: int = PruneConfig.shortcuts
    round_to: int | None = PruneConfig.round_to
    min_keep: float = PruneConfig.min_keep
    layer_keep: float = PruneConfig.layer_keep
    no_compensate: bool = not PruneConfig.compensate
    data: PathLike | None = None
    img_size: int | None = None
    letterbox: bool | None = None
    dry_run: bool = False
    latency: bool = False
    target_latency: float | None = None
    target_ms: float | None = None
    target_flops: float | None = None
    target_params: float | None = None
    runtime: str = LatencySettings.runtime
    threads: int = LatencySettings.threads
    latency_table: PathLike | None = None
    refine: int = LatencySettings.refine
    device: str = "auto"      # resolved when it runs (auto: a GPU if one is visible)
    bn_adapt: int = DEFAULT_BN_ADAPT  # batches of --data's training images (0: off; no --data: none)

    def __post_init__(self) -> None:
        self.prune_config(), self.measure(), self.latency_settings()  # their rules and messages
        check_range("--bn-adapt", self.bn_adapt, 0, error=PruneError)

    def target(self) -> Target | None:
        given = {name: getattr(self, name) for name in ("target_latency", "target_ms", "target_flops",
                                                        "target_params") if getattr(self, name) is not None}
        if len(given) > 1:
            raise PruneError(f"give one target, not {' and '.join('--' + k.replace('_', '-') for k in given)}")
        if not given:
            return None
        (name, value), = given.items()
        metric = {"target_ms": "latency"}.get(name, name.removeprefix("target_"))
        return Target(metric, value=value) if name == "target_ms" else Target(metric, ratio=value)

    def prune_config(self) -> PruneConfig:
        return PruneConfig(method=self.method, percent=self.percent, shortcuts=self.shortcuts,
                           round_to=self.round_to, min_keep=self.min_keep, layer_keep=self.layer_keep,
                           compensate=not self.no_compensate, target=self.target())

    def latency_settings(self) -> LatencySettings:
        return LatencySettings(self.runtime, self.threads, self.table_path(), self.refine, measure=not self.dry_run)

    def table_path(self) -> Path | None:
        """Where a latency target's table is read and kept: --latency-table, else OUT/latency_table.json (a dry
        run without --latency-table keeps none)."""
        target = self.target()
        if target is None or target.metric != "latency":
            return None
        if self.latency_table is not None:
            return Path(self.latency_table)
        return None if self.dry_run else Path(self.out) / TABLE_NAME

    def measure(self) -> Measure:
        return Measure(self.data, self.img_size, self.letterbox, process_device(self.device, None),
                       LATENCY_RUNS if self.latency else 0)

    def pruned_pair(self) -> tuple[Path, Path]:
        return pair_paths(self.out, f"{Path(self.cfg).stem}-{self.method}")

    def inputs(self) -> tuple[Path, ...]:
        return paths(self.cfg, self.weights, self.data)

    def data_files(self) -> tuple[Path, ...]:
        return dataset_files(self.data) if self.data is not None else ()

    def outputs(self) -> tuple[Output, ...]:
        table = self.table_path()
        if table is None:
            return out_folder(self.out, *self.pruned_pair())
        if self.latency_table is None:
            return out_folder(self.out, *self.pruned_pair(), table)
        return out_folder(self.out, *self.pruned_pair()) + (Output(table, "file", "--latency-table"),)

    def out_dir(self) -> Path | None:
        return None if self.dry_run else Path(self.out)

    def writes_nothing(self) -> bool:
        return self.dry_run

    def run(self, dist: DistConfig | None = None) -> Report:
        outputs = None if self.dry_run else self.pruned_pair()
        return self.report(prune_files(self.cfg, self.weights, self.prune_config(), outputs, self.measure(),
                                       self.latency_settings(), self.bn_adapt))


@register_job
@dataclass(frozen=True)
class SparseTrainJob(TrainingJob):
    """Training with an L1 penalty on BN gammas (network slimming) -> `out`/<cfg stem>-sparse.cfg/.weights."""

    command: ClassVar[str] = "sparse-train"
    produces_model: ClassVar[bool] = True  # recipes continue from its report's cfg/weights
    in_summary: ClassVar[bool] = True

    cfg: PathLike
    weights: PathLike | None
    data: PathLike
    out: PathLike
    train: TrainConfig | None = None
    val: PathLike | None = None
    s: float = 1e-3
    prune: int = 0
    s_schedule: str = "constant"
    l1_update: str = "auto"
    target_sparsity: float | None = None
    s_growth: float = 2.0
    device: str = "auto"      # resolved when it runs (auto: a GPU if one is visible)
    hyp: PathLike | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.sparsity()

    def sparsity(self) -> SparsityConfig:
        return SparsityConfig(s=self.s, mode=self.prune, schedule=self.s_schedule, update=self.l1_update,
                              target=self.target_sparsity, growth=self.s_growth)

    def sparse_pair(self) -> tuple[Path, Path]:
        return pair_paths(self.out, f"{Path(self.cfg).stem}-sparse")

    def inputs(self) -> tuple[Path, ...]:
        return paths(self.cfg, self.weights, data_path(self.data), self.val, self.hyp)

    def data_files(self) -> tuple[Path, ...]:
        return dataset_files(self.data, self.val)

    def outputs(self) -> tuple[Output, ...]:
        return out_folder(self.out, *self.sparse_pair()) + self.fit_outputs(self.out) + self.cache_output()

    def out_dir(self) -> Path:
        return Path(self.out)

    def run(self, dist: DistConfig | None = None) -> Report:
        device = process_device(self.device, dist)
        data = load_data_spec(self.data, self.val, training=True)
        figures = run_sparse_train(self.cfg, self.weights, data, self.sparsity(), self.train, self.sparse_pair(),
                                   self.out, device, dist)
        return self.report(figures)
