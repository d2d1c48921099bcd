"""A recipe step is a job: its options are the job's options (`Job.from_dict`), its wiring comes from the job type.

The job registry (`compress.jobs.JOBS`, command name -> job type) is the single source of truth for step names,
option names, types and validation; this module only says how the runner threads models, data and outputs
through a job's fields:
- a job with a `cfg` field gets the current model (`cfg`/`weights`); `produces_model` jobs become the current
  model afterwards (their report's `cfg`/`weights`);
- a job with a `data` field gets the recipe's data unless the step sets its own;
- a job with an `out` field writes into the step folder (or `out_file` inside it); report.json always lands in
  the step folder;
- `teacher: input | step:N | {cfg:, weights:}` fills the job's `t_cfg`/`t_weights` fields (MODEL_REFS).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from compress.base.errors import CompressError, RecipeError
from compress.jobs import JOBS, Job
from compress.recipe.spec import StepSpec, Tracked, to_plain

__all__ = ["StepKind", "step_kind", "job_type", "MODEL_REFS", "RUNNER_OWNED", "UserOptions", "user_options",
           "build_job", "fields_of"]

# recipe-only model-valued options: key -> (cfg field, weights field) of the job
MODEL_REFS: dict[str, tuple[str, str]] = {"teacher": ("t_cfg", "t_weights")}
# fields the runner fills: the model, the output folder (and, unless the step sets it, the data and device)
RUNNER_OWNED = ("cfg", "weights", "out")


@dataclass(frozen=True)
class StepKind:
    """How the runner wires a job type (derived from its fields and class attributes, not from its name)."""

    produces_model: bool
    out: Literal["dir", "file", "none"]
    out_name: str                   # file name inside the step folder when out == "file"
    in_summary: bool                # a row of the final stage table
    takes_model: bool
    takes_data: bool
    takes_device: bool


def fields_of(kind: type[Job]) -> set[str]:
    return {f.name for f in dataclasses.fields(kind)}


def job_type(name: str, where: str, jobs: Mapping[str, type[Job]] = JOBS) -> type[Job]:
    kind = jobs.get(name)
    if kind is None or name == "run":
        valid = ", ".join(sorted(n for n in jobs if n != "run"))
        raise RecipeError(f"{where}: unknown step `{name}`; valid steps: {valid}")
    return kind


def step_kind(kind: type[Job]) -> StepKind:
    names = fields_of(kind)
    out = "none" if "out" not in names else ("file" if kind.out_file else "dir")
    return StepKind(kind.produces_model, out, kind.out_file or "", kind.in_summary, "cfg" in names,
                    "data" in names, "device" in names)


@dataclass(frozen=True)
class UserOptions:
    """A step's own options, checked against its job: plain values (paths absolute) and model references."""

    values: dict[str, Any]                          # option name (underscores) -> plain value
    refs: dict[str, tuple[Tracked, str, str]]       # teacher -> (its value, cfg field, weights field)
    wheres: dict[str, str] = dataclasses.field(default_factory=dict)  # option -> "file:line" or "--set key"

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.values)


def user_options(spec: StepSpec, kind: type[Job]) -> UserOptions:
    """Check every option of `spec` against its job type (names now, values when the job is built)."""
    values: dict[str, Any] = {}
    refs: dict[str, tuple[Tracked, str, str]] = {}
    wheres: dict[str, str] = {}
    names = fields_of(kind)
    valid = set(kind.option_types())
    for key, tracked in spec.options.items():
        norm = key.lstrip("-").replace("-", "_")
        if norm in MODEL_REFS:
            cfg_field, w_field = MODEL_REFS[norm]
            if cfg_field not in names:
                raise RecipeError(f"{tracked.where}: `{spec.name}` takes no `{norm}` model (no --{cfg_field})")
            refs[norm] = (tracked, cfg_field, w_field)
            continue
        if norm in RUNNER_OWNED:
            raise RecipeError(f"{tracked.where}: `{key}` is set by the runner (model/data/out thread through the "
                              f"steps); remove it, or change `model:`/`out:` instead")
        name = kind.option_name(norm)
        if name is None:
            shown = sorted(valid - set(RUNNER_OWNED)) + [k for k, (c, _) in MODEL_REFS.items() if c in names]
            step = f"step {spec.index} " if spec.index else ""
            raise RecipeError(f"{tracked.where}: {step}`{spec.name}` has no option `{key}`; valid options: "
                              f"{', '.join(shown)}")
        if isinstance(tracked.value, dict):
            raise RecipeError(f"{tracked.where}: `{spec.name}.{key}` takes a value, not a mapping")
        try:
            values[name] = _yaml(kind.coerce_option(name, _plain(tracked, kind.is_path_option(name)), tracked.where))
        except CompressError as exc:
            raise RecipeError(str(exc)) from None
        wheres[name] = tracked.where
    return UserOptions(values, refs, wheres)


def _plain(tracked: Tracked, is_path: bool) -> Any:
    """The YAML value, with path values made absolute against the recipe file (or the cwd for --set)."""
    value = to_plain(tracked)
    if not is_path or value is None:
        return value
    if isinstance(value, list):
        return [str((tracked.base / str(v)).resolve()) for v in value]
    return str(tracked.path())


def _yaml(value: Any) -> Any:
    """A coerced option value as YAML writes it (resolved.yaml, the manifest): paths as text, tuples as lists."""
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_yaml(v) for v in value]
    return value


def build_job(kind: type[Job], options: Mapping[str, Any], where: str,
              wheres: Mapping[str, str] | None = None) -> Job:
    """The step's job from its (absolute-path) options; a refused value is a RecipeError naming the line of the
    option that caused it (`wheres`: option -> "file:line" or "--set key"), else the step's line."""
    try:
        return kind.from_dict(options, where=where)
    except CompressError as exc:
        at = _culprit(kind, options, wheres or {}) or where
        message = str(exc).removeprefix(f"{where}: ")
        raise RecipeError(f"{at}: {message}") from None


def _culprit(kind: type[Job], options: Mapping[str, Any], wheres: Mapping[str, str]) -> str | None:
    """Where the one option is set without which the job builds (None: no single option is to blame)."""
    for name, at in wheres.items():
        try:
            kind.from_dict({k: v for k, v in options.items() if k != name})
        except CompressError:
            continue
        return at
    return None
