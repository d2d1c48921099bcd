"""Recipes: a YAML list of steps named exactly like CLI commands, each step one job, models threaded through.

Example:
    >>> import compress
    >>> result = compress.run_recipe("recipes/demo.yaml", ["steps.prune.percent=0.6"], out="runs/demo")

A step's options are its job's options (`compress.jobs.JOBS[name].from_dict`), so a recipe is checked against,
and runs, exactly what the command runs, from Python as from the CLI. See `spec.py` for the file format,
`plan.py` for validation and `runner.py` for the output folder, manifest and resume rules.
"""
from __future__ import annotations

from compress.recipe.api import out_dir, prepare, run_plan
from compress.recipe.job import RecipeJob, run_recipe
from compress.recipe.plan import Plan, PlannedStep, plan_recipe
from compress.recipe.runner import MANIFEST, RunResult, StepRecord, execute_plan, render_commands
from compress.recipe.spec import Recipe, load_recipe, parse_recipe
from compress.recipe.steps import MODEL_REFS, StepKind, step_kind
from compress.recipe.summary import STAGE_KEYS, stage_rows, stage_table, write_summary

__all__ = ["RecipeJob", "RunResult", "StepRecord", "Recipe", "Plan", "PlannedStep", "StepKind", "MODEL_REFS",
           "MANIFEST", "STAGE_KEYS", "step_kind", "load_recipe", "parse_recipe", "plan_recipe", "prepare",
           "run_recipe", "render_commands", "run_plan", "execute_plan", "out_dir", "stage_rows", "stage_table",
           "write_summary"]
