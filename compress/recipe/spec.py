"""Recipe files: YAML read with line numbers, `--set` overrides, and the typed `Recipe` they become.

Format (every path is relative to the recipe file; `--set` values are relative to the working directory)::

    model: {cfg: demo.cfg, weights: demo.weights}   # weights optional (random init)
    data: my.data                                   # or {synth: {n_train: 256}}: `data synth` runs first
    out: ../runs/demo                               # optional; `run --out` wins; default runs/<recipe name>
    device: auto                                    # optional; every step with --device gets it unless it sets one
    steps:                                          # each step: one CLI command path -> its options
      - train: {epochs: 30}
      - prune: {method: slim, percent: 0.5}
      - distill: {teacher: step:1, kd: 3}           # model-valued option: input | step:N | {cfg:, weights:}

Steps are numbered from 1 (like their output folders `01-train`, ...). `--set` takes dotted keys:
`model.cfg=x.cfg`, `data=my.data`, `steps.3.prune.percent=0.7` or, when the command occurs once,
`steps.prune.percent=0.7`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from compress.base.errors import RecipeError
from compress.base.yamlio import compose_yaml, read_yaml_text

__all__ = ["Tracked", "StepSpec", "Recipe", "load_recipe", "parse_recipe", "apply_overrides", "to_plain"]

TOP_KEYS = ("model", "data", "out", "device", "steps")


@dataclass(frozen=True)
class Tracked:
    """A YAML value with where it came from: `where` is "file:line" or "--set key"; `base` resolves its paths."""

    value: Any                      # scalar, dict[str, Tracked] or list[Tracked]
    where: str
    base: Path = field(default=Path("."), compare=False)

    def path(self) -> Path:
        return (self.base / os.path.expanduser(str(self.value))).resolve()


@dataclass(frozen=True)
class StepSpec:
    index: int                      # 1-based
    name: str                       # CLI command path, e.g. "prune" or "data synth"
    options: dict[str, Tracked]
    where: str


@dataclass(frozen=True)
class Recipe:
    path: Path
    cfg: Tracked
    weights: Tracked | None
    data: Tracked | None
    out: Tracked | None
    steps: tuple[StepSpec, ...]
    tree: Tracked                   # the whole (overridden) document
    device: Tracked | None = None   # recipe-wide --device


def _track(node: yaml.Node, loader: yaml.SafeLoader, source: str, base: Path) -> Tracked:
    where = f"{source}:{node.start_mark.line + 1}"
    if isinstance(node, yaml.MappingNode):
        return Tracked({str(loader.construct_object(k)): _track(v, loader, source, base) for k, v in node.value},
                       where, base)
    if isinstance(node, yaml.SequenceNode):
        return Tracked([_track(v, loader, source, base) for v in node.value], where, base)
    return Tracked(loader.construct_object(node), where, base)


def _wrap(value: Any, where: str, base: Path) -> Tracked:
    if isinstance(value, dict):
        return Tracked({str(k): _wrap(v, where, base) for k, v in value.items()}, where, base)
    if isinstance(value, list):
        return Tracked([_wrap(v, where, base) for v in value], where, base)
    return Tracked(value, where, base)


def to_plain(t: Tracked) -> Any:
    if isinstance(t.value, dict):
        return {k: to_plain(v) for k, v in t.value.items()}
    if isinstance(t.value, list):
        return [to_plain(v) for v in t.value]
    return t.value


def parse_recipe_tree(text: str, path: Path) -> Tracked:
    node = compose_yaml(text, str(path), RecipeError)  # bounded: no aliases, plain tags only
    if node is None:
        raise RecipeError(f"{path}:1: empty recipe; it needs at least `model:` and `steps:`")
    return _track(node, yaml.SafeLoader(""), str(path), path.parent.resolve())


def apply_overrides(tree: Tracked, overrides: tuple[str, ...], cwd: Path) -> Tracked:
    """Apply `key.sub=value` strings (values parsed as YAML) to a copy of the tree."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {item}: expected key=value, e.g. --set steps.prune.percent=0.7")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        tree = _set(tree, key.split("."), _wrap(value, f"--set {key}", cwd), key)
    return tree


