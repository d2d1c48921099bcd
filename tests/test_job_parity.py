"""A job refuses every value its click command refuses (recipes and Python build jobs without click).

Walks `compress.cli.cli` (groups included): for each option typed IntRange/FloatRange/Choice, the values just
outside the range (and a non-choice) given to `JOBS[command].from_dict` raise a CompressError -- a traceback of any
other type fails -- and the in-range boundaries (and every choice) are accepted."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator

import click
import pytest

from compress.base.checks import check_choice, check_range
from compress.base.errors import CompressError, DataError
from compress.cli import cli
from compress.jobs import CLI_ONLY, JOBS

CFG = "tests/data/tiny-shortcut.cfg"
# Minimal values of the required fields; none of them is read at construction but the cfg (its width) and the
# COCO json of `data convert` (made by the fixture).
REQUIRED = {"cfg": CFG, "t_cfg": CFG, "weights": "/x.weights", "t_weights": "/t.weights", "data": "/x.data",
            "out": "/o", "source": "/s", "recipe": "/r.yaml"}
# A value accepted alone may need another option to build (a cross-option rule click does not see either).
COMPANIONS = {("quantize", "method", "dorefa"): {"reduce_range": False}}  # DoReFa 8-bit codes need --full-range
# options that only mean something together with another (any value): sparse-train's fade plan needs --sparsity fade
COMPANIONS.update({("sparse-train", p, "*"): {"sparsity": "fade"}
                   for p in ("method", "percent", "round_to", "layer_keep", "target_flops", "target_params", "fade_end",
                             "importance")})


def commands(group: click.Group = cli, prefix: str = "") -> Iterator[tuple[str, click.Command]]:
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, f"{prefix}{name} ")
        else:
            yield prefix + name, command


def typed_options() -> Iterator[tuple[str, click.Option]]:
    for name, command in commands():
        for param in command.params:
            if isinstance(param, click.Option) and param.name not in CLI_ONLY and \
                    isinstance(param.type, (click.IntRange, click.FloatRange, click.Choice)):
                yield name, param


OPTIONS = list(typed_options())
IDS = [f"{name}--{param.name}" for name, param in OPTIONS]


def as_field(value: Any, name: str, option: str) -> Any:
    """A choice as the job's field holds it (`distill --kd` takes "1".."5", field `kd` is an int)."""
    return int(value) if JOBS[name].option_types()[option] is int else value


def outside(t: click.ParamType) -> list[Any]:
    """Values click refuses: just past each bound (an open bound itself), the next multiple of 32 past an upper
    int bound (a multiple-of-32 rule must not be the only thing refusing 4097), a non-choice (for int choices
    also one past the largest)."""
    if isinstance(t, click.Choice):
        numbers = [int(c) for c in t.choices if str(c).isdigit()]
        return ["not-a-choice"] + ([max(numbers) + 1] if len(numbers) == len(t.choices) else [])
    values = []
    if isinstance(t, click.IntRange):
        if t.min is not None:
            values.append(t.min - 1)
        if t.max is not None:
            values += [t.max + 1, t.max // 32 * 32 + 32]
    else:
        if t.min is not None:
            values.append(t.min if t.min_open else t.min - 0.5)
        if t.max is not None:
            values.append(t.max if t.max_open else t.max + 0.5)
    return values


def inside(t: click.ParamType) -> list[Any]:
    """Values click accepts: the closed bounds (just inside an open one), every choice."""
    if isinstance(t, click.Choice):
        return list(t.choices)
    step = 1 if isinstance(t, click.IntRange) else 1e-3
    return [b + (step if b_open else 0) * sign for b, b_open, sign in
            ((t.min, t.min_open, 1), (t.max, t.max_open, -1)) if b is not None]


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("parity") / "instances.json"
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    return path


def required(command: str, coco: Path) -> dict[str, Any]:
    job = JOBS[command]
    names = {f.name for f in dataclasses.fields(job)
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    values = {k: v for k, v in REQUIRED.items() if k in names}
    if command == "data convert":
        values.update(source="coco", src=str(coco))
    return values


def test_every_command_has_a_job_and_its_typed_options_are_fields(coco):
    assert OPTIONS, "no typed option found: the walk is broken"
    for name, _ in commands():
        assert name in JOBS, f"`{name}` has no job"
        JOBS[name].from_dict(required(name, coco))   # the minimal job builds
    for name, param in OPTIONS:
        assert param.name in JOBS[name].option_types(), f"{name} --{param.name} is no job option"


@pytest.mark.parametrize("name, param", OPTIONS, ids=IDS)
def test_a_value_click_refuses_is_refused_by_the_job(name, param, coco):
    base = required(name, coco)
    for value in outside(param.type):
        try:
            JOBS[name].from_dict({**base, param.name: value})
        except CompressError as exc:
            assert "\n" not in str(exc), str(exc)  # one clean line
            continue
        pytest.fail(f"{name}: {param.opts[0]} {value!r} is refused by click but accepted by the job")


@pytest.mark.parametrize("name, param", OPTIONS, ids=IDS)
def test_a_value_click_accepts_at_the_bounds_is_accepted(name, param, coco):
    base = required(name, coco)
    for value in inside(param.type):
        if isinstance(param.type, click.Choice):
            value = as_field(value, name, param.name)
        companions = COMPANIONS.get((name, param.name, value)) or COMPANIONS.get((name, param.name, "*"), {})
        JOBS[name].from_dict({**base, **companions, param.name: value})


def test_messages_name_the_option_and_the_range():
    with pytest.raises(DataError, match=r"^--img-size 31 is out of range; use a value in \[32, 4096\]$"):
        check_range("--img-size", 31, 32, 4096, error=DataError)
    with pytest.raises(CompressError, match=r"--lr0 0 is out of range; use a value > 0$"):
        check_range("--lr0", 0, 0, lo_open=True)
    with pytest.raises(CompressError, match=r"--percent 1.0 .* in \[0, 1\)$"):
        check_range("--percent", 1.0, 0, 1, hi_open=True)
    with pytest.raises(CompressError, match=r"--cache 'tape' is not a choice; use one of ram, disk$"):
        check_choice("--cache", "tape", ("ram", "disk"))
    check_range("--cutoff", None, 1)
    check_choice("--cache", None, ("ram", "disk"))


def test_the_job_message_names_the_cli_option(coco):
    for name, option, value in (("detect", "img_size", 4097), ("export", "iou_thres", 1.5), ("info", "cutoff", 0),
                                ("train", "cache", "tape"), ("quantize", "lr0", 0), ("anchors", "img_size", 31)):
        flag = "--" + option.replace("_", "-")
        with pytest.raises(CompressError, match=flag):
            JOBS[name].from_dict({**required(name, coco), option: value})
