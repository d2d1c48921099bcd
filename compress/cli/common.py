"""Shared CLI pieces: option decorators, the context object, output helpers, the output guard."""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from ..device import DEVICE_HELP, resolve_device
from ..fileio import write_text_atomic
from ..guard import JobPaths, Output, check_job_paths

__all__ = ["AppContext", "model_options", "report_option", "device_option", "out_option", "write_report",
           "check_not_input", "echo_table", "install_guards", "guard_command", "resume_marker", "job_paths",
           "letterbox_option", "val_option", "training_data"]


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


def _device_callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str:
    """Resolve --device before any work (a missing device is one `Error:` line); torchrun ranks take their GPU."""
    local = int(os.environ["LOCAL_RANK"]) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    return str(resolve_device(value, local_rank=local))


def device_option(f: Callable) -> Callable:
    return click.option("--device", default="auto", show_default=True, callback=_device_callback,
                        help=f"Device: {DEVICE_HELP}.")(f)


def letterbox_option(f: Callable) -> Callable:
    """--letterbox/--no-letterbox (default: the cfg's [net] letter_box; plain resize as Darknet)."""
    return click.option("--letterbox/--no-letterbox", "letterbox", default=None,
                        help="Input geometry: letterbox (aspect kept, grey padding) or plain resize. "
                             "Default: the cfg's [net] letter_box (0 or absent = plain resize, as Darknet).")(f)


def val_option(f: Callable) -> Callable:
    return click.option("--val", type=click.Path(exists=True),
                        help="Validation images (folder or list file), replacing the --data valid split.")(f)


def training_data(data: str, val: str | None):
    """The --data spec of a training command with --val applied (warns when train = valid)."""
    from ..data import load_data_spec
    return load_data_spec(data, val, training=True)


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
    """Refuse to overwrite an input file with an output (files a command derives inside its --out)."""
    check_job_paths(JobPaths(inputs=tuple(Path(p) for p in in_paths if p),
                             outputs=tuple(Output(Path(p), "file", str(p)) for p in out_paths),
                             check_existing=False))


# --- the output guard, applied to every command by install_guards --------------------------------------------
# Inputs are the click.Path parameters declared with exists=True; every other click.Path parameter is an
# output (a folder when file_okay=False, a file when dir_okay=False). Commands with an output folder get
# --exist-ok; a `resume` flag and a `dry_run` flag of the command are honoured.

EXIST_OK_HELP = "Write into a non-empty output folder (an earlier run's files of the same name are replaced)."


def resume_marker(name: str) -> Callable:
    """Mark a command whose existing output folder is its own resumable run when it holds `name`."""
    def deco(f: Callable) -> Callable:
        f.__guard_resume_marker__ = name
        return f
    return deco


def _option_name(p: click.Parameter) -> str:
    longs = [o for o in getattr(p, "opts", []) if o.startswith("--")]
    return longs[0] if longs else (p.human_readable_name if isinstance(p, click.Argument) else p.opts[0])


def _path_params(command: click.Command) -> Iterator[tuple[click.Parameter, bool]]:
    """(parameter, is_input) for every click.Path parameter."""
    for p in command.params:
        if isinstance(p.type, click.Path):
            yield p, bool(p.type.exists)


def _kind(p: click.Parameter) -> str:
    return "dir" if not p.type.file_okay else "file" if not p.type.dir_okay else "any"


def job_paths(command: click.Command, kwargs: dict[str, Any], exist_ok: bool = False) -> JobPaths:
    """The declared inputs/outputs of one invocation of `command` (kwargs: its parsed parameters)."""
    inputs: list[Path] = []
    outputs: list[Output] = []
    for p, is_input in _path_params(command):
        value = kwargs.get(p.name)
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v and is_input:
                inputs.append(Path(v))
            elif v:
                outputs.append(Output(Path(v), _kind(p), _option_name(p)))
    later_rank = int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0"
    return JobPaths(tuple(inputs), tuple(outputs), resume=bool(kwargs.get("resume")), exist_ok=exist_ok,
                    resume_marker=getattr(command.callback, "__guard_resume_marker__", None),
                    check_existing=not (later_rank or kwargs.get("dry_run")))


