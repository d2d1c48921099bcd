"""`yolo-compress run`: the recipe command as a job (it lives here, above the jobs it runs)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from compress.base.guard import Output
from compress.jobs import Job, PathLike, Report, register_job
from compress.recipe.api import out_dir, run_plan
from compress.recipe.plan import Plan
from compress.recipe.runner import MANIFEST, render_commands
from compress.recipe.summary import stage_rows

__all__ = ["RecipeJob"]


@register_job
@dataclass(frozen=True)
class RecipeJob(Job):
    """`yolo-compress run RECIPE`: the recipe's steps into `out` (default: the recipe's `out:`, else
    runs/<recipe name>); `overrides` are `--set key=value` strings; `dry_run` validates and lists the commands."""

    command: ClassVar[str] = "run"
    resume_marker: ClassVar[str | None] = MANIFEST

    recipe: PathLike
    out: PathLike | None = None
    overrides: tuple[str, ...] = ()
    dry_run: bool = False

    def inputs(self) -> tuple[Path, ...]:
        return (Path(self.recipe),)

    def outputs(self) -> tuple[Output, ...]:
        return (Output(self.run_dir(), "dir", "--out"),)

    def run_dir(self) -> Path:
        return out_dir(self.recipe, self.overrides, self.out)

    def writes_nothing(self) -> bool:
        return self.dry_run

    def run(self) -> Report:
        result = run_plan(self.recipe, self.overrides, out=self.out, dry_run=self.dry_run)
        if isinstance(result, Plan):
            return self.report({"dry_run": True, "out": str(result.out), "commands": render_commands(result)})
        return self.report({"out": str(result.plan.out), "wall_s": round(result.seconds, 2),
                            "stages": stage_rows(result), "steps": len(result.records)})
