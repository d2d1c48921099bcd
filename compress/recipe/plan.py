"""Turn a `Recipe` into a validated plan: one click command + argument template per step, before anything runs.

Models thread through the steps: a step whose command has `--cfg` gets the current model, and a model-producing
step's `DIR/report.json` (`cfg`, `weights`) becomes the current model afterwards. A model is referred to by
`ModelSource`: 0 = the recipe's input model, N = the output of step N, or explicit paths.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Union

import click

from compress.base.device import parse_device
from compress.base.errors import DeviceError, RecipeError
from compress.recipe.spec import Recipe, StepSpec, Tracked, to_plain
from compress.recipe.steps import STEPS, ConvertedStep, StepKind, convert_options, find_param, required_missing

__all__ = ["PlannedStep", "Plan", "plan_recipe", "ModelSource", "CommandLookup", "SYNTH_STEP"]

ModelSource = Union[int, "tuple[str, str | None]"]  # step number (0 = input) or explicit (cfg, weights)
CommandLookup = Callable[[str], Union[click.Command, None]]
SYNTH_STEP = "data synth"


@dataclass(frozen=True)
class PlannedStep:
    index: int                      # 0 = the `data synth` pre-step, then 1..n
    name: str
    kind: StepKind
    command: click.Command
    dir: Path
    user: ConvertedStep
    model: ModelSource | None       # the model passed as --cfg/--weights (None: the command takes no model)
    refs: dict[str, tuple[ModelSource, str, str | None]]  # teacher -> (source, --t_cfg, --t_weights)
    data: bool                      # the runner passes --data
    where: str
    device: str | None = None       # the recipe-wide device, passed as --device (None: the step's own/default)

    @property
    def label(self) -> str:
        return f"{self.index:02d}-{self.name.replace(' ', '-')}"

    @property
    def report(self) -> Path:
        return self.dir / "report.json"

    def args(self, model_paths: Callable[[ModelSource], tuple[str, str | None]], data: str | None) -> list[str]:
        """The full argument list, given how to name a model's files and the data file."""
        args: list[str] = []
        if self.model is not None:
            args += _model_args(model_paths(self.model), "--cfg", "--weights" if _has(self, "weights") else None)
        for source, cfg_flag, w_flag in self.refs.values():
            args += _model_args(model_paths(source), cfg_flag, w_flag)
        if self.data and data:
            args += ["--data", data]
        if _has(self, "out") and self.kind.out != "none":
            args += ["--out", str(self.dir / self.kind.out_name if self.kind.out == "file" else self.dir)]
        if _has(self, "report_path") and not self.kind.produces_model:
            args += ["--report", str(self.report)]
        if self.device is not None:
            args += ["--device", self.device]
        if _has(self, "exist_ok"):  # a re-run replaces the step's own earlier outputs
            args += ["--exist-ok"]
        return args + list(self.user.args)

    def shell(self, model_paths: Callable[[ModelSource], tuple[str, str | None]], data: str | None) -> str:
        words = ["yolo-compress", *self.name.split(), *self.args(model_paths, data)]
        return " ".join(w if w.startswith('"$(') else shlex.quote(w) for w in words)


def _has(step: PlannedStep, name: str) -> bool:
    return any(p.name == name for p in step.command.params)


def _model_args(paths: tuple[str, str | None], cfg_flag: str, w_flag: str | None) -> list[str]:
    cfg, weights = paths
    return [cfg_flag, cfg] + ([w_flag, weights] if w_flag and weights else [])


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    out: Path
    steps: tuple[PlannedStep, ...]  # including the data-synth pre-step when `data: {synth: ...}`
    input_model: tuple[str, str | None]
    data: str | None                # the data file, or None when it is synthesised (see steps[0])
    device: str | None = None       # the recipe-wide device

    def resolved(self) -> dict:
        """The recipe with every path absolute and every option converted: itself a runnable recipe."""
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