def _set(node: Tracked, keys: list[str], value: Tracked, full: str) -> Tracked:
    if not keys:
        return value
    head, rest = keys[0], keys[1:]
    if isinstance(node.value, list):
        idx = _step_index(node.value, head, rest, full)
        items = list(node.value)
        items[idx] = _set(items[idx], rest if head.isdigit() else [head, *rest], value, full)
        return Tracked(items, node.where, node.base)
    if not isinstance(node.value, dict):
        node = Tracked({}, node.where, node.base)  # e.g. `prune: null` or a scalar being replaced by a mapping
    child = node.value.get(head, Tracked({}, value.where, value.base))
    return Tracked({**node.value, head: _set(child, rest, value, full)}, node.where, node.base)


def _step_index(items: list[Tracked], head: str, rest: list[str], full: str) -> int:
    names = [next(iter(s.value), None) if isinstance(s.value, dict) else None for s in items]
    if head.isdigit():
        idx = int(head) - 1
        if not 0 <= idx < len(items):
            raise RecipeError(f"--set {full}: there is no step {head}; steps are numbered 1..{len(items)}")
        if rest and rest[0] != names[idx] and rest[0] in names:
            raise RecipeError(f"--set {full}: step {head} is `{names[idx]}`, not `{rest[0]}` (steps are numbered "
                              f"from 1 like their output folders); `{rest[0]}` is step {names.index(rest[0]) + 1}")
        return idx
    hits = [i for i, n in enumerate(names) if n == head]
    if len(hits) != 1:
        raise RecipeError(f"--set {full}: `{head}` matches {len(hits)} steps; use its number, e.g. "
                          f"steps.{hits[0] + 1 if hits else 1}.{head}...")
    return hits[0]


def parse_recipe(path: str | os.PathLike, overrides: tuple[str, ...] = (), cwd: Path | None = None) -> Recipe:
    """Read `path`, apply `overrides`, check the document's shape (not yet the step options)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe not found; pass an existing RECIPE.yaml")
    text = read_yaml_text(path, RecipeError)
    tree = apply_overrides(parse_recipe_tree(text, path), overrides, cwd or Path.cwd())
    if not isinstance(tree.value, dict):
        raise RecipeError(f"{tree.where}: a recipe is a mapping with keys {', '.join(TOP_KEYS)}")
    for key, val in tree.value.items():
        if key not in TOP_KEYS:
            raise RecipeError(f"{val.where}: unknown top-level key `{key}`; valid keys: {', '.join(TOP_KEYS)}")
    model = tree.value.get("model")
    if model is None or not isinstance(model.value, dict) or "cfg" not in model.value:
        raise RecipeError(f"{(model or tree).where}: `model:` needs `cfg:` (and optionally `weights:`), "
                          f"e.g. model: {{cfg: yolov3.cfg, weights: yolov3.weights}}")
    for key, val in model.value.items():
        if key not in ("cfg", "weights"):
            raise RecipeError(f"{val.where}: unknown key `model.{key}`; use cfg and weights")
    weights = model.value.get("weights")
    device = tree.value.get("device")
    return Recipe(path, model.value["cfg"], weights if weights and weights.value else None,
                  tree.value.get("data"), tree.value.get("out"), _steps(tree), tree,
                  device if device is not None and device.value is not None else None)


def load_recipe(path: str | os.PathLike, overrides: tuple[str, ...] = ()) -> Recipe:
    return parse_recipe(path, overrides)


def _steps(tree: Tracked) -> tuple[StepSpec, ...]:
    steps = tree.value.get("steps")
    if steps is None or not isinstance(steps.value, list) or not steps.value:
        raise RecipeError(f"{(steps or tree).where}: `steps:` must be a non-empty list, e.g. steps: [{{eval: {{}}}}]")
    out = []
    for i, step in enumerate(steps.value, 1):
        if not isinstance(step.value, dict) or len(step.value) != 1:
            raise RecipeError(f"{step.where}: step {i} must be a one-key mapping `command: {{options}}`, "
                              f"e.g. `- prune: {{method: slim}}`")
        (name, opts), = step.value.items()
        if opts.value is None:
            opts = Tracked({}, opts.where, opts.base)
        if not isinstance(opts.value, dict):
            raise RecipeError(f"{opts.where}: options of `{name}` must be a mapping like {{epochs: 10}}")
        out.append(StepSpec(i, name, dict(opts.value), step.where))
    return tuple(out)
