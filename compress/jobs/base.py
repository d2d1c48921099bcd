"""The job contract: one frozen job dataclass per command, one registry, one `run_job` that guards, runs, reports.

A job IS the command: its fields are the command's options under the same names (`prune --no-compensate` ->
`no_compensate`); training jobs hold the training options in one `train: TrainConfig`. Each job says what it
reads (`inputs`), what it writes (`outputs`, the very paths its writers get), where report.json goes
(`out_dir`) and does the work (`run -> Report`). `run_job` is the only way a job runs:
1. the output guard (`compress.base.guard`) on the declared inputs/outputs (+ the report path), before any work;
2. `job.run()` on every torchrun rank; each returns its Report;
3. on rank 0 only (this module is the one place that decides): OUT/report.json and `report_path`, atomically;
4. `job.check(report, written)`: post-report verification (quantize's), after the files exist.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Collection, Iterator, Mapping, TypeVar, Union

from compress.base.errors import CompressError
from compress.base.fileio import is_write_failure, write_failure, write_text_atomic
from compress.base.lock import output_lock
from compress.base.guard import JobPaths, Output, check_job_paths
from compress.data.dataspec import IMG_EXTS
from compress.jobs.ranks import rank_of
from compress.train.config import DistConfig, TrainConfig

__all__ = ["Job", "Report", "JOBS", "register_job", "run_job", "job_paths", "write_report", "REPORT_NAME",
           "CLI_ONLY", "PathLike"]

REPORT_NAME = "report.json"
# Training flags that turn a TrainConfig field off (`--no-ema` -> ema=False); every other training option is the
# TrainConfig field of the same name.
NEGATED = {"no_ema": "ema", "no_augment": "augment", "no_progress": "progress"}
# A path option. CLI strings are kept as typed (report.json echoes them); `from_dict` gives Paths.
PathLike = Union[str, os.PathLike]
# Click parameters that are not job fields: where the report goes and whether a full folder may be written are
# `run_job` arguments; --debug is the group's; sparse-train's hidden `-sr` is accepted for the reference only.
CLI_ONLY = frozenset({"report_path", "exist_ok", "debug", "sr_flag"})


@dataclass(frozen=True)
class Report:
    """What a job measured. `to_dict()` is exactly report.json; `rank` is set by `run_job` (ranks > 0 return
    theirs too, and it writes none of them)."""

    command: str
    figures: Mapping[str, Any]
    rank: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.figures)

    def __getitem__(self, key: str) -> Any:
        return self.figures[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.figures.get(key, default)

    @property
    def is_main(self) -> bool:
        """True on the process that writes and prints (rank 0, or the only process)."""
        return self.rank == 0


J = TypeVar("J", bound="Job")


class Job:
    """Base of every job (a `@dataclass(frozen=True)` subclass registered with `@register_job`).

    Class attributes a subclass may set: `command` (its CLI path); `train_options` (option names that build the
    `train: TrainConfig` field, see `make_train`); `flags` (field -> CLI flag where it is not `--field-name`);
    `false_flags` (bool field defaulting to True -> the flag that turns it off, default `--no-field-name`);
    `resume_marker` (a file that makes an existing output folder this job's own resumable run);
    `produces_model`, `out_file`, `in_summary` (how a recipe threads it, see compress/recipe/steps.py)."""

    command: ClassVar[str]
    train_options: ClassVar[tuple[str, ...]] = ()
    flags: ClassVar[Mapping[str, str]] = {}
    false_flags: ClassVar[Mapping[str, str]] = {}
    resume_marker: ClassVar[str | None] = None
    # how a recipe wires the job (compress/recipe/steps.py): its report's cfg/weights are the next step's model;
    # its `out` names a file (this name inside the step folder) rather than a folder; a row of the stage table
    produces_model: ClassVar[bool] = False
    out_file: ClassVar[str | None] = None
    in_summary: ClassVar[bool] = False

    # ---- what a job declares -------------------------------------------------------------------------------
    def inputs(self) -> tuple[Path, ...]:
        return ()

    def data_files(self) -> tuple[Path, ...]:
        """The dataset files the job reads (images, labels, lists, names): inputs too, listed apart because a
        dataset is large (the guard indexes them, a recipe fingerprints rather than hashes them)."""
        return ()

    def data_dirs(self, files: tuple[Path, ...]) -> tuple[Path, ...]:
        """Folders whose contents are data (given `data_files()`): no output folder may lie in them. Default:
        the folders of the images."""
        folders = {os.path.dirname(s) for s in map(os.fspath, files) if s.lower().endswith(IMG_EXTS)}
        return tuple(Path(f or ".") for f in sorted(folders))

    def outputs(self) -> tuple[Output, ...]:
        return ()

    def out_dir(self) -> Path | None:
        return None

    def run(self, dist: DistConfig | None = None) -> Report:
        """Do the work; `dist`: this process of a torchrun job (None: the only process)."""
        raise NotImplementedError(f"{type(self).__name__}.run")

    def check(self, report: Report, written: Path | None) -> None:
        """Post-report verification: raise a CompressError after report.json was written (default: none)."""

    def resumes(self) -> bool:
        """The job continues the run in its output folder (the guard then accepts a non-empty one)."""
        return False

    def writes_nothing(self) -> bool:
        """A dry run: the guard skips the non-empty-folder rule."""
        return False

    def checkpoints(self) -> tuple[Path, ...]:
        """The files an interrupted run of this job leaves in its output folder to continue from (`resumed`);
        none: the job cannot continue a run."""
        return ()

    def resumed(self) -> "Job":
        """This job continuing the interrupted run its `checkpoints` hold (`--resume`)."""
        raise CompressError(f"`{self.command}` cannot continue an interrupted run")

    def report(self, figures: Mapping[str, Any]) -> Report:
        return Report(self.command, figures)

    # ---- construction from options -----------------------------------------------------------------------
    @classmethod
    def from_options(cls: type[J], options: Mapping[str, Any], given: Collection[str] | None = None) -> J:
        """The job from its options, one to one (click's keyword arguments; training options included).
        `given`: the options the user set (None: all of `options`); only `train`'s precedence reads it."""
        values = dict(options)
        if cls.train_options:
            train = {k: values.pop(k) for k in cls.train_options if k in values}
            values["train"] = cls.make_train(values, train, set(options if given is None else given))
        return cls(**values)

    @classmethod
    def make_train(cls, options: Mapping[str, Any], train: Mapping[str, Any], given: set[str]) -> Any:
        """The `train` field from the training options (`train`) and the job's other options."""
        raise NotImplementedError(f"{cls.__name__} has train_options but no make_train")

    @classmethod
    def option_types(cls) -> dict[str, Any]:
        """Option name -> type hint: the fields (but `train`), plus the training options' types."""
        hints = typing.get_type_hints(cls)
        fields = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name != "train" or not cls.train_options}
        train = typing.get_type_hints(TrainConfig)
        return {**fields, **{n: bool if n in NEGATED else train[n] for n in cls.train_options}}

    @classmethod
    def option_name(cls, key: str) -> str | None:
        """The option (field) a key names: dashes or underscores, or a flag's own spelling where it differs from
        the field (`json` for `json_path`); None when the job has no such option."""
        norm = str(key).lstrip("-").replace("-", "_")
        by_flag = {flag.lstrip("-").replace("-", "_"): name for name, flag in cls.flags.items()}
        name = by_flag.get(norm, norm)
        return name if name in cls.option_types() else None

    @classmethod
    def from_dict(cls: type[J], values: Mapping[str, Any], where: str = "", base: Path | None = None) -> J:
        """The job from plain YAML values (recipes): keys are option names (dashes accepted; a `flags` spelling such
        as `json` for `json_path` too), values coerced to
        the option's type (list -> tuple, str -> Path; relative paths resolved against `base`)."""
        types = cls.option_types()
        prefix = f"{where}: " if where else ""
        options = {}
        for raw, value in values.items():
            key = cls.option_name(raw)
            if key is None:
                valid = ", ".join(sorted(types))
                raise CompressError(f"{prefix}`{cls.command}` has no option `{raw}`; valid options: {valid}")
            options[key] = _coerce(types[key], value, base, f"{prefix}`{cls.command}` option `{raw}`")
        required = [f.name for f in dataclasses.fields(cls) if f.name not in options and f.name != "train"
                    and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if required:
            raise CompressError(f"{prefix}`{cls.command}` needs option(s) {', '.join(required)}")
        return cls.from_options(options)

    # ---- back to a command line ----------------------------------------------------------------------------
    def train_argv_values(self) -> dict[str, Any]:
        """Training options to render for `to_argv` (those differing from the defaults); none by default."""
        return {}

    def to_argv(self) -> list[str]:
        """The equivalent `yolo-compress COMMAND ...` arguments (options at their defaults left out)."""
        argv = self.command.split()
        values = {f.name: (getattr(self, f.name), _default(f)) for f in dataclasses.fields(self) if f.name != "train"}
        values.update({k: (v, None) for k, v in self.train_argv_values().items()})
        for name, (value, default) in values.items():
            if value == default:
                continue
            argv += self.render_option(name, value)
        return argv

    @classmethod
    def flag(cls, name: str) -> str:
        """The command-line flag of option `name` (`--name-with-dashes` unless `flags` spells it otherwise)."""
        return cls.flags.get(name, "--" + name.replace("_", "-"))

    @classmethod
    def coerce_option(cls, name: str, value: Any, where: str = "") -> Any:
        """A plain (YAML) value as option `name`'s type, as `from_dict` coerces it (paths left as given)."""
        prefix = f"{where}: " if where else ""
        return _coerce(cls.option_types()[name], value, None, f"{prefix}`{cls.command}` option `{name}`")

    @classmethod
    def is_path_option(cls, name: str) -> bool:
        """Option `name` names files (a path, or several): a recipe resolves it against the recipe's folder."""
        return _is_path(cls.option_types()[name])

    def render_option(self, name: str, value: Any) -> list[str]:
        """Option `name` with `value` as command-line words (a bool flag: itself or its negation)."""
        flag = self.flag(name)
        if isinstance(value, bool):
            return [flag] if value else [self.false_flags.get(name, "--no-" + flag[2:])]
        if value is None:
            return []
        if isinstance(value, (tuple, list)):
            return [part for item in value for part in (flag, str(item))]
        return [flag, str(value)]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _is_path(hint: Any) -> bool:
    """A path option's type: PathLike, PathLike | None, or a tuple of them."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return bool(args) and _is_path(args[0])
    return hint is os.PathLike or os.PathLike in args


def _coerce(hint: Any, value: Any, base: Path | None, what: str) -> Any:
    """A plain YAML value as `hint` (Optional, path, tuple, float, int, bool, str; other types as given)."""
    args = typing.get_args(hint)
    if value is None:
        if hint is Any or type(None) in args:
            return None
        raise CompressError(f"{what} needs a value, got null")
    if hint is Any:
        return value
    if _is_path(hint) and typing.get_origin(hint) is not tuple:  # PathLike or PathLike | None
        if not isinstance(value, (str, os.PathLike)):
            raise CompressError(f"{what} is a path, got {value!r}")
        path = Path(value)
        return base / path if base is not None and not path.is_absolute() else path
    if typing.get_origin(hint) is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_coerce(args[0], item, base, what) for item in items)
    kinds = [a for a in (args or (hint,)) if a is not type(None)]
    if isinstance(value, bool):
        if bool in kinds:
            return value
    elif isinstance(value, int) and int in kinds:
        return value
    elif isinstance(value, (int, float)) and float in kinds:
        return float(value)
    elif isinstance(value, str) and str in kinds:
        return value
    elif not any(k in (bool, int, float, str) for k in kinds):
        return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in kinds)
    raise CompressError(f"{what}: {value!r} is not a {names}")


JOBS: dict[str, type[Job]] = {}


def register_job(cls: type[J]) -> type[J]:
    """Class decorator: `JOBS[cls.command] = cls` (one command, one job type)."""
    if cls.command in JOBS and JOBS[cls.command] is not cls:
        raise CompressError(f"command {cls.command!r} is registered twice ({JOBS[cls.command].__name__}, "
                            f"{cls.__name__})")
    JOBS[cls.command] = cls
    return cls


def job_paths(job: Job, report_path: str | os.PathLike | None = None, exist_ok: bool = False,
              dist: DistConfig | None = None) -> JobPaths:
    """The guard's view of a job: declared inputs, declared outputs + the report file (ranks > 0 and dry runs
    skip the non-empty-folder rule: rank 0 checks it)."""
    report = (Output(Path(report_path), "file", "--report"),) if report_path else ()
    data = job.data_files()
    return JobPaths(inputs=tuple(Path(p) for p in job.inputs()) + data, outputs=tuple(job.outputs()) + report,
                    resume=job.resumes(), exist_ok=exist_ok, resume_marker=job.resume_marker,
                    check_existing=not (rank_of(dist) or job.writes_nothing()), data_dirs=job.data_dirs(data))


def run_job(job: Job, report_path: str | os.PathLike | None = None, *, exist_ok: bool = False,
            dist: DistConfig | None = None) -> Report:
    """Guard the job's outputs, run it, write OUT/report.json and `report_path` (rank 0), return the Report.

    `exist_ok`: write into a non-empty output folder (an earlier run's files of the same name are replaced);
    resuming is a job option. `dist`: this process of a torchrun job (the CLI reads torchrun's environment; None:
    the only process); every rank runs the job, rank 0 alone writes the report. Raises GuardError before any
    work, the job's own CompressError while running, and the post-report check's error after writing (with the
    Report as its `.report`)."""
    if not isinstance(job, Job) or type(job).command not in JOBS:
        known = ", ".join(sorted(t.__name__ for t in JOBS.values()))
        raise CompressError(f"{type(job).__name__} is not a registered job type; use one of {known}")
    check_job_paths(job_paths(job, report_path, exist_ok, dist))
    owner = not (rank_of(dist) or job.writes_nothing())  # one process per run takes the folder's lock
    with output_lock(job.out_dir() if owner else None), _write_failures():
        report = dataclasses.replace(job.run(dist), rank=rank_of(dist))
        if not report.is_main:
            return report  # rank 0 writes
        out = job.out_dir()
        written = Path(out) / REPORT_NAME if out is not None else None
        for path in (written, report_path):
            write_report(path, report.to_dict())
    try:
        job.check(report, written or (Path(report_path) if report_path else None))
    except CompressError as exc:
        exc.report = report  # the written figures, for a caller that still shows them
        raise
    return report


@contextlib.contextmanager
def _write_failures() -> Iterator[None]:
    """A full disk met outside our own writers (a runtime's converter, the image cache, a DataLoader's shared
    memory) is one WriteError too, not a traceback."""
    try:
        yield
    except OSError as exc:
        if is_write_failure(exc):
            raise write_failure(exc) from None
        raise


def paths(*items: PathLike | None) -> tuple[Path, ...]:
    """The given paths, None entries skipped (a helper for `inputs`)."""
    return tuple(Path(p) for p in items if p is not None)


def files(*pairs: tuple[str, PathLike | None]) -> tuple[Output, ...]:
    """File outputs from (option, path) pairs, None paths skipped."""
    return tuple(Output(Path(p), "file", opt) for opt, p in pairs if p)


def out_folder(out: PathLike, *names: Path) -> tuple[Output, ...]:
    """`--out` as a folder plus the files written in it (declared so no input can be one of them)."""
    return (Output(Path(out), "dir", "--out"), *(Output(Path(f), "file", "--out") for f in names))


def write_report(path: str | os.PathLike | None, figures: Mapping[str, Any]) -> None:
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


def as_str(value: Any) -> Any:
    """A path value as report.json shows it (str), other values unchanged."""
    return str(value) if isinstance(value, os.PathLike) else value

