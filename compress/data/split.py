"""`data split`: a fixed hold-out split of one image set (COCO128 96/32 for issue 23's recipes).

The images are sorted by file name and every `every`-th one (index % every == 0) is held out, so the split is
the same on every machine and needs no seed. Writes `train.txt`, `valid.txt` (held out), `all.txt`, the class
names and two Darknet `.data` files: `split.data` (train on the rest, validate on the held-out images) and
`all.data` (all images in both, for the figures on the whole set).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from compress.base.errors import DataError
from compress.base.fileio import write_text_atomic
from compress.data.dataspec import load_data_spec

__all__ = ["SplitFiles", "holdout_split", "write_split"]


@dataclass(frozen=True)
class SplitFiles:
    """The files `write_split` writes into `folder` (named once, for the writer and the output guard)."""
    folder: Path

    @property
    def lists(self) -> tuple[Path, Path, Path]:
        return self.folder / "train.txt", self.folder / "valid.txt", self.folder / "all.txt"

    @property
    def names(self) -> Path:
        return self.folder / "split.names"

    @property
    def data(self) -> tuple[Path, Path]:
        return self.folder / "split.data", self.folder / "all.data"

    def all(self) -> tuple[Path, ...]:
        return (*self.lists, self.names, *self.data)


def holdout_split(images: Sequence[str | os.PathLike], every: int = 4) -> tuple[list[Path], list[Path]]:
    """(train, held out): `images` sorted by file name, index % every == 0 held out."""
    if every < 2:
        raise DataError(f"--holdout-every {every} must be >= 2 (every N-th image is held out)")
    ordered = sorted((Path(p) for p in images), key=lambda p: (p.name, str(p)))
    return ([p for i, p in enumerate(ordered) if i % every], [p for i, p in enumerate(ordered) if i % every == 0])


def write_split(source: str | os.PathLike, out: str | os.PathLike, every: int = 4) -> dict:
    """Split the training images of `source` (a folder, .data or data.yaml) into `SplitFiles(out)`; returns
    the report figures."""
    spec = load_data_spec(source)
    train, held = holdout_split(spec.train, every)
    if not train or not held:
        raise DataError(f"{source}: {len(spec.train)} images cannot be split with --holdout-every {every}; "
                        "pass a folder with more images")
    files = SplitFiles(Path(out))
    for path, items in zip(files.lists, (train, held, sorted(train + held))):
        write_text_atomic(path, "".join(f"{p.resolve()}\n" for p in items))
    write_text_atomic(files.names, "".join(f"{n}\n" for n in spec.names))
    for path, (tr, va) in zip(files.data, ((files.lists[0], files.lists[1]), (files.lists[2], files.lists[2]))):
        write_text_atomic(path, f"classes={spec.nc}\ntrain={tr.resolve()}\nvalid={va.resolve()}\n"
                                f"names={files.names.resolve()}\n")
    return {"data": str(files.data[0]), "data_all": str(files.data[1]), "n_train": len(train),
            "n_valid": len(held), "holdout_every": every, "classes": spec.nc, "source": str(source)}