def plan_recipe(recipe: Recipe, commands: CommandLookup, out: Path) -> Plan:
    """Validate every step against its click command; RecipeError (file:line) on the first problem."""
    out = out.resolve()
    model = (_existing(recipe.cfg, "model cfg"), _existing(recipe.weights, "model weights") if recipe.weights else None)
    steps: list[PlannedStep] = []
    data = None
    if recipe.data is not None and isinstance(recipe.data.value, dict):
        steps.append(_synth_step(recipe.data, commands, out))
    elif recipe.data is not None:
        data = str(recipe.data.path())
        if not Path(data).exists():
            raise RecipeError(f"{recipe.data.where}: data {data} does not exist; fix `data:` or use --set data=...")
    producers: set[int] = set()
    current: ModelSource = 0
    device = _device(recipe.device)
    for spec in recipe.steps:
        step = _plan_step(spec, commands, out, current, producers, has_data=recipe.data is not None)
        if device is not None and find_param(step.command, "device") is not None and "device" not in step.user.names:
            step = replace(step, device=device)
        steps.append(step)
        if step.kind.produces_model:
            producers.add(spec.index)
            current = spec.index
    return Plan(recipe, out, tuple(steps), model, data, device)


def _device(t: Tracked | None) -> str | None:
    """The recipe's `device:` (syntax checked now; whether it exists is checked when a step runs)."""
    if t is None:
        return None
    try:
        parse_device(str(t.value))
    except DeviceError as exc:
        raise RecipeError(f"{t.where}: {exc}") from None
    return str(t.value)


def _command(name: str, where: str, commands: CommandLookup) -> tuple[StepKind, click.Command]:
    kind = STEPS.get(name)
    if kind is None:
        raise RecipeError(f"{where}: unknown step `{name}`; valid steps: {', '.join(sorted(STEPS))}")
    command = commands(name)
    if command is None:
        raise RecipeError(f"{where}: step `{name}` has no `yolo-compress {name}` command in this installation; "
                          f"update yolo-compress or remove the step")
    return kind, command


def _synth_step(data: Tracked, commands: CommandLookup, out: Path) -> PlannedStep:
    if set(data.value) != {"synth"}:
        raise RecipeError(f"{data.where}: `data:` is a path or {{synth: {{options}}}}, not {sorted(data.value)}")
    opts = data.value["synth"]
    if not isinstance(opts.value, (dict, type(None))):
        raise RecipeError(f"{opts.where}: `synth:` takes `data synth` options, e.g. {{synth: {{n_train: 256}}}}")
    spec = StepSpec(0, SYNTH_STEP, dict(opts.value or {}), data.where)
    kind, command = _command(SYNTH_STEP, data.where, commands)
    user = convert_options(spec, command)
    return PlannedStep(0, SYNTH_STEP, kind, command, out / "00-data", user, None, {}, False, data.where)


def _plan_step(spec: StepSpec, commands: CommandLookup, out: Path, current: ModelSource, producers: set[int],
               has_data: bool) -> PlannedStep:
    kind, command = _command(spec.name, spec.where, commands)
    user = convert_options(spec, command)
    refs = {k: (_source(t, spec, producers), cfg_f, w_f) for k, (t, cfg_f, w_f) in user.model_refs.items()}
    takes_model = find_param(command, "cfg") is not None
    data = find_param(command, "data") is not None and "data" not in user.names and has_data
    given = set(user.names) | {"out", "report_path"} | ({"cfg", "weights"} if takes_model else set())
    given |= {"data"} if data else set()
    given |= {find_param(command, f).name for _, c, w in refs.values() for f in (c, w) if f}
    missing = required_missing(command, given)
    if missing:
        hint = "add `data:` to the recipe" if "--data" in missing else f"add {missing[0].lstrip('-')}: ... to the step"
        raise RecipeError(f"{spec.where}: `{spec.name}` needs {', '.join(missing)}; {hint}")
    folder = out / f"{spec.index:02d}-{spec.name.replace(' ', '-')}"
    return PlannedStep(spec.index, spec.name, kind, command, folder, user, current if takes_model else None, refs,
                       data, spec.where)


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
