"""`yolo-compress run RECIPE.yaml`: run a recipe's steps (each a command's job) and tabulate the stages."""
from __future__ import annotations

from typing import Any

import click

from compress.cli.group import cli
from compress.cli.common import run
from compress.recipe import RecipeJob, stage_table


@cli.command("run")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="Output directory (default: the recipe's `out:`, "
              "else runs/<recipe name>).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value: model.cfg=x.cfg, data=my.data, steps.3.prune.percent=0.7 (repeatable).")
@click.option("--dry-run", is_flag=True, help="Validate every step against its command and print the commands.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the stage table as JSON.")
@click.option("--exist-ok", is_flag=True, help="Run into a non-empty --out that is not an earlier run of a recipe "
              "(a folder holding manifest.json is resumed without it).")
def run_command(report_path: str | None, **options: Any) -> None:
    """Run RECIPE.yaml: each step is a yolo-compress command; models thread through the steps' report.json."""
    r = run(RecipeJob, options, report_path, options["exist_ok"])
    if r.get("dry_run"):
        click.echo(r["commands"])
        return
    click.echo(f"\n{stage_table(r['stages'])}\n\n{r['steps']} steps in {r['wall_s']:.1f} s -> {r['out']}")
