"""Recipe runs: read, validate and plan (`prepare`), run the plan (`run_plan`); `run_recipe` (recipe/job.py)
adds the output guard."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

from compress.base.errors import RecipeError
from compress.base.lock import output_lock
from compress.jobs import JOBS, Job
from compress.recipe.plan import Plan, plan_recipe
from compress.recipe.runner import RunResult, execute_plan
from compress.recipe.spec import Recipe, parse_recipe
from compress.recipe.summary import stage_rows, write_summary

__all__ = ["prepare", "out_dir", "run_plan", "as_overrides"]

PathLike = str | os.PathLike


def as_overrides(overrides: Iterable[str]) -> tuple[str, ...]:
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
    parsed = parse_recipe(recipe, as_overrides(overrides))
    return plan_recipe(parsed, _out_dir(out, parsed), jobs)


def out_dir(recipe: PathLike, overrides: Iterable[str] = (), out: PathLike | None = None) -> Path:
    """The run folder: `out`, else the recipe's `out:`, else runs/<recipe name>."""
    return _out_dir(out, parse_recipe(recipe, as_overrides(overrides)))


def run_plan(recipe: PathLike, overrides: Iterable[str] = (), *, out: PathLike | None = None,
             dry_run: bool = False, jobs: Mapping[str, type[Job]] = JOBS) -> RunResult | Plan:
    """A recipe's run after its output guard (`run_recipe` and `RecipeJob` guard first)."""
    plan = prepare(recipe, overrides, out, jobs)
    if dry_run:
        return plan
    with output_lock(plan.out):  # one run per folder; its steps lock their own folders inside it
        result = execute_plan(plan)
        write_summary(result, stage_rows(result))
    return result
