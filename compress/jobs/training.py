"""Jobs of the model-producing commands: train, sparse-train, prune, quantize, distill.

Each writes its output Darknet pair into its `out` folder and the report's `cfg`/`weights` name that pair (the
OUTPUT CONVENTION in docs/design.md; recipes thread models through these keys).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.distill.config import DistillConfig
from compress.base.guard import Output
from compress.prune.pipeline import PruneJob, run_prune
from compress.quant.pipeline import QuantizeJob, check_verified, output_paths, quantize
from compress.prune.sparsity import SparseTrainJob, run_sparse_train
from compress.train.config import DistConfig, TrainConfig
from compress.jobs.contract import JobKind, register_job

__all__ = ["TrainJob", "DistillJob", "PruneJob", "QuantizeJob", "SparseTrainJob"]


def _data_path(data: Any) -> str | os.PathLike | None:
    """A data argument that is a path (a DataSpec built in Python has no file to protect)."""
    return data if isinstance(data, (str, os.PathLike)) else None


def _out(job: Any, *files: Path) -> tuple[Output, ...]:
    return (Output(Path(job.out), "dir", "--out"), *(Output(f, "file", "--out") for f in files))


def _cache_dir(train: TrainConfig | None) -> tuple[Output, ...]:
    return (Output(Path(train.cache_dir), "dir", "--cache-dir"),) if train and train.cache_dir else ()


@dataclass(frozen=True)
class TrainJob:
    """`yolo-compress train`: cfg (+ weights, the first `cutoff` layers) trained on `data` (`val` replaces its
    valid split) into `out` (best/last pairs, last.pt, results.csv). `hyp`: the YAML `config` was resolved
    from (declared so no output can replace it)."""

    cfg: str | os.PathLike
    weights: str | os.PathLike | None
    data: Any
    out: str | os.PathLike
    config: TrainConfig = field(default_factory=TrainConfig)
    device: str = "cpu"
    cutoff: int | None = None
    distributed: DistConfig | None = None
    val: str | os.PathLike | None = None
    hyp: str | os.PathLike | None = None


def _run_train(job: TrainJob) -> dict:
    from compress.data.dataset import load_data_spec
    from compress.train import train_model
    data = load_data_spec(job.data, job.val, training=True)
    return train_model(job.cfg, job.weights, data, job.config, job.out, job.device, job.cutoff, job.distributed)[1]


register_job(TrainJob, JobKind(
    "train", _run_train,
    inputs=lambda j: (j.cfg, j.weights, _data_path(j.data), j.val, j.hyp),
    outputs=lambda j: _out(j, *(Path(j.out) / f"{n}.{e}" for n in ("best", "last") for e in ("cfg", "weights")))
    + _cache_dir(j.config),
    out_dir=lambda j: j.out))


@dataclass(frozen=True)
class DistillJob:
    """`yolo-compress distill`: the student cfg/weights fine-tuned with the teacher t_cfg/t_weights on `data`;
    writes `out/distilled.cfg` + `.weights` (training runs in `out/kd`, `out/baseline`)."""

    cfg: str | os.PathLike
    weights: str | os.PathLike | None
    t_cfg: str | os.PathLike
    t_weights: str | os.PathLike
    data: Any
    out: str | os.PathLike
    config: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    device: str = "cpu"
    distributed: DistConfig | None = None
    val: str | os.PathLike | None = None


def _run_distill(job: DistillJob) -> dict:
    from compress.data.dataset import load_data_spec
    from compress.distill import distill
    from compress.darknet.persist import load
    from compress.train.checkpoint import seed_all
    data = load_data_spec(job.data, job.val, training=True)
    seed_all(job.train.seed)  # a student without --weights starts from --seed's initialisation
    student, teacher = load(job.cfg, job.weights, device=job.device), load(job.t_cfg, job.t_weights, device=job.device)
    result = distill(student, teacher, data, job.config, job.train, job.device, job.out, job.distributed)
    return {} if job.distributed is not None and not job.distributed.is_main else result.to_dict()


register_job(DistillJob, JobKind(
    "distill", _run_distill,
    inputs=lambda j: (j.cfg, j.weights, j.t_cfg, j.t_weights, _data_path(j.data), j.val),
    outputs=lambda j: _out(j, Path(j.out) / "distilled.cfg", Path(j.out) / "distilled.weights")
    + _cache_dir(j.train),
    out_dir=lambda j: j.out))


def _run_sparse(job: SparseTrainJob) -> dict:
    return run_sparse_train(job)


def _sparse_outputs(job: SparseTrainJob) -> tuple[Output, ...]:
    stem = Path(job.cfg).stem
    return _out(job, Path(job.out) / f"{stem}-sparse.cfg", Path(job.out) / f"{stem}-sparse.weights") \
        + _cache_dir(job.train)


register_job(SparseTrainJob, JobKind(
    "sparse-train", _run_sparse,
    inputs=lambda j: (j.cfg, j.weights, _data_path(j.data), getattr(j, "val", None)),
    outputs=_sparse_outputs, out_dir=lambda j: j.out))


def _run_prune(job: PruneJob) -> dict:
    report, result, model = run_prune(job)
    types = {i: t for i, t, _, _ in result.channel_rows(model)}
    report["channels"] = [{**c, "type": types.get(c["layer"])} for c in report["channels"]]
    return report


register_job(PruneJob, JobKind(
    "prune", _run_prune,
    inputs=lambda j: (j.cfg, j.weights, j.data),
    outputs=lambda j: _out(j, *j.outputs),
    out_dir=lambda j: None if j.dry_run else j.out))


def _run_quantize(job: QuantizeJob) -> dict:
    return quantize(job, getattr(job, "device", None) or "cpu")


register_job(QuantizeJob, JobKind(
    "quantize", _run_quantize,
    inputs=lambda j: (j.cfg, j.weights, _data_path(j.data), getattr(j, "val", None)),
    outputs=lambda j: _out(j, *output_paths(j).values()),
    out_dir=lambda j: j.out,
    check=lambda j, report, written: check_verified(report, written)))
