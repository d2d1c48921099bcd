"""Shared CLI pieces: option decorators, the context object, output helpers."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click

from ..errors import CompressError
from ..fileio import write_text_atomic

__all__ = ["AppContext", "model_options", "report_option", "device_option", "out_option", "write_report",
           "check_not_input", "echo_table"]


@dataclass
class AppContext:
    debug: bool = False


def model_options(weights_required: bool = False, cfg_required: bool = True) -> Callable:
    """--cfg / --weights for the model a command works on."""
    def deco(f: Callable) -> Callable:
        f = click.option("--weights", type=click.Path(exists=True, dir_okay=False), required=weights_required,
                         help="Darknet .weights or a .pt checkpoint (omit for random init).")(f)
        f = click.option("--cfg", type=click.Path(exists=True, dir_okay=False), required=cfg_required,
                         help="Darknet .cfg of the model.")(f)
        return f
    return deco


def report_option(f: Callable) -> Callable:
    return click.option("--report", "report_path", type=click.Path(dir_okay=False),
                        help="Write the measured figures to this JSON file.")(f)


def device_option(f: Callable) -> Callable:
    return click.option("--device", default="cpu", show_default=True,
                        help="torch device: cpu, cuda, cuda:1 ...")(f)


def out_option(required: bool = True, help: str = "Output directory.") -> Callable:
    return click.option("--out", type=click.Path(file_okay=False), required=required, help=help)


def write_report(path: str | Path | None, figures: dict[str, Any]) -> None:
    """Write `figures` as JSON (atomically) when --report was given."""
    if path:
        write_text_atomic(path, json.dumps(figures, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def check_not_input(out_paths: list[str | Path], in_paths: list[str | Path | None]) -> None:
    """Refuse to overwrite an input file with an output."""
    ins = {Path(p).resolve() for p in in_paths if p}
    for p in out_paths:
        if Path(p).resolve() in ins:
            raise CompressError(f"{p}: output would overwrite an input file; choose another --out")


def echo_table(text: str) -> None:
    click.echo(text)
