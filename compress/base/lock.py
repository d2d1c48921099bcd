"""One writer per output folder: a lock file (`OUT/.yolo-compress.lock`, created with O_EXCL, holding the pid
and host) that the writing process keeps flock'ed while it runs.

A second process on the same folder is refused with one line naming the holder. A lock left by a process that
died (SIGKILL, power loss) is stale: the kernel dropped its flock, so the next run takes the folder over without
asking anyone to delete files. Re-entrant within one process (a recipe holds its run folder while its steps
lock their own folders, or the same one).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from compress.base.errors import GuardError

__all__ = ["LOCK_NAME", "output_lock", "busy"]

LOCK_NAME = ".yolo-compress.lock"
_FRESH_S = 5.0   # an empty lock younger than this is being written by its creator, not stale
_HELD: dict[Path, list] = {}   # real lock path -> [fd, depth]


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike | None, option: str = "--out") -> Iterator[None]:
    """Hold `folder`'s lock for the block (None: no folder, no lock); GuardError when another live process
    holds it. The folder is created if missing (the command would create it anyway)."""
    if folder is None:
        yield
        return
    path = Path(os.path.realpath(folder)) / LOCK_NAME
    created = not path.parent.exists()
    if path in _HELD:
        _HELD[path][1] += 1
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        _HELD[path] = [_acquire(path, Path(folder), option), 1]
    try:
        yield
    finally:
        _HELD[path][1] -= 1
        if not _HELD[path][1]:
            fd = _HELD.pop(path)[0]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # before closing: nobody can take the old inode over in between
            os.close(fd)
            if created:  # a run that failed before writing leaves no empty folder behind
                with contextlib.suppress(OSError):
                    path.parent.rmdir()


def busy(folder: str | os.PathLike, option: str = "--out") -> str | None:
    """Why `folder` is in use by another live process (its lock is flock'ed), or None."""
    path = Path(os.path.realpath(folder)) / LOCK_NAME
    if path in _HELD:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _busy(path, Path(folder), option)
    finally:
        os.close(fd)  # closing drops a shared flock we may have taken
    return None


def _acquire(path: Path, folder: Path, option: str) -> int:
    for _ in range(3):  # a stale lock removed by us (or a racing process) is tried again
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _take_over_stale(path, folder, option)
            continue
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # new inode: nobody else holds it
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        return fd
    raise GuardError(f"{option} {folder}: could not take the folder's lock {path}; another process keeps "
                     f"replacing it; wait for it to finish or choose another {option}")


def _take_over_stale(path: Path, folder: Path, option: str) -> None:
    """Remove `path` if its holder is gone (its flock was released); else refuse, naming the holder."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return  # released meanwhile
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GuardError(_busy(path, folder, option)) from None
        holder = os.read(fd, 200).decode(errors="replace").split()
        if not holder and time.time() - os.fstat(fd).st_mtime < _FRESH_S:
            raise GuardError(_busy(path, folder, option))  # its creator is writing its pid right now
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                os.unlink(path)  # stale: the process that wrote it died without removing it
    finally:
        os.close(fd)


def _busy(path: Path, folder: Path, option: str) -> str:
    with contextlib.suppress(OSError):
        holder = path.read_text().split()
        if holder:
            who = f"pid {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "")
            return (f"{option} {folder}: another yolo-compress run ({who}) is writing into this folder; wait for "
                    f"it to finish or choose another {option}")
    return (f"{option} {folder}: another yolo-compress run is writing into this folder; wait for it to finish "
            f"or choose another {option}")
