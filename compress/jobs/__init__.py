"""One job per command: a frozen job whose fields are the command's options, one registry, `run_job`.

Example (the Python equivalent of `yolo-compress prune --cfg m.cfg --weights m.weights --out runs/p`):
    >>> from compress.jobs import PruneJob, run_job
    >>> report = run_job(PruneJob("m.cfg", "m.weights", "runs/p", method="slim", percent=0.5))
    >>> report["cfg"], report["weights"]                              # the pruned pair

`JOBS["prune"].from_dict({...}, where="recipe.yaml:12")` builds a job from plain option values (recipes).
The `run` command's job (`compress.recipe.RecipeJob`) lives with the recipes, above the jobs it runs.
See `base.py` for the steps `run_job` takes, and docs/design.md ("Job contract", "Adding a command").
"""
from __future__ import annotations

from compress.jobs.base import CLI_ONLY, JOBS, REPORT_NAME, Job, Report, job_paths, register_job, run_job, write_report
from compress.jobs.data import ConvertJob, SplitJob, SynthJob
from compress.jobs.distill import DistillJob
from compress.jobs.benchmark import BenchmarkJob
from compress.jobs.export import ExportJob
from compress.jobs.inspect import AnchorsJob, DetectJob, EvalJob, InfoJob
from compress.jobs.prune import PruneJob, SparseTrainJob
from compress.jobs.quantize import QuantizeJob
from compress.jobs.train import TrainJob

__all__ = ["run_job", "job_paths", "register_job", "write_report", "Job", "Report", "JOBS", "REPORT_NAME", "CLI_ONLY",
           "TrainJob", "SparseTrainJob", "PruneJob", "QuantizeJob", "DistillJob", "InfoJob", "EvalJob", "DetectJob",
           "ExportJob", "AnchorsJob", "SynthJob", "ConvertJob", "BenchmarkJob", "SplitJob"]
