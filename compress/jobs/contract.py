"""The job contract: one frozen job per command, one registry, one `run_job` that guards, runs and reports.

A job is a frozen dataclass holding a command's inputs, outputs and options (built by the CLI from its flags,
or by a Python user). Its `JobKind` (registered once per job type) says which paths it reads and writes and
how to run it. `run_job` is the only way a command runs:
1. the output guard (`compress.base.guard`) on the declared inputs/outputs (+ the report path), before any work;
2. the run function, which returns the report dict (`{}` on torchrun ranks > 0: rank 0 writes);
3. `OUT/report.json` (when the job has an output folder) and `report_path`, written atomically;
4. an optional post-report check (quantize's verification: it fails after the report and artifacts exist).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from compress.base.errors import CompressError
from compress.base.fileio import write_text_atomic
from compress.base.guard import JobPaths, Output, check_job_paths

__all__ = ["JobKind", "JOBS", "register_job", "job_kind", "job_paths", "run_job", "write_report", "REPORT_NAME"]

REPORT_NAME = "report.json"
PathLike = str | os.PathLike


def _none(job: Any) -> None:
    return None


def _resume(job: Any) -> bool:
    """A job resumes when it (or its training config) says so."""
    train = getattr(job, "train", None) or getattr(job, "config", None)
    return bool(getattr(job, "resume", False) or getattr(train, "resume", False))


@dataclass(frozen=True)
class JobKind:
    """How one job type runs. `inputs(job)`: paths it reads (None entries are skipped); `outputs(job)`: what it
    writes (`guard.Output`: path, kind file/dir/any, option name for messages); `out_dir(job)`: the folder
    that receives report.json (None: no folder, or a dry run); `check(job, report, written)`: raises after
    the reports are written (the written report path is passed for the message)."""

    command: str
    run: Callable[[Any], dict]
    inputs: Callable[[Any], Iterable[PathLike | None]]
    outputs: Callable[[Any], Iterable[Output]]
    out_dir: Callable[[Any], PathLike | None] = _none
    resume: Callable[[Any], bool] = _resume
    resume_marker: str | None = None
    check: Callable[[Any, dict, Path | None], None] | None = None


JOBS: dict[type, JobKind] = {}


def register_job(job_type: type, kind: JobKind) -> JobKind:
    JOBS[job_type] = kind
    return kind


def job_kind(job: Any) -> JobKind:
    try:
        return JOBS[type(job)]
    except KeyError:
        known = ", ".join(sorted(t.__name__ for t in JOBS))
        raise CompressError(f"{type(job).__name__} is not a registered job type; use one of {known}") from None


def _later_rank(job: Any) -> bool:
    dist = getattr(job, "distributed", None)
    return dist is not None and getattr(dist, "rank", 0) != 0


def job_paths(job: Any, report_path: PathLike | None = None, exist_ok: bool = False) -> JobPaths:
    """The guard's view of a job: declared inputs, declared outputs + the report file."""
    kind = job_kind(job)
    outputs = tuple(kind.outputs(job)) + ((Output(Path(report_path), "file", "--report"),) if report_path else ())
    return JobPaths(inputs=tuple(Path(p) for p in kind.inputs(job) if p), outputs=outputs, resume=kind.resume(job),
                    exist_ok=exist_ok or bool(getattr(job, "exist_ok", False)), resume_marker=kind.resume_marker,
                    check_existing=not (_later_rank(job) or getattr(job, "dry_run", False)))


def run_job(job: Any, report_path: PathLike | None = None, *, exist_ok: bool = False) -> dict:
    """Guard the job's outputs, run it, write OUT/report.json and `report_path`, return the report.

    `exist_ok`: write into a non-empty output folder (an earlier run's files of the same name are replaced);
    resuming is a job option (`resume` / its training config's `resume`). Raises GuardError before any work,
    the job's own CompressError while running, and the post-report check's error after writing (with the
    report as its `.report`).
    """
    kind = job_kind(job)
    check_job_paths(job_paths(job, report_path, exist_ok))
    report = kind.run(job)
    if _later_rank(job):
        return report
    out = kind.out_dir(job)
    written = Path(out) / REPORT_NAME if out is not None else None
    for path in (written, report_path):
        write_report(path, report)
    if kind.check is not None:
        try:
            kind.check(job, report, written or (Path(report_path) if report_path else None))
        except CompressError as exc:
            exc.report = report  # the written figures, for a caller that still shows them
            raise
    return report


def write_report(path: PathLike | None, figures: dict[str, Any]) -> None:
    """Write `figures` as indented JSON, atomically (numpy values and paths converted)."""
    if path:
        write_text_atomic(path, json.dumps(figures, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)
