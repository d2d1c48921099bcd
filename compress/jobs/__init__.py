"""One job contract for every command: a frozen job, one registry, `run_job(job) -> report`.

Example (the Python equivalent of `yolo-compress prune --cfg m.cfg --weights m.weights --out runs/p`):
    >>> from compress.jobs import PruneJob, run_job
    >>> report = run_job(PruneJob("m.cfg", "m.weights", "runs/p"))   # guarded; writes runs/p/report.json
    >>> report["cfg"], report["weights"]                              # the pruned pair

See `contract.py` for the steps `run_job` takes, and docs/design.md ("Job contract").
"""
from __future__ import annotations

from compress.jobs.contract import JOBS, REPORT_NAME, JobKind, job_kind, job_paths, register_job, run_job, write_report
from compress.jobs.training import DistillJob, PruneJob, QuantizeJob, SparseTrainJob, TrainJob
from compress.jobs.tools import AnchorsJob, ConvertConfig, DetectJob, EvalJob, ExportJob, InfoJob, RecipeJob, SynthJob

__all__ = ["run_job", "job_paths", "job_kind", "register_job", "write_report", "JobKind", "JOBS", "REPORT_NAME",
           "TrainJob", "DistillJob", "PruneJob", "QuantizeJob", "SparseTrainJob", "InfoJob", "EvalJob", "DetectJob",
           "ExportJob", "AnchorsJob", "SynthJob", "ConvertConfig", "RecipeJob"]
