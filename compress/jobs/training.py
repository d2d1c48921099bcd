"""The training options: one `train: TrainConfig` for train, sparse-train, distill (and QAT in quantize).

One precedence for every trainer (`train.hyp.resolve_train_config`): TrainConfig defaults < the command's own
defaults < the fine-tune defaults when it starts from pretrained `--weights` (darknet loss, a low lr0, no
warm-up, frozen BN statistics, the collapse check) < `--hyp` < the options the user typed. Every training
report carries the `train_config` it ran with.

Their CLI options (`--epochs`, `--lr0`, `--no-ema`, ...) are not job fields: `from_options` / `from_dict` hand
them to the job's `make_train`, which builds the TrainConfig once. An option is a TrainConfig field of the same
name, or a negated flag (`no_ema` -> `ema=False`). `to_argv` renders a training job's `train` back into the
options that differ from what the job builds without any.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, Mapping

from compress.base.errors import CompressError
from compress.base.guard import Output, data_file_inputs
from compress.data.dataspec import IMG_EXTS, find_names, label_path, list_images, load_data_spec
from compress.darknet.cfg import read_cfg
from compress.jobs.base import NEGATED, Job, PathLike, Report
from compress.train.config import TrainConfig
from compress.train.hyp import resolve_train_config
from compress.train.loop import TrainFiles

__all__ = ["FIT_OPTIONS", "TrainingJob", "train_values", "data_path", "dataset_files"]

# The loop options every training command has (compress.cli.common.fit_options), in CLI order.
FIT_OPTIONS = ("epochs", "batch_size", "img_size", "lr0", "optimizer", "warmup_epochs", "workers", "seed",
               "letterbox", "cache", "cache_dir", "mosaic", "sync_bn", "no_progress", "loss", "bn_momentum",
               "freeze_bn_stats", "bn_adapt")


def train_values(options: Mapping[str, Any]) -> dict[str, Any]:
    """TrainConfig keyword arguments from training options: unset (None) options are left to the defaults,
    negated flags become their field."""
    values = {}
    for name, value in options.items():
        if value is None:
            continue
        if name in NEGATED:
            values[NEGATED[name]] = not value
        else:
            values[name] = value
    return values


def dataset_files(data: Any, val: PathLike | None = None, sources: tuple[PathLike, ...] = ()) -> tuple[Path, ...]:
    """Every file a dataset argument makes a command read: the .data/data.yaml's lists and names, each image
    and its label file (`val` replaces the valid split as in `load_data_spec`; `sources`: images or image folders
    read besides, e.g. detect's --source). The guard protects them
    as inputs; a recipe's manifest fingerprints them. A dataset that does not load yields what is known: the
    command's own reader then stops with the error."""
    found: list[Path] = []
    path = data_path(data)
    if path is not None and Path(path).suffix == ".data" and Path(path).is_file():
        found += data_file_inputs(Path(path))
    try:
        spec = load_data_spec(data, val) if data is not None else None
    except (CompressError, OSError):
        spec = None
    images = list(dict.fromkeys([*(spec.train if spec else ()), *(spec.valid if spec else ()),
                                 *(img for s in sources for img in _images_of(Path(s)))]))
    if path is not None and Path(path).is_dir() and find_names(path) is not None:
        found.append(find_names(path))
    labels = [label_path(img) for img in images]
    return tuple(dict.fromkeys([*found, *images, *(p for p in labels if p.is_file())]))


def _images_of(source: Path) -> list[Path]:
    if source.is_dir():
        return list_images(source)
    return [source] if source.suffix.lower() in IMG_EXTS else []


def data_path(data: Any) -> PathLike | None:
    """A data argument that is a path (a DataSpec built in Python has no file to protect)."""
    return data if isinstance(data, (str, Path)) or hasattr(data, "__fspath__") else None


class TrainingJob(Job):
    """A job with `train: TrainConfig` built from `FIT_OPTIONS` + resume (subclasses add options). `train`
    None at construction: the TrainConfig the job builds without training options. Subclasses have the fields
    `cfg`, `weights` and `hyp` (the --hyp YAML)."""

    train_options: ClassVar[tuple[str, ...]] = FIT_OPTIONS + ("resume",)
    train_defaults: ClassVar[Mapping[str, Any]] = {}   # this command's defaults (the CLI shows the same)
    train_extra: ClassVar[Mapping[str, Any]] = {}      # fixed TrainConfig values that are no option

    def __post_init__(self) -> None:
        if self.train is None:
            object.__setattr__(self, "train", type(self).make_train(self._own_options(), {}, set()))

    def _own_options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "train"}

    @classmethod
    def train_default(cls, name: str) -> Any:
        """The default of training option `name` for this command (what the CLI shows)."""
        if name in NEGATED:
            return False
        return cls.train_defaults.get(name, getattr(TrainConfig, name))

    @classmethod
    def pretrained(cls, options: Mapping[str, Any]) -> bool:
        """The run starts from a trained model (the fine-tune defaults apply)."""
        return options.get("weights") is not None

    @classmethod
    def make_train(cls, options: Mapping[str, Any], train: Mapping[str, Any], given: set[str]) -> TrainConfig:
        values = {**cls.train_defaults, **train_values(train), **cls.train_extra}
        values.setdefault("img_size", read_cfg(options["cfg"]).width)  # default: the cfg's size
        explicit = set(given) | set(cls.train_extra)
        return resolve_train_config(values, explicit, options.get("hyp"), pretrained=cls.pretrained(options))

    def report(self, figures: Mapping[str, Any]) -> Report:
        """Every training report says what it trained with."""
        return Report(self.command, {**figures, "train_config": self.train.to_dict()})

    def resumes(self) -> bool:
        return self.train.resume

    def checkpoints(self) -> tuple[Path, ...]:
        return (TrainFiles(Path(self.out)).checkpoint,)   # `fit` writes it every epoch and on Ctrl-C

    def resumed(self) -> "TrainingJob":
        return dataclasses.replace(self, train=dataclasses.replace(self.train, resume=True))

    def train_argv_values(self) -> dict[str, Any]:
        plain = type(self).make_train(self._own_options(), {}, set())
        values = {}
        for name in self.train_options:
            field = NEGATED.get(name, name)
            mine, default = getattr(self.train, field), getattr(plain, field)
            if mine != default:
                values[name] = (not mine) if name in NEGATED else mine
        return values

    def fit_outputs(self, folder: PathLike) -> tuple[Output, ...]:
        """The files `fit` writes into `folder` (best/last pairs, last.pt, results): declared, so that no
        other output (--report) can be one of them."""
        files = TrainFiles(Path(folder))
        return tuple(Output(p, "file", "--out") for p in (*files.best, *files.last, files.checkpoint, *files.results))

    def cache_output(self) -> tuple[Output, ...]:
        cache = self.train.cache_dir
        return (Output(Path(cache), "dir", "--cache-dir"),) if cache else ()
