"""`yolo-compress run`: the recipe command as a job (it lives here, above the jobs it runs)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterable, Mapping

from compress.base.guard import Output, check_job_paths
from compress.jobs import JOBS, Job, Report, job_paths, register_job
from compress.jobs.base import PathLike
from compress.recipe.api import as_overrides, out_dir, run_plan
from compress.recipe.plan import Plan
from compress.recipe.runner import MANIFEST, RunResult, render_commands
from compress.recipe.summary import stage_rows
from compress.train.config import DistConfig

__all__ = ["RecipeJob", "run_recipe"]


@register_job
@dataclass(frozen=True)
class RecipeJob(Job):
    """Runs `recipe`'s steps into `out` (default: the recipe's `out:`, else runs/<recipe name>); `overrides`
    (--set) are `key.sub=value` strings; `dry_run` validates every step and lists the commands. `exist_ok` is
    a field here too (the run folder may be foreign but non-empty); the steps always replace their own outputs."""

    command: ClassVar[str] = "run"
    flags: ClassVar[Mapping[str, str]] = {"overrides": "--set"}
    resume_marker: ClassVar[str | None] = MANIFEST

    recipe: PathLike
    out: PathLike | None = None
    overrides: tuple[str, ...] = ()
    dry_run: bool = False
    exist_ok: bool = False

    def inputs(self) -> tuple[Path, ...]:
        return (Path(self.recipe),)

    def outputs(self) -> tuple[Output, ...]:
        return (Output(out_dir(self.recipe, self.overrides, self.out), "dir", "--out"),)

    def writes_nothing(self) -> bool:
        return self.dry_run

    def run(self, dist: DistConfig | None = None) -> Report:
        result = run_plan(self.recipe, self.overrides, out=self.out, dry_run=self.dry_run)
        if isinstance(result, Plan):
            return self.report({"dry_run": True, "out": str(result.out), "commands": render_commands(result)})
        return self.report({"out": str(result.plan.out), "wall_s": round(result.seconds, 2),
                            "stages": stage_rows(result), "steps": len(result.records)})

    def to_argv(self) -> list[str]:
        command, _, recipe, *options = super().to_argv()  # RECIPE is the command's argument, not an option
        return [command, recipe, *options]


def run_recipe(recipe: PathLike, overrides: Iterable[str] = (), *, out: PathLike | None = None,
               dry_run: bool = False, exist_ok: bool = False,
               jobs: Mapping[str, type[Job]] = JOBS) -> RunResult | Plan:
    """Validate, then (unless `dry_run`) guard the run folder (the `run` job's own declared paths), run every
    step and write summary.json/.png; also `compress.run_recipe`.

    `overrides`: `key.sub=value` strings (`--set`); `exist_ok`: run into a non-empty folder that is not an
    earlier run of a recipe (one holding manifest.json is resumed without it); `jobs`: the step registry
    (command -> job type; tests pass their own). Returns the Plan for a dry run, else the RunResult.
    """
    job = RecipeJob(recipe, out, as_overrides(overrides), dry_run, exist_ok)
    check_job_paths(job_paths(job, exist_ok=exist_ok))
    return run_plan(recipe, overrides, out=out, dry_run=dry_run, jobs=jobs)
