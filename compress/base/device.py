"""Device specs: `auto` (CUDA when available, else CPU), `cpu`, `cuda`, `cuda:1`, `0`, `0,1`, `mps`.

A list of GPUs means one process per GPU (torchrun): each process takes the entry at its local rank.
Every failure is one DeviceError line naming the spec and the fix, raised before any work.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from compress.base.errors import DeviceError

__all__ = ["DeviceSpec", "parse_device", "resolve_device", "DEVICE_HELP"]

DEVICE_HELP = "auto (CUDA if available, else CPU), cpu, cuda, cuda:1, 0, 0,1 (one process per GPU: torchrun), mps"
_INDICES = re.compile(r"^(?:cuda:)?(\d+(?:\s*,\s*\d+)*)$")


@dataclass(frozen=True)
class DeviceSpec:
    kind: str                       # auto | cpu | cuda | mps
    indices: tuple[int, ...] = ()   # CUDA ordinals; () = the default / per-rank device


def parse_device(spec: str | torch.device | None) -> DeviceSpec:
    """Syntax only (nothing is probed): DeviceError for anything that is not a device spec."""
    if isinstance(spec, torch.device):
        return DeviceSpec(spec.type, () if spec.index is None else (spec.index,))
    text = (spec or "auto").strip().lower()
    if text in ("auto", "cpu", "cuda", "mps"):
        return DeviceSpec(text)
    match = _INDICES.match(text)
    if match:
        indices = tuple(int(i) for i in match.group(1).split(","))
        if len(set(indices)) != len(indices):
            raise DeviceError(f"--device {spec}: a GPU is listed twice; list each once, e.g. 0,1")
        return DeviceSpec("cuda", indices)
    raise DeviceError(f"--device {spec}: not a device; use {DEVICE_HELP}")


def resolve_device(spec: str | torch.device | None, local_rank: int | None = None) -> torch.device:
    """The torch.device for `spec` on this machine (local_rank: this process's rank under torchrun)."""
    parsed = parse_device(spec)
    kind = parsed.kind
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise DeviceError(f"--device {spec}: Apple MPS is not available here; use --device auto or cpu")
        return torch.device("mps")
    return torch.device("cuda", _cuda_index(spec, parsed.indices, local_rank))


def _cuda_index(spec: object, indices: tuple[int, ...], local_rank: int | None) -> int:
    if not torch.cuda.is_available():
        why = (f"this torch ({torch.__version__}) is built without CUDA" if not torch.backends.cuda.is_built()
               else "no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES)")
        raise DeviceError(f"--device {spec}: {why}; use --device cpu or auto")
    count = torch.cuda.device_count()
    bad = [i for i in indices if i >= count]
    if bad:
        raise DeviceError(f"--device {spec}: GPU {bad[0]} does not exist; this machine has {count} "
                          f"(0..{count - 1})")
    if not indices:
        return local_rank or 0
    if local_rank is None:
        if len(indices) > 1:
            raise DeviceError(f"--device {spec}: names {len(indices)} GPUs; run one process per GPU: "
                              f"torchrun --nproc_per_node {len(indices)} $(which yolo-compress) ...")
        return indices[0]
    if len(indices) == 1:
        return indices[0]
    if local_rank >= len(indices):
        raise DeviceError(f"--device {spec}: lists {len(indices)} GPUs but this is local rank {local_rank}; "
                          f"launch torchrun with --nproc_per_node {len(indices)}")
    return indices[local_rank]
