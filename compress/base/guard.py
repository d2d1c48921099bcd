"""The output guard: every command checks its outputs against its inputs and the filesystem before any work.

One rule set for all commands (the CLI applies it to every command from its click parameters; the recipe
runner applies it to its run folder):
- inputs are regular files or folders (a FIFO blocks its reader, /dev/zero never ends); the dataset's files
  (images, labels, lists, names) are inputs like the cfg;
- no output is an input (the same inode: links and hard links included), no output folder holds an input file
  (unless resuming), no output folder is an input folder or lies in a folder of the dataset's images, no output
  file lies in an input folder; no two options name one path;
- outputs are regular files or new paths: a device node, FIFO or socket is never replaced;
- every output's folder exists or can be created and is writable (probed with a real temp file: permission
  bits say nothing for root or read-only mounts);
- files are not folders and folders are not files; names and paths fit the filesystem's limits;
- an existing, non-empty output folder (an earlier run) is refused unless the job resumes it or says exist_ok;
  what a run leaves before any result (the image cache, the lock, temp files) is no earlier run; a folder that
  another live process holds (compress.base.lock) is refused even then.
"""
from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

from compress.base.errors import GuardError
from compress.base.fileio import file_kind, is_temp_name
from compress.base.lock import LOCK_NAME, busy

__all__ = ["GuardError", "Output", "JobPaths", "check_job_paths", "data_file_inputs", "outputs_from"]

OutputKind = Literal["file", "dir", "any"]
CACHE_DIR = "cache"     # the training image cache's default folder inside --out
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
    data_dirs: tuple[Path, ...] = ()  # folders of the dataset's images: no output folder in them


def check_job_paths(job: JobPaths) -> None:
    """Raise GuardError (naming the option and the fix) on the first unsafe output; write nothing lasting."""
    inputs = [p if isinstance(p, Path) else Path(p) for p in job.inputs]  # Path(Path) parses again: 40k images
    for p in list(inputs):
        if p.suffix == ".data" and p.is_file():
            inputs += data_file_inputs(p)
    known = _InputIndex(inputs)
    _check_distinct(job.outputs)
    for out in job.outputs:
        _check_limits(out)  # first: stat() of an over-long name fails
        _check_shape(out)
        _check_not_input(out, known, job.resume)
        _check_not_in_data(out, [_real(d) for d in job.data_dirs])
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


class _InputIndex:
    """The inputs, indexed once (a dataset is thousands of files): identities of the files (device, inode:
    links and hard links included), the real folders holding them, and the input folders. Refuses an input
    that is neither a regular file nor a folder (a FIFO blocks the reader, /dev/zero never ends)."""

    def __init__(self, inputs: list[Path]) -> None:
        self.ids: dict[tuple[int, int], Path] = {}
        self.homes: dict[Path, Path] = {}      # real folder holding input files -> one of those files
        self.dirs: list[Path] = []
        real_parent: dict[str, Path] = {}
        for p in inputs:  # plain os calls on strings: pathlib's parsing costs more than the stat itself
            name = os.fspath(p)
            try:
                st = os.lstat(name)
                link = stat.S_ISLNK(st.st_mode)
                st = os.stat(name) if link else st
            except OSError:
                continue  # missing: the command's own reader says so
            if stat.S_ISDIR(st.st_mode):
                self.dirs.append(_real(p))
                continue
            if not stat.S_ISREG(st.st_mode):
                raise GuardError(f"{p}: an input of this command is {file_kind(st.st_mode)}; only regular files "
                                 f"are read (a FIFO would block, a device never ends); pass a regular file")
            self.ids.setdefault((st.st_dev, st.st_ino), p)
            parent = os.path.dirname(name) or "."
            if parent not in real_parent:
                real_parent[parent] = _real(Path(parent))
                self.homes.setdefault(real_parent[parent], p)
            if link:
                self.homes.setdefault(_real(p).parent, p)

    def same_file(self, path: Path) -> Path | None:
        try:
            st = os.stat(path)
        except OSError:
            return None  # a new path cannot be an existing input
        return self.ids.get((st.st_dev, st.st_ino))


