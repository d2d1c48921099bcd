"""Memory available to this process, and the error for work that would not fit in it.

`eval --img-size 4096` on yolov3 needs tens of GB of activations; allocating them gets the process OOM-killed
with no message. Commands estimate what they need first (`darknet.memory`) and compare it with what is free
here: the smaller of the kernel's MemAvailable and the cgroup's remaining limit (a container's limit is not in
/proc/meminfo), or a GPU's free memory.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from compress.base.errors import CompressError

__all__ = ["MemoryLimitError", "available_memory", "device_free_memory"]


class MemoryLimitError(CompressError):
    """Work whose estimated memory exceeds what is available; the message gives both figures and a fix."""


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2, else v1), None without a limit."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        cap, used = _read_int(Path(limit)), _read_int(Path(usage))
        if cap is not None and cap < 1 << 60:  # v1 reports an absurd number for "unlimited"
            return max(0, cap - (used or 0))
    return None


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable, capped by the cgroup), 0 when unknown."""
    free = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if not free:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = 0
    room = _cgroup_room()
    return min(free, room) if free and room is not None else (free or room or 0)


def device_free_memory(device: str | torch.device) -> int:
    """Free bytes on `device`: a CUDA GPU's free memory, else the host's `available_memory()`; 0 when unknown."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except RuntimeError:
            return 0
    return available_memory()
