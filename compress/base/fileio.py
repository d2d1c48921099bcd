"""Atomic writes: outputs appear whole or not at all, and inputs are never overwritten.

Every writer goes through `atomic_write` (one file) or `atomic_files` (files that belong together, such as a
Darknet cfg + weights pair: all appear or none). A full disk, a file-size limit (`ulimit -f`), a quota or a
read-only mount ends in one `WriteError` naming the file, never a traceback; the temp files are removed.
Readers of user files call `require_regular` first: a FIFO would block the read forever and a device such as
/dev/zero would fill the memory.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Iterator

from compress.base.errors import CompressError, WriteError

__all__ = ["atomic_write", "atomic_files", "write_text_atomic", "write_bytes_atomic", "require_regular",
           "file_kind", "write_failure", "is_write_failure", "is_temp_name", "WRITE_ERRNOS"]

# errno values that mean "the disk (or a limit on it) refused the bytes", not a bug
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO})


PART = ".part"  # marks atomic_files' temps (atomic_write's end in .tmp)


def is_temp_name(name: str) -> bool:
    """A temp file of ours (left by a killed process): not an output, not an earlier run."""
    return name.startswith(".") and (name.endswith(".tmp") or PART in name)


def is_write_failure(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS


def write_failure(exc: OSError, path: str | os.PathLike | None = None) -> WriteError:
    """One line for a failed write: which file, what the system said, what to do."""
    where = path or exc.filename or "an output file"
    hint = {errno.EFBIG: "the file-size limit (ulimit -f) is too small for it",
            errno.EROFS: "the filesystem is read-only"}.get(exc.errno, "free some space (or choose an output on "
                                                                  "another disk)")
    return WriteError(f"cannot write {where}: {exc.strerror or exc}; {hint}; files of this step that were not "
                      f"complete were removed, so re-run it")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a short temp name: `path.name` may already be at the filesystem's name limit
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:16]}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _converted(exc, path) from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; outputs get the usual permissions
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if is_write_failure(exc):
            raise write_failure(exc, path) from None
        raise


def _converted(exc: OSError, path: Path) -> BaseException:
    return write_failure(exc, path) if is_write_failure(exc) else exc


@contextlib.contextmanager
def atomic_files(*paths: str | os.PathLike) -> Iterator[tuple[Path, ...]]:
    """Temp paths beside `paths` for the block to write; when it succeeds they are renamed over `paths` in the
    given order (put the file that marks the set complete last), otherwise all are removed: the set appears
    whole or not at all (e.g. no pruned .cfg without its .weights)."""
    targets = [Path(p) for p in paths]
    temps: list[Path] = []
    renamed: list[Path] = []
    try:
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            # the target's suffix kept: writers that check it (an ONNX exporter wants *.onnx) accept the temp
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name[:16]}.", suffix=f"{PART}{target.suffix[:16]}",
                                       dir=target.parent)
            os.close(fd)
            temps.append(Path(tmp))
            os.chmod(tmp, 0o666 & ~_umask())  # a writer may fill the temp in place: the usual permissions
        yield tuple(temps)
        for tmp in temps:
            if not tmp.is_file():
                raise FileNotFoundError(errno.ENOENT, "the writer left no file", str(tmp))
        for tmp, target in zip(temps, targets):
            os.replace(tmp, target)
            renamed.append(target)
    except BaseException as exc:
        # a rename that fails after others succeeded (next to impossible in one folder) takes them back out:
        # a half-replaced set must not look whole
        for tmp in temps + renamed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if is_write_failure(exc):  # a failed write() names no file: name the set
            where = _target_of(str(exc.filename), temps, targets) if exc.filename else \
                "one of " + ", ".join(str(t) for t in targets)
            raise write_failure(exc, where) from None
        if isinstance(exc, WriteError):  # a writer's own atomic_write failed on our temp: name the output
            raise WriteError(_target_of(str(exc), temps, targets)) from None
        raise


def _target_of(text: str, temps: list[Path], targets: list[Path]) -> str:
    """`text` with each temp path replaced by the output it stands for (messages name what the user asked for)."""
    for tmp, target in zip(temps, targets):
        text = text.replace(str(tmp), str(target))
    return text


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(text)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def file_kind(mode: int) -> str:
    """A stat mode in words, for messages."""
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def require_regular(path: str | os.PathLike, what: str = "", error: type[CompressError] = CompressError) -> Path:
    """`path` if it is a regular file (links followed); else `error` naming it: reading a FIFO blocks forever,
    a device such as /dev/zero never ends. A missing file passes (the caller's own message covers it)."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return path
    if not stat.S_ISREG(mode):
        label = f"{what} {path}" if what else str(path)
        raise error(f"{label}: is {file_kind(mode)}; only regular files are read; pass a file")
    return path
