"""Shared CLI pieces: option decorators, the context object, the one call into the library (`run`)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import click
from click.core import ParameterSource

from compress.base.checks import SEED
from compress.base.device import DEVICE_HELP, resolve_device
from compress.jobs import Job, Report, run_job
from compress.jobs.training import TrainingJob
from compress.train.config import DistConfig
from compress.detection.losses import LOSSES
from compress.train.distributed import SYNC_BN_HELP
from compress.train.optim import OPTIMIZERS

__all__ = ["AppContext", "model_options", "report_option", "device_option", "out_option", "exist_ok_option", "run",
           "echo_table", "letterbox_option", "val_option", "fit_options", "hyp_option", "torchrun_config", "DATA_HELP"]


# every --data help says what --data takes (issue #26: most said ".data or image folder" though data.yaml works)
DATA_HELP = "Darknet .data, Ultralytics data.yaml or a folder of images + labels"


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


def torchrun_config() -> DistConfig | None:
    """This process of a torchrun job, from the environment torchrun sets (None outside torchrun): the one reader
    of RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; `run_job` gets it as `dist`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    init = f"tcp://{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ.get('MASTER_PORT', '29500')}"
    return DistConfig(rank=int(os.environ["RANK"]), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                      init_method=init)


def _device_callback(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Check --device before any work (a missing device is one `Error:` line); the job resolves it when it runs
    (auto: a GPU if one is visible; under torchrun a bare cuda is the process's own GPU)."""
    dist = torchrun_config()
    resolve_device(value, local_rank=dist.local_rank if dist else None)
    return value


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


def out_option(required: bool = True, help: str = "Output directory.") -> Callable:
    return click.option("--out", type=click.Path(file_okay=False), required=required, help=help)


def exist_ok_option(f: Callable) -> Callable:
    """--exist-ok on every command with an output folder (the guard in run_job refuses a non-empty one)."""
    return click.option("--exist-ok", is_flag=True, help=EXIST_OK_HELP)(f)


EXIST_OK_HELP = "Write into a non-empty output folder (an earlier run's files of the same name are replaced)."


def run(job_type: type[Job], options: Mapping[str, Any], report_path: str | None = None,
        exist_ok: bool = False) -> Report:
    """The one call of every command body: the job from the command's options (one to one; the options typed on
    the command line take precedence in `train`), run by `compress.jobs.run_job` (guard, run, report.json)."""
    ctx = click.get_current_context()
    given = {k for k in ctx.params if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
    return run_job(job_type.from_options(options, given), report_path, exist_ok=exist_ok, dist=torchrun_config())


def echo_table(text: str) -> None:
    click.echo(text)


def hyp_option(f: Callable) -> Callable:
    return click.option("--hyp", type=click.Path(exists=True, dir_okay=False),
                        help="YAML of hyper-parameters (Ultralytics keys: lr0, lrf, momentum, weight_decay, "
                             "warmup_epochs, box, obj, cls, hsv_h, scale, mosaic, ...; also freeze_bn_stats, "
                             "bn_momentum).")(f)


def finetune_options(job_type: type[TrainingJob]) -> list[Callable]:
    """What keeps a pretrained model (every trainer): the loss, BN handling, BN adaptation."""
    return [
        click.option("--loss", type=click.Choice(sorted(LOSSES)), help="Detection loss: darknet (the cfg's [yolo] "
                     "keys, as Darknet trains) or v5 (Ultralytics). Default: darknet when fine-tuning --weights, "
                     "else v5."),
        click.option("--bn-momentum", type=click.FloatRange(0, 1), help="BatchNorm running-average momentum "
                     "while training (default: the model's 0.03)."),
        click.option("--freeze-bn-stats/--no-freeze-bn-stats", "freeze_bn_stats", default=None,
                     help="Keep the BatchNorm running statistics fixed while training (default: on when "
                          "fine-tuning --weights, else off)."),
        click.option("--bn-adapt", default=job_type.train_default("bn_adapt"), show_default=True,
                     type=click.IntRange(0), help="Batches of training images that re-estimate the saved "
                     "model's BN statistics before each evaluation and save (0: off)."),
    ]


def fit_options(job_type: type[TrainingJob]) -> Callable:
    """The training-loop options shared by train, sparse-train and distill (defaults: the job type's)."""
    default = job_type.train_default
    options = [
        click.option("--epochs", default=default("epochs"), show_default=True, type=click.IntRange(1)),
        click.option("--batch-size", default=default("batch_size"), show_default=True, type=click.IntRange(1),
                     help="Total over processes."),
        click.option("--img-size", type=click.IntRange(32), help="Square training size (multiple of 32); "
                     "default: the cfg's."),
        click.option("--lr0", default=default("lr0"), show_default=True, type=click.FloatRange(0, min_open=True)),
        click.option("--optimizer", default=default("optimizer"), show_default=True,
                     type=click.Choice(sorted(OPTIMIZERS))),
        click.option("--warmup-epochs", default=default("warmup_epochs"), show_default=True,
                     type=click.FloatRange(0), help="Epochs of linear lr warm-up."),
        click.option("--workers", default=default("workers"), show_default=True, type=click.IntRange(0),
                     help="Data-loading processes."),
        click.option("--seed", default=default("seed"), show_default=True, type=click.IntRange(*SEED)),
        click.option("--letterbox/--no-letterbox", "letterbox", default=None,
                     help="Input geometry (training and validation); default: the cfg's [net] letter_box."),
        click.option("--cache", type=click.Choice(["ram", "disk"]), help="Keep decoded training images in RAM "
                     "(bounded: half the available memory) or as .npy files (--cache-dir)."),
        click.option("--cache-dir", type=click.Path(file_okay=False), help="Folder of the disk cache "
                     "(default: OUT/cache)."),
        click.option("--mosaic", type=click.FloatRange(0, 1), help="Probability of a 4-image mosaic per "
                     "training image (default 0; also `mosaic:` in --hyp)."),
        click.option("--sync-bn", is_flag=True, help=SYNC_BN_HELP),
        click.option("--no-progress", is_flag=True, help="Hide the per-epoch progress bar (shown on a terminal)."),
        *finetune_options(job_type),
    ]

    def deco(f: Callable) -> Callable:
        for option in reversed(options):
            f = option(f)
        return f
    return deco
