"""Step kinds and the translation of a recipe step into the argument list of its click command.

The click command is the single source of truth for option names, types and required-ness: recipe options are
matched against `command.params` and converted with each parameter's own click type, so a recipe can never
drift from the CLI. The registry below only says how the runner threads models, data and outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import click

from compress.base.errors import RecipeError
from compress.recipe.spec import StepSpec, Tracked

__all__ = ["StepKind", "STEPS", "register_step", "MODEL_REFS", "find_param", "convert_options", "ConvertedStep",
           "valid_keys", "required_missing"]


@dataclass(frozen=True)
class StepKind:
    """How the runner wires a command: model in (--cfg/--weights), model out (DIR/report.json), output."""

    produces_model: bool = False
    out: Literal["dir", "file", "none"] = "dir"
    out_name: str = ""              # file name inside the step folder when out == "file"
    in_summary: bool = False        # a row of the final stage table


STEPS: dict[str, StepKind] = {}


def register_step(name: str, kind: StepKind) -> StepKind:
    STEPS[name] = kind
    return kind


for _name in ("train", "sparse-train", "prune", "distill", "quantize"):
    register_step(_name, StepKind(produces_model=True, in_summary=True))
register_step("eval", StepKind(out="dir", in_summary=True))
register_step("export", StepKind(out="file", out_name="model.onnx"))
register_step("info", StepKind(out="none"))
register_step("data synth", StepKind(out="dir"))

# recipe-only model-valued options: key -> (cfg option names, weights option names), first match wins
MODEL_REFS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "teacher": (("t_cfg", "teacher_cfg"), ("t_weights", "teacher_weights")),
}
RUNNER_OWNED = ("cfg", "weights", "out", "report_path", "report")


def _norm(name: str) -> str:
    return name.lstrip("-").replace("-", "_")


def find_param(command: click.Command, key: str) -> click.Parameter | None:
    """The parameter named `key` (dashes or underscores), by its name or by any of its option strings."""
    key = _norm(key)
    for p in command.params:
        if isinstance(p, click.Option) and (p.name == key or key in {_norm(o) for o in p.opts}):
            return p
    return None


def _flag(p: click.Option) -> str:
    longs = [o for o in p.opts if o.startswith("--")]
    return longs[0] if longs else p.opts[0]


@dataclass(frozen=True)
class ConvertedStep:
    args: tuple[str, ...]           # the user's options as CLI arguments (without the runner-threaded ones)
    values: dict[str, Any]          # option name -> converted value (for resolved.yaml / manifest)
    model_refs: dict[str, tuple[Tracked, str, str | None]]  # key -> (ref, --cfg option, --weights option)
    files: tuple[str, ...]          # paths of existing files named by options (hashed for resume)
    names: frozenset[str] = frozenset()  # click parameter names the user set


def convert_options(spec: StepSpec, command: click.Command, owned: tuple[str, ...] = RUNNER_OWNED) -> ConvertedStep:
    """Check every option of `spec` against `command` and convert it with the option's click type."""
    ctx = click.Context(command, info_name=spec.name)
    args: list[str] = []
    values: dict[str, Any] = {}
    refs: dict[str, tuple[Tracked, str, str | None]] = {}
    files: list[str] = []
    names: set[str] = set()
    for key, tracked in spec.options.items():
        if _norm(key) in MODEL_REFS:
            refs[_norm(key)] = _model_ref(spec, command, _norm(key), tracked)
            continue
        param = find_param(command, key)
        if param is None:
            raise RecipeError(f"{tracked.where}: `{spec.name}` has no option `{key}`; valid options: "
                              f"{', '.join(valid_keys(command, owned))}")
        if param.name in owned:
            raise RecipeError(f"{tracked.where}: `{key}` is set by the runner (model/data/out thread through the "
                              f"steps); remove it, or change `model:`/`out:` instead")
        value = _convert(spec, ctx, param, key, tracked)
        values[_norm(_flag(param))] = value  # keyed like the CLI option, so resolved.yaml reads like the CLI
        names.add(param.name)
        args += _render(param, value)
        if isinstance(param.type, click.Path) and value is not None:
            files += [str(v) for v in (value if isinstance(value, (list, tuple)) else [value]) if Path(v).is_file()]
    return ConvertedStep(tuple(args), values, refs, tuple(files), frozenset(names))


def valid_keys(command: click.Command, owned: tuple[str, ...] = RUNNER_OWNED) -> list[str]:
    keys = [_norm(_flag(p)) for p in command.params if isinstance(p, click.Option) and p.name not in owned
            and not p.hidden]
    return sorted(keys) + [k for k in MODEL_REFS if any(find_param(command, c) for c in MODEL_REFS[k][0])]


def _convert(spec: StepSpec, ctx: click.Context, param: click.Parameter, key: str, tracked: Tracked) -> Any:
    raw = tracked.value
    if isinstance(raw, dict):
        raise RecipeError(f"{tracked.where}: `{spec.name}.{key}` takes a value, not a mapping")
    many = param.multiple or (param.nargs != 1)
    if isinstance(raw, list) and not many:
        raise RecipeError(f"{tracked.where}: `{spec.name}.{key}` takes one value, not a list")
    items = [t.value for t in raw] if isinstance(raw, list) else raw
    if isinstance(param.type, click.Path):
        items = [str(Tracked(v, tracked.where, tracked.base).path()) for v in items] if isinstance(items, list) \
            else (str(tracked.path()) if items is not None else None)
    if many and not isinstance(items, list) and param.multiple:
        items = [items]
    try:
        return param.type_cast_value(ctx, items)
    except click.BadParameter as exc:
        raise RecipeError(f"{tracked.where}: `{spec.name}.{key}`: {exc.message}") from None
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{tracked.where}: `{spec.name}.{key}`: invalid value {raw!r} ({exc})") from None


def _render(param: click.Option, value: Any) -> list[str]:
    if param.is_flag and not param.count:
        if value:
            return [_flag(param)] if param.opts else []
        return [param.secondary_opts[0]] if param.secondary_opts else []
    if value is None:
        return []
    if param.multiple:
        return [a for v in value for a in _render_one(param, v)]
    return _render_one(param, value)


def _render_one(param: click.Option, value: Any) -> list[str]:
    vals = value if isinstance(value, (list, tuple)) else [value]
    return [_flag(param), *(str(v) for v in vals)]


def _model_ref(spec: StepSpec, command: click.Command, key: str, tracked: Tracked) -> tuple[Tracked, str, str | None]:
    cfg_names, w_names = MODEL_REFS[key]
    cfg_p = next((p for n in cfg_names if (p := find_param(command, n))), None)
    w_p = next((p for n in w_names if (p := find_param(command, n))), None)
    if cfg_p is None:
        raise RecipeError(f"{tracked.where}: `{spec.name}` takes no `{key}` model (no --{cfg_names[0]} option)")
    return tracked, _flag(cfg_p), _flag(w_p) if w_p else None


def required_missing(command: click.Command, given: set[str]) -> list[str]:
    """Required options of `command` that neither the user nor the runner supplies."""
    return [_flag(p) for p in command.params if isinstance(p, click.Option) and p.required and p.name not in given]

