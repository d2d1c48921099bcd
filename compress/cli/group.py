"""The click group and `main` (the entry point); the command modules attach their commands to `cli`."""
from __future__ import annotations

import logging
import signal
import sys
import threading

import click

from compress.base.errors import CompressError
from compress.cli.common import AppContext

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug logs).")
@click.version_option(package_name="yolo-compress")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: int) -> None:
    """Compress Darknet YOLO detectors: cfg + weights in, cfg + weights out."""
    level = logging.WARNING - 10 * min(verbose + 1, 2)
    logging.basicConfig(level=level, format="%(message)s")
    for noisy in ("PIL", "matplotlib"):  # their debug logs drown ours
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ctx.obj = AppContext(debug=debug)


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        _main(argv, debug)
    except KeyboardInterrupt:  # a Ctrl-C while an error was being reported
        _interrupted()


def _main(argv: list[str] | None, debug: bool) -> None:
    try:
        cli.main(args=argv, prog_name="yolo-compress", standalone_mode=False)
    except click.exceptions.Abort as exc:
        if isinstance(exc.__context__, KeyboardInterrupt):  # click turns Ctrl-C into Abort
            _interrupted()
        click.echo("Aborted.", err=True)  # a prompt closed by end of input
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except CompressError as exc:
        if debug:
            raise
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        _interrupted()


def _interrupted() -> None:
    """`Interrupted.` and exit 130 (128 + SIGINT). Further Ctrl-Cs are ignored from here on: pressed again while
    workers shut down they would end the process by the signal (-2) without a word."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    click.echo("Interrupted.", err=True)
    sys.exit(130)
