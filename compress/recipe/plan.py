"""Turn a `Recipe` into a validated plan: one job type + checked options per step, before anything runs.

Models thread through the steps: a step whose job has a `cfg` field gets the current model, and a
model-producing step's report (`cfg`, `weights`) becomes the current model afterwards. A model is referred to by
`ModelSource`: 0 = the recipe's input model, N = the output of step N, or explicit paths.
"""
from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Union

from compress.base.device import parse_device
from compress.base.errors import DeviceError, RecipeError
from compress.jobs import JOBS, Job
from compress.recipe.spec import Recipe, StepSpec, Tracked, to_plain
from compress.recipe.steps import StepKind, UserOptions, build_job, job_type, step_kind, user_options

__all__ = ["PlannedStep", "Plan", "plan_recipe", "ModelSource", "SYNTH_STEP"]

ModelSource = Union[int, "tuple[str, str | None]"]  # step number (0 = input) or explicit (cfg, weights)
ModelPaths = Callable[[ModelSource], "tuple[str, str | None]"]
SYNTH_STEP = "data synth"


@dataclass(frozen=True)
class PlannedStep:
    index: int                      # 0 = the `data synth` pre-step, then 1..n
    name: str
    job_type: type[Job]
    kind: StepKind
    dir: Path
    user: UserOptions
    model: ModelSource | None       # the model given as cfg/weights (None: the job takes no model)
    refs: dict[str, tuple[ModelSource, str, str]]  # teacher -> (source, cfg field, weights field)
    data: bool                      # the runner passes the recipe's data
    where: str
    device: str | None = None       # the recipe-wide device (None: the step's own/default)
    stand_in: str = ""              # an existing cfg that stands in for models not produced yet (validation)

    @property
    def label(self) -> str:
        return f"{self.index:02d}-{self.name.replace(' ', '-')}"

    @property
    def report(self) -> Path:
        return self.dir / "report.json"

    def options(self, model_paths: ModelPaths, data: str | None) -> dict[str, Any]:
        """Every option of the step's job: the runner's (model, data, out, device) and the user's."""
        values: dict[str, Any] = {}
        if self.model is not None:
            values["cfg"], values["weights"] = model_paths(self.model)
        for source, cfg_field, w_field in self.refs.values():
            values[cfg_field], values[w_field] = model_paths(source)
        if self.data and data:
            values["data"] = data
        if self.kind.out != "none":
            values["out"] = str(self.dir / self.kind.out_name if self.kind.out == "file" else self.dir)
        if self.device is not None:
            values["device"] = self.device
        return {**values, **self.user.values}

    def job(self, model_paths: ModelPaths, data: str | None) -> Job:
        return build_job(self.job_type, self.options(model_paths, data), self.where, self.user.wheres)

    def report_path(self, job: Job) -> Path | None:
        """Where `run_job` writes a copy of the report: the step folder's report.json unless the job's own
        output folder is the step folder already."""
        out = job.out_dir()
        return None if out is not None and Path(out) == self.dir else self.report

    def shell(self, model_paths: ModelPaths, data: str | None) -> str:
        """The step as one `yolo-compress ...` line (placeholders for models not produced yet stay unquoted)."""
        words = ["yolo-compress", *self.argv(model_paths, data)]
        return " ".join(w if w.startswith('"$(') else shlex.quote(w) for w in words)

    def argv(self, model_paths: ModelPaths, data: str | None, job: Job | None = None) -> list[str]:
        """The step as `yolo-compress` arguments: the runner's options (model, teacher, data, out, report, device,
        --exist-ok), then the user's in the recipe's order (`Job.render_option`). The job is built first (or
        given), so what is listed is what validates; a model not produced yet renders as its placeholder (the
        job is built with a stand-in cfg in its place)."""
        options = self.options(model_paths, data)
        pending = {k: v for k, v in options.items() if isinstance(v, str) and v.startswith('"$(')}
        if job is None or pending:
            job = build_job(self.job_type, {**options, **{k: self.stand_in for k in pending}}, self.where,
                            self.user.wheres)
        owned = [k for k in options if k not in self.user.values and k != "device"]
        words = [w for k in owned for w in job.render_option(k, pending.get(k, options[k]))]
        report = self.report_path(job)
        words += ["--report", str(report)] if report is not None else []
        words += job.render_option("device", self.device) if self.device and "device" not in self.user.values else []
        words += ["--exist-ok"] if self.kind.out != "none" else []
        for name, value in self.user.values.items():
            if not isinstance(value, bool) or value != _default(self.job_type, name):
                words += job.render_option(name, value)
        return [*self.name.split(), *words]


def _default(kind: type[Job], name: str) -> Any:
    field = next((f for f in dataclasses.fields(kind) if f.name == name), None)
    return None if field is None else field.default


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    out: Path
    steps: tuple[PlannedStep, ...]  # including the data-synth pre-step when `data: {synth: ...}`
    input_model: tuple[str, str | None]
    data: str | None                # the data file, or None when it is synthesised (see steps[0])
    device: str | None = None       # the recipe-wide device

    def resolved(self) -> dict:
        """The recipe with every path absolute: itself a runnable recipe."""
        return {"out": str(self.out),
                "model": {"cfg": self.input_model[0], "weights": self.input_model[1]},
                **({"device": self.device} if self.device is not None else {}),
                "data": self.data or (to_plain(self.recipe.data) if self.recipe.data else None),
                "steps": [{s.name: {**s.user.values, **{k: _describe(src) for k, (src, _, _) in s.refs.items()}}}
                          for s in self.steps if s.index > 0]}


