"""The output guard: every command checks its outputs against its inputs and the filesystem before any work.

One rule set for all commands (the CLI applies it to every command from its click parameters; the recipe
runner applies it to its run folder):
- no output is an input (paths compared after resolving links, hard links included), no output folder holds
  an input file (unless resuming), no output folder is an input folder, no output file lies in an input folder;
- every output's folder exists or can be created and is writable (probed with a real temp file: permission
  bits say nothing for root or read-only mounts);
- files are not folders and folders are not files; names and paths fit the filesystem's limits;
- an existing, non-empty output folder (an earlier run) is refused unless the job resumes it or says exist_ok.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

from compress.base.errors import GuardError

__all__ = ["GuardError", "Output", "JobPaths", "check_job_paths", "data_file_inputs", "outputs_from"]

OutputKind = Literal["file", "dir", "any"]
DIR_MARGIN = 64        # characters reserved for the names a command writes inside an output folder
NAME_MAX, PATH_MAX = 255, 4096  # fallbacks where pathconf is unavailable


@dataclass(frozen=True)
class Output:
    path: Path
    kind: OutputKind = "file"
    option: str = "--out"           # how the user named it, for the message


@dataclass(frozen=True)
class JobPaths:
    """A job's declared files. `resume`: the job continues the run in its output folder; `exist_ok`: the user
    accepts writing into a non-empty folder; `resume_marker`: a file whose presence makes an existing folder
    this job's own resumable run (e.g. a recipe's manifest.json)."""

    inputs: tuple[Path, ...] = ()
    outputs: tuple[Output, ...] = ()
    resume: bool = False
    exist_ok: bool = False
    resume_marker: str | None = None
    check_existing: bool = True     # False on torchrun ranks > 0 (rank 0 may already be writing)


def check_job_paths(job: JobPaths) -> None:
    """Raise GuardError (naming the option and the fix) on the first unsafe output; write nothing lasting."""
    inputs = [Path(p) for p in job.inputs]
    for p in list(inputs):
        if p.suffix == ".data" and p.is_file():
            inputs += data_file_inputs(p)
    files = [_real(p) for p in inputs if p.is_file()]
    dirs = [_real(p) for p in inputs if p.is_dir()]
    _check_distinct(job.outputs)
    for out in job.outputs:
        _check_limits(out)  # first: stat() of an over-long name fails
        _check_shape(out)
        _check_not_input(out, files, dirs, job.resume)
        _check_writable(out)
        if out.kind == "dir" and job.check_existing:
            _check_existing(out, job)


def data_file_inputs(path: Path) -> list[Path]:
    """Files named in a Darknet `.data` (train/valid lists, names), relative to the cwd or the .data folder."""
    found = []
    with contextlib.suppress(OSError, UnicodeDecodeError):
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            value = value.strip()
            if sep and value and key.strip() in ("train", "valid", "test", "names"):
                found += [c for c in (Path(value), path.parent / value) if c.is_file()]
    return found


def _real(p: Path) -> Path:
    return Path(os.path.realpath(p))


def _same(a: Path, b: Path) -> bool:
    if _real(a) == _real(b):
        return True
    with contextlib.suppress(OSError):
        return a.exists() and b.exists() and os.path.samefile(a, b)  # hard links
    return False


def _inside(child: Path, folder: Path) -> bool:
    return folder == child or folder in child.parents


def _check_not_input(out: Output, files: list[Path], dirs: list[Path], resume: bool) -> None:
    target = _real(out.path)
    for f in files:
        if _same(out.path, f):
            raise GuardError(f"{out.option} {out.path}: is an input of this command ({f}); writing it would destroy "
                             f"the input; choose another {out.option}")
        if out.kind != "file" and _inside(f, target) and not resume:
            raise GuardError(f"{out.option} {out.path}: the folder holds the input {f}, which the outputs could "
                             f"replace; choose a new {out.option} (or copy the input elsewhere)")
    for d in dirs:
        if target == d:
            raise GuardError(f"{out.option} {out.path}: is an input folder of this command; writing into it would "
                             f"mix outputs with (or replace) the inputs; choose another {out.option}")
        if out.kind == "file" and _inside(target, d) and target.exists():
            raise GuardError(f"{out.option} {out.path}: exists inside the input folder {d}; writing it would replace "
                             f"an input file; choose another {out.option}")


def _check_shape(out: Output) -> None:
    p = out.path
    if out.kind == "file" and (p.is_dir() or str(p).endswith(os.sep)):
        raise GuardError(f"{out.option} {p}: is a folder, but a file name is expected (e.g. {p / 'report.json'})")
    if out.kind == "dir" and p.exists() and not p.is_dir():
        raise GuardError(f"{out.option} {p}: is a file, but a folder is expected; choose a folder name")
    parent = _existing_ancestor(p if out.kind == "dir" else p.parent)  # "any": an existing file is fine
    if parent is not None and not parent.is_dir():
        raise GuardError(f"{out.option} {p}: {parent} is a file, so nothing can be created under it; choose "
                         f"another {out.option}")


def _existing_ancestor(p: Path) -> Path | None:
    p = Path(os.path.abspath(p))
    for candidate in (p, *p.parents):
        try:
            os.stat(candidate)
            return candidate
        except OSError:  # missing, or a name the filesystem cannot even look up (too long)
            continue
    return None


def _check_distinct(outputs: tuple[Output, ...]) -> None:
    """A file output must not be (or contain) another output folder."""
    folders = [(o, _real(o.path)) for o in outputs if o.kind == "dir"]
    for out in outputs:
        if out.kind == "file":
            for folder, real in folders:
                if _real(out.path) == real:
                    raise GuardError(f"{out.option} {out.path}: is the {folder.option} folder; name a file, e.g. "
                                     f"{out.path / 'report.json'}")


def _limit(folder: Path | None, name: str, fallback: int) -> int:
    try:
        return os.pathconf(folder or "/", name)
    except (OSError, ValueError):
        return fallback


def _check_limits(out: Output) -> None:
    absolute = Path(os.path.abspath(out.path))
    folder = _existing_ancestor(absolute.parent)
    name_max = _limit(folder, "PC_NAME_MAX", NAME_MAX)
    path_max = _limit(folder, "PC_PATH_MAX", PATH_MAX)
    for part in absolute.parts:
        if len(os.fsencode(part)) > name_max:
            raise GuardError(f"{out.option}: the name {part[:40]}... is {len(os.fsencode(part))} bytes; this "
                             f"filesystem allows {name_max}; choose a shorter name")
    margin = DIR_MARGIN if out.kind != "file" else 0
    if len(os.fsencode(str(absolute))) + margin >= path_max:
        raise GuardError(f"{out.option}: the path is {len(os.fsencode(str(absolute)))} bytes; this filesystem "
                         f"allows {path_max - 1}{' less room for the files inside' if margin else ''}; "
                         f"choose a shorter path")


def _check_writable(out: Output) -> None:
    folder = _existing_ancestor(out.path if out.kind == "dir" else out.path.parent)
    if folder is None:
        raise GuardError(f"{out.option} {out.path}: no existing folder above it; check the path")
    try:  # a real probe: permission bits are not enough (root, read-only mounts, ACLs)
        fd, probe = tempfile.mkstemp(prefix=".yc-probe-", dir=folder)
    except OSError as exc:
        raise GuardError(f"{out.option} {out.path}: cannot write in {folder} ({exc.strerror}); choose a writable "
                         f"{out.option}") from None
    os.close(fd)
    os.unlink(probe)


def _check_existing(out: Output, job: JobPaths) -> None:
    p = out.path
    if job.resume or job.exist_ok or not p.is_dir():
        return
    entries = [e.name for e in os.scandir(p)]
    if not entries or (job.resume_marker and job.resume_marker in entries):
        return
    shown = ", ".join(sorted(entries)[:4]) + (", ..." if len(entries) > 4 else "")
    raise GuardError(f"{out.option} {p}: the folder already holds an earlier run ({shown}); pass --resume to "
                     f"continue it (where the command has it), --exist-ok to write into it anyway, or choose a "
                     f"new {out.option}")


def outputs_from(pairs: Iterable[tuple[str, str | os.PathLike | None, OutputKind]]) -> tuple[Output, ...]:
    """(option, path, kind) triples -> Outputs, skipping options that were not given."""
    return tuple(Output(Path(p), kind, opt) for opt, p, kind in pairs if p)
