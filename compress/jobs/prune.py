"""`yolo-compress prune` and `yolo-compress sparse-train`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Mapping

from compress.darknet.persist import load, pair_paths
from compress.distill.config import DEFAULT_STRATEGY, DistillConfig
from compress.distill.hook import DistillHook
from compress.base.guard import Output
from compress.data.dataset import load_data_spec
from compress.train.config import DistConfig, TrainConfig
from compress.jobs.base import Job, PathLike, Report, out_folder, paths, register_job
from compress.jobs.ranks import process_device
from compress.jobs.training import TrainingJob, data_path, dataset_files
from compress.prune import PruneConfig
from compress.prune.costs import Target
from compress.prune.latency_target import LatencySettings
from compress.prune.pipeline import Measure, check_reconstruct, prune_files
from compress.prune.fade import FadeConfig
from compress.prune.sparsity import SparsityConfig, run_sparse_train
from compress.base.checks import check_choice, check_range
from compress.base.errors import PruneError
from compress.train.bn_adapt import DEFAULT_BN_ADAPT

__all__ = ["PruneJob", "SparseTrainJob", "LATENCY_RUNS"]

LATENCY_RUNS = 5  # --latency: CPU latency is the median of this many runs, before and after
TABLE_NAME = "latency_table.json"  # a latency target's table in --out when no --latency-table is given


TARGET_OPTIONS = ("target_latency", "target_ms", "target_flops", "target_params")


def target_of(options: Mapping[str, float | None]) -> Target | None:
    """The one target among the TARGET_OPTIONS given (None: --percent decides); two are an error."""
    given = {name: value for name, value in options.items() if value is not None}
    if len(given) > 1:
        raise PruneError(f"give one target, not {' and '.join('--' + k.replace('_', '-') for k in given)}")
    if not given:
        return None
    (name, value), = given.items()
    metric = {"target_ms": "latency"}.get(name, name.removeprefix("target_"))
    return Target(metric, value=value) if name == "target_ms" else Target(metric, ratio=value)


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
    layer_keep: float | None = PruneConfig.layer_keep   # None: registry.LAYER_KEEP, by kind of plan
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
    threshold: float | None = PruneConfig.threshold
    runtime: str = LatencySettings.runtime
    threads: int = LatencySettings.threads
    latency_table: PathLike | None = None
    refine: int = LatencySettings.refine
    remove_units: bool = LatencySettings.remove_units
    device: str = "auto"      # resolved when it runs (auto: a GPU if one is visible)
    bn_adapt: int = DEFAULT_BN_ADAPT  # batches of --data's training images (0: off; no --data: none)
    reconstruct: int = 0              # least-squares refit on this many --data training images (0: off)

    def __post_init__(self) -> None:
        self.prune_config(), self.measure(), self.latency_settings()  # their rules and messages
        check_range("--bn-adapt", self.bn_adapt, 0, error=PruneError)
        check_range("--reconstruct", self.reconstruct, 0, error=PruneError)
        check_reconstruct(self.reconstruct, self.data)

    def target(self) -> Target | None:
        return target_of({name: getattr(self, name) for name in TARGET_OPTIONS})

    def prune_config(self) -> PruneConfig:
        return PruneConfig(method=self.method, percent=self.percent, shortcuts=self.shortcuts,
                           round_to=self.round_to, min_keep=self.min_keep, layer_keep=self.layer_keep,
                           compensate=not self.no_compensate, target=self.target(), threshold=self.threshold)

    def latency_settings(self) -> LatencySettings:
        return LatencySettings(self.runtime, self.threads, self.table_path(), self.refine, measure=not self.dry_run,
                               remove_units=self.remove_units)

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
                                       self.latency_settings(), self.bn_adapt, self.reconstruct))


def _l1(job: "SparseTrainJob") -> SparsityConfig:
    return SparsityConfig(s=job.s, mode=job.prune, schedule=job.s_schedule, update=job.l1_update,
                          target=job.target_sparsity, growth=job.s_growth)


def _fade(job: "SparseTrainJob") -> FadeConfig:
    target = target_of({"target_flops": job.target_flops, "target_params": job.target_params})
    plan = PruneConfig(method=job.method, percent=job.percent, round_to=job.round_to, layer_keep=job.layer_keep,
                       target=target)
    return FadeConfig(plan=plan, end=job.fade_end, importance=job.importance)


# --sparsity NAME -> the config of its hook (prune/sparsity.py: L1 on BN gammas; prune/fade.py: fade a plan)
SPARSITY: dict[str, Callable[["SparseTrainJob"], SparsityConfig | FadeConfig]] = {"l1": _l1, "fade": _fade}
_FADE_ONLY = ("method", "percent", "round_to", "layer_keep", "target_flops", "target_params", "fade_end", "importance")


@register_job
@dataclass(frozen=True)
class SparseTrainJob(TrainingJob):
    """Sparse training -> `out`/<cfg stem>-sparse.cfg/.weights: L1 on BN gammas (`sparsity` l1, network
    slimming) or fading exactly the channels a prune plan cuts (`sparsity` fade: `method` with `percent` or
    `target_flops`/`target_params`, zero at `fade_end` of training); with `t_cfg`/`t_weights`, distilling
    from that teacher (strategy `kd`) meanwhile."""

    command: ClassVar[str] = "sparse-train"
    produces_model: ClassVar[bool] = True  # recipes continue from its report's cfg/weights
    in_summary: ClassVar[bool] = True
    flags: ClassVar[Mapping[str, str]] = {"t_cfg": "--t_cfg", "t_weights": "--t_weights"}

    cfg: PathLike
    weights: PathLike | None
    data: PathLike
    out: PathLike
    train: TrainConfig | None = None
    val: PathLike | None = None
    sparsity: str = "l1"
    s: float = 1e-3
    prune: int = 0
    s_schedule: str = "constant"
    l1_update: str = "auto"
    target_sparsity: float | None = None
    s_growth: float = 2.0
    method: str = "slim"
    percent: float = PruneConfig.percent
    round_to: int | None = PruneConfig.round_to
    layer_keep: float | None = PruneConfig.layer_keep   # None: registry.LAYER_KEEP, by kind of plan
    target_flops: float | None = None
    target_params: float | None = None
    fade_end: float = FadeConfig.end
    importance: str = FadeConfig.importance
    t_cfg: PathLike | None = None
    t_weights: PathLike | None = None
    kd: int = DEFAULT_STRATEGY
    device: str = "auto"      # resolved when it runs (auto: a GPU if one is visible)
    hyp: PathLike | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("--sparsity", self.sparsity, tuple(SPARSITY), error=PruneError)
        if self.sparsity != "fade":
            given = [n for n in _FADE_ONLY if getattr(self, n) != getattr(SparseTrainJob, n, None)]
            if given:
                raise PruneError(f"--{given[0].replace('_', '-')} plans a fade: add --sparsity fade (with --sparsity "
                                 "l1 the prune step chooses its channels after training)")
        if (self.t_cfg is None) != (self.t_weights is None):
            raise PruneError("--t_cfg and --t_weights go together: the teacher to distill from while sparsifying")
        DistillConfig(strategy=self.kd)  # its rules and messages
        self.sparsity_config()

    def sparsity_config(self) -> SparsityConfig | FadeConfig:
        return SPARSITY[self.sparsity](self)

    def sparse_pair(self) -> tuple[Path, Path]:
        return pair_paths(self.out, f"{Path(self.cfg).stem}-sparse")

    def inputs(self) -> tuple[Path, ...]:
        return paths(self.cfg, self.weights, data_path(self.data), self.val, self.hyp, self.t_cfg, self.t_weights)

    def data_files(self) -> tuple[Path, ...]:
        return dataset_files(self.data, self.val)

    def outputs(self) -> tuple[Output, ...]:
        return out_folder(self.out, *self.sparse_pair()) + self.fit_outputs(self.out) + self.cache_output()

    def out_dir(self) -> Path:
        return Path(self.out)

    def run(self, dist: DistConfig | None = None) -> Report:
        device = process_device(self.device, dist)
        data = load_data_spec(self.data, self.val, training=True)
        hooks, kd = [], {"kd": None}
        if self.t_cfg is not None:
            hooks = [DistillHook(load(self.t_cfg, self.t_weights, device=device), DistillConfig(strategy=self.kd))]
            kd = {"kd": self.kd, "teacher": [str(self.t_cfg), str(self.t_weights)]}
        figures = run_sparse_train(self.cfg, self.weights, data, self.sparsity_config(), self.train,
                                   self.sparse_pair(), self.out, device, dist, hooks)
        return self.report({**figures, **kd} if figures else figures)
