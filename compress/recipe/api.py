"""`run_recipe(path, overrides)`: a recipe from Python, the same run as `yolo-compress run`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

from compress.base.errors import RecipeError
from compress.base.guard import JobPaths, Output, check_job_paths
from compress.jobs import JOBS, Job
from compress.recipe.plan import Plan, plan_recipe
from compress.recipe.runner import MANIFEST, RunResult, execute_plan
from compress.recipe.spec import Recipe, parse_recipe
from compress.recipe.summary import stage_rows, write_summary

__all__ = ["prepare", "out_dir", "run_recipe", "run_plan"]

PathLike = str | os.PathLike


def _overrides(overrides: Iterable[str]) -> tuple[str, ...]:
    if isinstance(overrides, (str, bytes)):
        raise RecipeError("overrides must be a list of key=value strings, not one string")
    return tuple(overrides)


def _out_dir(out: PathLike | None, recipe: Recipe) -> Path:
    if out is not None:
        return Path(out)
    if recipe.out is not None and recipe.out.value:
        return recipe.out.path()
    return Path("runs") / recipe.path.stem


def prepare(recipe: PathLike, overrides: Iterable[str] = (), out: PathLike | None = None,
            jobs: Mapping[str, type[Job]] = JOBS) -> Plan:
    """Read, override and validate the recipe; nothing runs and nothing is written."""
    parsed = parse_recipe(recipe, _overrides(overrides))
    return plan_recipe(parsed, _out_dir(out, parsed), jobs)


def out_dir(recipe: PathLike, overrides: Iterable[str] = (), out: PathLike | None = None) -> Path:
    """The run folder: `out`, else the recipe's `out:`, else runs/<recipe name>."""
    return _out_dir(out, parse_recipe(recipe, _overrides(overrides)))


def run_recipe(recipe: PathLike, overrides: Iterable[str] = (), *, out: PathLike | None = None,
               dry_run: bool = False, exist_ok: bool = False,
               jobs: Mapping[str, type[Job]] = JOBS) -> RunResult | Plan:
    """Validate, then (unless `dry_run`) guard the run folder, run every step and write summary.json/.png.

    `overrides`: `key.sub=value` strings (`--set`); `exist_ok`: run into a non-empty folder that is not an
    earlier run of a recipe (one holding manifest.json is resumed without it); `jobs`: the step registry
    (command -> job type; tests pass their own). Returns the Plan for a dry run, else the RunResult.
    """
    if not dry_run:
        check_job_paths(JobPaths(inputs=(Path(recipe),), outputs=(Output(out_dir(recipe, overrides, out), "dir",
                                                                           "--out"),),
                                 exist_ok=exist_ok, resume_marker=MANIFEST))
    return run_plan(recipe, overrides, out=out, dry_run=dry_run, jobs=jobs)


def run_plan(recipe: PathLike, overrides: Iterable[str] = (), *, out: PathLike | None = None,
             dry_run: bool = False, jobs: Mapping[str, type[Job]] = JOBS) -> RunResult | Plan:
    """`run_recipe` after its output guard (`RecipeJob` runs this behind `run_job`'s guard)."""
    plan = prepare(recipe, overrides, out, jobs)
    if dry_run:
        return plan
    result = execute_plan(plan)
    write_summary(result, stage_rows(result))
    return result