def _real(p: Path) -> Path:
    return Path(os.path.realpath(p))


def _inside(child: Path, folder: Path) -> bool:
    return folder == child or folder in child.parents


def _check_not_input(out: Output, known: _InputIndex, resume: bool) -> None:
    target = _real(out.path)
    same = known.same_file(out.path)
    if same is not None:
        raise GuardError(f"{out.option} {out.path}: is an input of this command ({same}); writing it would "
                         f"destroy the input; choose another {out.option}")
    for d in known.dirs:
        if target == d:
            raise GuardError(f"{out.option} {out.path}: is an input folder of this command; writing into it would "
                             f"mix outputs with (or replace) the inputs; choose another {out.option}")
        if out.kind == "file" and _inside(target, d) and target.exists():
            raise GuardError(f"{out.option} {out.path}: exists inside the input folder {d}; writing it would replace "
                             f"an input file; choose another {out.option}")
    if out.kind != "file" and not resume:
        for home, f in known.homes.items():
            if _inside(home, target):
                raise GuardError(f"{out.option} {out.path}: the folder holds the input {f}, which the outputs "
                                 f"could replace; choose a new {out.option} (or copy the input elsewhere)")


def _check_not_in_data(out: Output, data_dirs: list[Path]) -> None:
    """No output folder in (or equal to) a folder of the dataset's images: files written there would be taken
    for data (an image folder is read recursively) or replace it."""
    if out.kind == "file":
        return
    target = _real(out.path)
    for d in data_dirs:
        if _inside(target, d):
            raise GuardError(f"{out.option} {out.path}: lies in the image folder {d} of the dataset; files "
                             f"written there would mix with the data; choose a folder outside the dataset")


def _check_shape(out: Output) -> None:
    p = out.path
    with contextlib.suppress(OSError):
        mode = os.stat(p).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # e.g. /dev/null, /dev/full, a FIFO
            raise GuardError(f"{out.option} {p}: is {file_kind(mode)}; outputs are regular files or new paths "
                             f"(writing would replace the node); choose another {out.option}")
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
    """A file output must not be (or contain) another output folder; two options never name one file."""
    folders = [(o, _real(o.path)) for o in outputs if o.kind == "dir"]
    seen: dict[Path, Output] = {}
    for out in outputs:
        if out.kind == "file":
            for folder, real in folders:
                if _real(out.path) == real:
                    raise GuardError(f"{out.option} {out.path}: is the {folder.option} folder; name a file, e.g. "
                                     f"{out.path / 'report.json'}")
        other = seen.setdefault(_real(out.path), out)
        if other.option != out.option:
            raise GuardError(f"{out.option} {out.path}: is also {other.option} {other.path}; one would overwrite "
                             f"the other; give each output its own path")


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
    if not p.is_dir():
        return
    in_use = busy(p, out.option)
    if in_use:
        raise GuardError(in_use)
    if job.resume or job.exist_ok:
        return
    entries = [e.name for e in os.scandir(p) if not _left_by_a_failed_start(e)]
    if not entries or (job.resume_marker and job.resume_marker in entries):
        return
    shown = ", ".join(sorted(entries)[:4]) + (", ..." if len(entries) > 4 else "")
    raise GuardError(f"{out.option} {p}: the folder already holds an earlier run ({shown}); pass --resume to "
                     f"continue it (training commands, when it holds last.pt), --exist-ok to write into it anyway, "
                     f"or choose a new {out.option}")


def _left_by_a_failed_start(entry: os.DirEntry) -> bool:
    """What a run leaves before it has a result, so a retry need not --exist-ok: the image cache (OUT/cache),
    a lock and temp files. An earlier run is anything else (a report, a checkpoint, a model)."""
    name = entry.name
    return (name == CACHE_DIR and entry.is_dir()) or name == LOCK_NAME or is_temp_name(name)


def outputs_from(pairs: Iterable[tuple[str, str | os.PathLike | None, OutputKind]]) -> tuple[Output, ...]:
    """(option, path, kind) triples -> Outputs, skipping options that were not given."""
    return tuple(Output(Path(p), kind, opt) for opt, p, kind in pairs if p)