def _describe(source: ModelSource) -> object:
    if isinstance(source, int):
        return "input" if source == 0 else f"step:{source}"
    return {"cfg": source[0], "weights": source[1]}


def _existing(t: Tracked, what: str) -> str:
    p = t.path()
    if not p.is_file():
        raise RecipeError(f"{t.where}: {what} {p} does not exist; fix the path (recipe paths are relative to the "
                          f"recipe file, --set paths to the working directory)")
    return str(p)


def plan_recipe(recipe: Recipe, out: Path, jobs: Mapping[str, type[Job]] = JOBS) -> Plan:
    """Validate every step against its job; RecipeError (file:line) on the first problem."""
    out = out.resolve()
    model = (_existing(recipe.cfg, "model cfg"), _existing(recipe.weights, "model weights") if recipe.weights else None)
    steps: list[PlannedStep] = []
    data = None
    if recipe.data is not None and isinstance(recipe.data.value, dict):
        steps.append(_synth_step(recipe.data, out, jobs))
    elif recipe.data is not None:
        data = str(recipe.data.path())
        if not Path(data).exists():
            raise RecipeError(f"{recipe.data.where}: data {data} does not exist; fix `data:` or use --set data=...")
    producers: set[int] = set()
    current: ModelSource = 0
    device = _device(recipe.device)
    for spec in recipe.steps:
        step = _plan_step(spec, out, current, producers, recipe.data is not None, jobs)
        if device is not None and step.kind.takes_device and "device" not in step.user.names:
            step = replace(step, device=device)
        step = replace(step, stand_in=model[0])
        _validate(step, model, data or str(out / "00-data" / "synth.data"), out)
        steps.append(step)
        if step.kind.produces_model:
            producers.add(spec.index)
            current = spec.index
    return Plan(recipe, out, tuple(steps), model, data, device)


def _validate(step: PlannedStep, input_model: tuple[str, str | None], data: str, out: Path) -> None:
    """Build the step's job once with stand-in models, so a bad value fails before anything runs (a model that
    an earlier step will produce stands in as the input cfg with that step's weights file, not yet written)."""
    def stand_in(source: ModelSource) -> tuple[str, str | None]:
        if not isinstance(source, int):
            return source
        return input_model if source == 0 else (input_model[0], str(out / f"{source:02d}" / "model.weights"))
    step.job(stand_in, data)


def _device(t: Tracked | None) -> str | None:
    """The recipe's `device:` (syntax checked now; whether it exists is checked when a step runs)."""
    if t is None:
        return None
    try:
        parse_device(str(t.value))
    except DeviceError as exc:
        raise RecipeError(f"{t.where}: {exc}") from None
    return str(t.value)


def _synth_step(data: Tracked, out: Path, jobs: Mapping[str, type[Job]]) -> PlannedStep:
    if set(data.value) != {"synth"}:
        raise RecipeError(f"{data.where}: `data:` is a path or {{synth: {{options}}}}, not {sorted(data.value)}")
    opts = data.value["synth"]
    if not isinstance(opts.value, (dict, type(None))):
        raise RecipeError(f"{opts.where}: `synth:` takes `data synth` options, e.g. {{synth: {{n_train: 256}}}}")
    spec = StepSpec(0, SYNTH_STEP, dict(opts.value or {}), data.where)
    kind = job_type(SYNTH_STEP, data.where, jobs)
    step = PlannedStep(0, SYNTH_STEP, kind, step_kind(kind), out / "00-data", user_options(spec, kind), None, {},
                       False, data.where)  # no model: no stand-in needed
    step.job(lambda source: ("", None), None)
    return step


def _plan_step(spec: StepSpec, out: Path, current: ModelSource, producers: set[int], has_data: bool,
               jobs: Mapping[str, type[Job]]) -> PlannedStep:
    kind = job_type(spec.name, spec.where, jobs)
    wiring = step_kind(kind)
    user = user_options(spec, kind)
    refs = {k: (_source(t, spec, producers), c, w) for k, (t, c, w) in user.refs.items()}
    data = wiring.takes_data and "data" not in user.names and has_data
    if wiring.takes_data and not has_data and "data" not in user.names and _required(kind, "data"):
        raise RecipeError(f"{spec.where}: `{spec.name}` needs --data; add `data:` to the recipe "
                          f"(or data: ... to the step)")
    folder = out / f"{spec.index:02d}-{spec.name.replace(' ', '-')}"
    return PlannedStep(spec.index, spec.name, kind, wiring, folder, user, current if wiring.takes_model else None,
                       refs, data, spec.where)


def _required(kind: type[Job], name: str) -> bool:
    field = next(f for f in dataclasses.fields(kind) if f.name == name)
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _source(t: Tracked, spec: StepSpec, producers: set[int]) -> ModelSource:
    v = t.value
    if isinstance(v, dict):
        if "cfg" not in v or set(v) - {"cfg", "weights"}:
            raise RecipeError(f"{t.where}: a model mapping is {{cfg: ..., weights: ...}}")
        w = v.get("weights")
        return _existing(v["cfg"], "cfg"), _existing(w, "weights") if w is not None and w.value else None
    text = str(v).strip()
    if text == "input":
        return 0
    if text.startswith("step:") and text[5:].strip().isdigit():
        n = int(text[5:])
        if n not in producers:
            raise RecipeError(f"{t.where}: `{text}` must name an earlier model-producing step (one of "
                              f"{sorted(producers) or 'none yet'}); step {spec.index} cannot use it")
        return n
    raise RecipeError(f"{t.where}: model reference `{text}`: use input, step:N or {{cfg: ..., weights: ...}}")
