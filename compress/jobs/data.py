"""Dataset jobs: `data synth`, `data convert` and `data split`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Mapping

from compress.base.checks import SEED, check_img_size, check_range
from compress.base.errors import DataError
from compress.base.guard import Output
from compress.data.convert import ConvertConfig, convert
from compress.data.split import SplitFiles, write_split
from compress.data.synth import SYNTH_NAMES, synthesize
from compress.train.config import DistConfig
from compress.jobs.base import Job, PathLike, Report, paths, register_job

__all__ = ["SynthJob", "ConvertJob", "SplitJob"]


@register_job
@dataclass(frozen=True)
class SynthJob(Job):
    """A deterministic synthetic dataset (circle, square, triangle) in `out`."""

    command: ClassVar[str] = "data synth"

    out: PathLike
    n_train: int = 192
    n_valid: int = 48
    img_size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("--n-train", self.n_train, 1, error=DataError)
        check_range("--n-valid", self.n_valid, 1, error=DataError)
        check_img_size(self.img_size, error=DataError)
        check_range("--seed", self.seed, *SEED, error=DataError)

    def outputs(self) -> tuple[Output, ...]:
        return (Output(Path(self.out), "dir", "--out"),)

    def out_dir(self) -> Path:
        return Path(self.out)

    def run(self, dist: DistConfig | None = None) -> Report:
        data = synthesize(self.out, n_train=self.n_train, n_valid=self.n_valid, img_size=self.img_size,
                          seed=self.seed)
        return self.report({"data": str(data), "n_train": self.n_train, "n_valid": self.n_valid,
                            "img_size": self.img_size, "seed": self.seed, "names": list(SYNTH_NAMES)})


@register_job
@dataclass(frozen=True)
class ConvertJob(Job):
    """A COCO json or Pascal VOC dataset (`source` = --from coco|voc) as images/ + labels/ + a .data file."""

    command: ClassVar[str] = "data convert"
    flags: ClassVar[Mapping[str, str]] = {"source": "--from"}

    source: str
    src: PathLike
    out: PathLike
    split: str = "train"
    images: PathLike | None = None
    names: PathLike | None = None
    copy: bool = False

    def __post_init__(self) -> None:
        self.convert_config()

    def convert_config(self) -> ConvertConfig:
        return ConvertConfig(self.source, Path(self.src), Path(self.out), self.split,
                             Path(self.images) if self.images else None, Path(self.names) if self.names else None,
                             self.copy)

    def inputs(self) -> tuple[Path, ...]:
        return paths(self.src, self.images, self.names)

    def outputs(self) -> tuple[Output, ...]:
        return (Output(Path(self.out), "dir", "--out"),)

    def out_dir(self) -> Path:
        return Path(self.out)

    def run(self, dist: DistConfig | None = None) -> Report:
        return self.report(convert(self.convert_config()).to_dict())


@register_job
@dataclass(frozen=True)
class SplitJob(Job):
    """A fixed hold-out split of `data`'s training images (sorted by name, index % holdout_every == 0 held
    out) as list files and `split.data` / `all.data` in `out`."""

    command: ClassVar[str] = "data split"

    data: PathLike
    out: PathLike
    holdout_every: int = 4

    def __post_init__(self) -> None:
        check_range("--holdout-every", self.holdout_every, 2, error=DataError)

    def inputs(self) -> tuple[Path, ...]:
        return paths(self.data)

    def outputs(self) -> tuple[Output, ...]:
        return (Output(Path(self.out), "dir", "--out"),
                *(Output(p, "file", "--out") for p in SplitFiles(Path(self.out)).all()))

    def out_dir(self) -> Path:
        return Path(self.out)

    def run(self, dist: DistConfig | None = None) -> Report:
        return self.report(write_split(self.data, self.out, self.holdout_every))