def guard_command(command: click.Command) -> None:
    """Run check_job_paths before the command's body (once per command; adds --exist-ok where needed)."""
    if getattr(command.callback, "__guarded__", False) or command.callback is None:
        return
    outputs = [p for p, is_input in _path_params(command) if not is_input]
    if not outputs:
        return
    added = False
    if any(_kind(p) != "file" for p in outputs) and not any(p.name == "exist_ok" for p in command.params):
        command.params.append(click.Option(["--exist-ok"], is_flag=True, help=EXIST_OK_HELP))
        added = True
    body = command.callback

    @functools.wraps(body)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        exist_ok = kwargs.pop("exist_ok", False) if added else kwargs.get("exist_ok", False)
        check_job_paths(job_paths(command, kwargs, bool(exist_ok)))
        return body(*args, **kwargs)

    guarded.__guarded__ = True
    command.callback = guarded


def install_guards(group: click.Group) -> None:
    """Guard every command of the tree (called once, after all command modules are imported)."""
    for command in group.commands.values():
        if isinstance(command, click.Group):
            install_guards(command)
        else:
            guard_command(command)


def echo_table(text: str) -> None:
    click.echo(text)


FIT_OPTION_NAMES = ("epochs", "batch_size", "img_size", "lr0", "optimizer", "warmup_epochs", "workers", "seed",
                    "letterbox", "cache", "cache_dir", "sync_bn")


def fit_options(epochs: int = 100, lr0: float = 0.01, optimizer: str = "sgd", warmup_epochs: float = 3.0) -> Callable:
    """The training-loop options shared by train, sparse-train and distill (defaults differ per command)."""
    from ..train.distributed import SYNC_BN_HELP
    from ..train.optim import OPTIMIZERS

    options = [
        click.option("--epochs", default=epochs, show_default=True, type=click.IntRange(1)),
        click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1),
                     help="Total over processes."),
        click.option("--img-size", type=click.IntRange(32), help="Square training size (multiple of 32); "
                     "default: the cfg's."),
        click.option("--lr0", default=lr0, show_default=True, type=click.FloatRange(0, min_open=True)),
        click.option("--optimizer", default=optimizer, show_default=True, type=click.Choice(sorted(OPTIMIZERS))),
        click.option("--warmup-epochs", default=warmup_epochs, show_default=True, type=click.FloatRange(0),
                     help="Epochs of linear lr warm-up."),
        click.option("--workers", default=2, show_default=True, type=click.IntRange(0),
                     help="Data-loading processes."),
        click.option("--seed", default=0, show_default=True, type=int),
        click.option("--letterbox/--no-letterbox", "letterbox", default=None,
                     help="Input geometry (training and validation); default: the cfg's [net] letter_box."),
        click.option("--cache", type=click.Choice(["ram", "disk"]), help="Keep decoded training images in RAM "
                     "(bounded: half the available memory) or as .npy files (--cache-dir)."),
        click.option("--cache-dir", type=click.Path(file_okay=False), help="Folder of the disk cache "
                     "(default: OUT/cache)."),
        click.option("--mosaic", type=click.FloatRange(0, 1), help="Probability of a 4-image mosaic per "
                     "training image (default 0; also `mosaic:` in --hyp)."),
        click.option("--sync-bn", is_flag=True, help=SYNC_BN_HELP),
    ]

    def deco(f: Callable) -> Callable:
        for option in reversed(options):
            f = option(f)
        return f
    return deco


def fit_config(cfg_path: str, opts: dict, **extra: Any):
    """Pop the fit_options from a command's kwargs and build the TrainConfig (img size defaults to the cfg's)."""
    from ..cfg import read_cfg
    from ..train import TrainConfig

    values = {k: opts.pop(k) for k in FIT_OPTION_NAMES}
    values["img_size"] = values["img_size"] or read_cfg(cfg_path).width
    mosaic = opts.pop("mosaic")
    if mosaic is not None:
        extra["mosaic"] = mosaic
    return TrainConfig(**values, **extra)
