"""Recipes: a YAML list of steps named exactly like CLI commands, run in order with models threaded through.

Example:
    >>> from compress.recipe import RunConfig, run_recipe
    >>> result = run_recipe(RunConfig("recipes/demo.yaml", out="runs/demo"), commands=lookup)

`commands` maps a step name ("prune", "data synth") to its click command; the CLI passes the real command
tree, so recipe options are checked against, converted by and passed to the very same click options.
See `spec.py` for the file format and `runner.py` for the output folder, manifest and resume rules.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from compress.base.errors import RecipeError
from compress.base.guard import JobPaths, Output, check_job_paths
from compress.recipe.plan import CommandLookup, Plan, PlannedStep, plan_recipe
from compress.recipe.runner import MANIFEST, RunResult, StepRecord, execute_plan, render_commands
from compress.recipe.spec import Recipe, load_recipe, parse_recipe
from compress.recipe.steps import MODEL_REFS, STEPS, StepKind, register_step
from compress.recipe.summary import STAGE_KEYS, stage_rows, stage_table, write_summary

__all__ = ["RunConfig", "RunResult", "StepRecord", "Recipe", "Plan", "PlannedStep", "STEPS", "StepKind",
           "MODEL_REFS", "STAGE_KEYS", "register_step", "load_recipe", "parse_recipe", "prepare", "run_recipe",
           "render_commands", "run_plan", "out_dir", "stage_rows", "stage_table", "write_summary"]


@dataclass(frozen=True)
class RunConfig:
    """`recipe` file; `out` overrides the recipe's `out:`; `overrides` are `key.sub=value` strings."""

    recipe: str | os.PathLike
    out: str | os.PathLike | None = None
    overrides: tuple[str, ...] = field(default_factory=tuple)
    dry_run: bool = False
    exist_ok: bool = False          # run into a non-empty folder that is not an earlier run of a recipe

    def __post_init__(self) -> None:
        if isinstance(self.overrides, (str, bytes)):
            raise RecipeError("RunConfig.overrides must be a tuple of key=value strings, not one string")


def _out_dir(config: RunConfig, recipe: Recipe) -> Path:
    if config.out is not None:
        return Path(config.out)
    if recipe.out is not None and recipe.out.value:
        return recipe.out.path()
    return Path("runs") / recipe.path.stem


def prepare(config: RunConfig, commands: CommandLookup) -> Plan:
    """Read, override and validate the recipe; nothing runs and nothing is written."""
    recipe = parse_recipe(config.recipe, tuple(config.overrides))
    return plan_recipe(recipe, commands, _out_dir(config, recipe))


def out_dir(config: RunConfig) -> Path:
    """The run folder: `config.out`, else the recipe's `out:`, else runs/<recipe name>."""
    return _out_dir(config, parse_recipe(config.recipe, tuple(config.overrides)))


def run_recipe(config: RunConfig, commands: CommandLookup, context_obj: object = None) -> RunResult | Plan:
    """Validate, then (unless dry_run) guard the run folder, run every step and write summary.json/summary.png.

    Returns the Plan for a dry run, else the RunResult. (`compress.jobs.run_job(RecipeJob(...))` is the same
    run with the guard of every job and a report dict.)
    """
    if not config.dry_run:
        check_job_paths(JobPaths(inputs=(Path(config.recipe),), outputs=(Output(out_dir(config), "dir", "--out"),),
                                 exist_ok=config.exist_ok, resume_marker=MANIFEST))
    return run_plan(config, commands, context_obj)


def run_plan(config: RunConfig, commands: CommandLookup, context_obj: object = None) -> RunResult | Plan:
    """`run_recipe` after its output guard."""
    plan = prepare(config, commands)
    if config.dry_run:
        return plan
    result = execute_plan(plan, context_obj)
    write_summary(result, stage_rows(result))
    return result
