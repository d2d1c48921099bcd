"""`yolo-compress run RECIPE.yaml`: a recipe's steps (the CLI commands themselves), through compress.recipe."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Mapping

from compress.base.guard import Output
from compress.jobs.base import Job, PathLike, Report, paths, register_job
from compress.recipe import MANIFEST, Plan, RunConfig, out_dir, render_commands, run_plan, stage_rows

__all__ = ["RecipeJob"]


@register_job
@dataclass(frozen=True)
class RecipeJob(Job):
    """Runs `recipe`'s steps into `out` (default: the recipe's `out:`, else runs/<recipe name>); `overrides`
    (--set) are `key.sub=value` strings. `exist_ok` is a field here too: the recipe hands it to its steps."""

    command: ClassVar[str] = "run"
    flags: ClassVar[Mapping[str, str]] = {"overrides": "--set"}
    resume_marker: ClassVar[str | None] = MANIFEST

    recipe: PathLike
    out: PathLike | None = None
    overrides: tuple[str, ...] = ()
    dry_run: bool = False
    exist_ok: bool = False

    def run_config(self) -> RunConfig:
        return RunConfig(self.recipe, self.out, tuple(self.overrides), self.dry_run, self.exist_ok)

    def inputs(self) -> tuple[Path, ...]:
        return paths(self.recipe)

    def outputs(self) -> tuple[Output, ...]:
        return (Output(out_dir(self.run_config()), "dir", "--out"),)

    def writes_nothing(self) -> bool:
        return self.dry_run

    def run(self) -> Report:
        from compress.cli.run import lookup_command  # the steps are the CLI's commands (cli imports the jobs)
        result = run_plan(self.run_config(), lookup_command)
        if isinstance(result, Plan):
            return self.report({"dry_run": True, "out": str(result.out), "commands": render_commands(result)})
        return self.report({"out": str(result.plan.out), "wall_s": round(result.seconds, 2),
                            "stages": stage_rows(result), "steps": len(result.records)})

    def to_argv(self) -> list[str]:
        command, _, recipe, *options = super().to_argv()  # RECIPE is the command's argument, not an option
        return [command, recipe, *options]
