"""The click command tree. Each command maps its options one to one onto its job (`compress.jobs`), runs it with
`compress.jobs.run_job` (guard, run, report.json) and prints the returned Report. The group lives in `group.py`;
importing a command module attaches its commands."""
from __future__ import annotations

from compress.cli.group import cli, main
from compress.cli import benchmark, data, distill, export, info, prune, quantize, run, train  # noqa: F401  (registers)

__all__ = ["cli", "main"]
