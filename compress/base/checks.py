"""Range and choice checks with the CLI's rules, for configs and jobs built without click (recipes, Python).

A value click refuses (IntRange, FloatRange, Choice) must be refused the same way by the job a recipe builds, so
each check names the CLI option and what it takes: `--img-size 31 is out of range; use a value in [32, 4096]`.
"""
from __future__ import annotations

from typing import Any, Collection

from compress.base.errors import CompressError

__all__ = ["IMG_SIZE", "SEED", "check_range", "check_choice", "check_img_size", "describe_range"]

# The bounds of every --img-size that has both (click.IntRange(32, 4096)): the smallest input with a stride-32
# cell, and a cap that keeps a typo (41600) from allocating a huge tensor.
IMG_SIZE = (32, 4096)
# Every --seed (click.IntRange(*SEED)): torch's generators take a signed 64-bit seed, numpy's a non-negative one.
SEED = (0, 2 ** 63 - 1)


def describe_range(lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False) -> str:
    """The allowed values as the message says them: `in [32, 4096]`, `in (0, 1)`, `>= 1`, `> 0`, `<= 8`."""
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return "of any size"


def check_range(option: str, value: float | None, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False, error: type[CompressError] = CompressError) -> None:
    """Raise `error` unless `value` lies in the interval (click.IntRange/FloatRange's bounds); None passes (an
    option left unset)."""
    if value is None:
        return
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if below or above:
        raise error(f"{option} {value} is out of range; use a value {describe_range(lo, hi, lo_open, hi_open)}")


def check_choice(option: str, value: Any, choices: Collection[Any], *,
                 error: type[CompressError] = CompressError) -> None:
    """Raise `error` unless `value` is one of `choices` (click.Choice); None passes (an option left unset)."""
    if value is not None and value not in choices:
        raise error(f"{option} {value!r} is not a choice; use one of {', '.join(map(str, choices))}")


def check_img_size(value: int | None, *, multiple_of: int | None = None,
                   error: type[CompressError] = CompressError) -> None:
    """--img-size: within IMG_SIZE (click.IntRange(32, 4096)) and, where the network's strides need it, a
    multiple of `multiple_of`; None passes (the cfg's size)."""
    check_range("--img-size", value, *IMG_SIZE, error=error)
    if value is not None and multiple_of and value % multiple_of:
        raise error(f"--img-size {value} must be a multiple of {multiple_of}, e.g. 416")
