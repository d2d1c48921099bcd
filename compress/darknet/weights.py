"""Darknet `.weights` I/O: header (major, minor, revision, seen) then float32 tensors in layer order.

`seen` is int64 when major*10+minor >= 2 (and both < 1000), else int32, as Darknet decides. The float
count is checked against the cfg so a wrong cfg fails loudly instead of loading garbage. What each layer
stores is its module's `darknet_tensors()` (see each section's `weights` in `compress.darknet.sections`): convs
(unless `share_index`), weighted shortcuts, [se]/[cbam]/[eca].
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.base.errors import WeightsError
from compress.base.fileio import atomic_write, require_regular

__all__ = ["darknet_tensors", "count_darknet_floats", "read_weights", "write_weights", "read_header"]


def darknet_tensors(model: nn.Module, cutoff: int | None = None) -> list[tuple[int, torch.Tensor]]:
    """(layer index, tensor) in file order for layers [0, cutoff)."""
    out = []
    for i, layer in enumerate(model.layers):
        if cutoff is not None and i >= cutoff:
            break
        if hasattr(layer, "darknet_tensors"):
            out.extend((i, t) for t in layer.darknet_tensors())
    return out


def count_darknet_floats(model: nn.Module, cutoff: int | None = None) -> int:
    return sum(t.numel() for _, t in darknet_tensors(model, cutoff))


def _seen_is_64(major: int, minor: int) -> bool:
    return major * 10 + minor >= 2 and major < 1000 and minor < 1000


def read_header(fh) -> tuple[int, int, int, int]:
    raw = fh.read(12)
    if len(raw) < 12:
        raise WeightsError(f"{fh.name}: file is too short for a Darknet header ({len(raw)} bytes)")
    if all(32 <= b < 127 or b in (9, 10, 13) for b in raw):  # a Darknet header starts with small ints (0, 2, 5)
        raise WeightsError(f"{fh.name}: starts with text ({raw.decode('ascii')!r}), not a Darknet .weights "
                           "header; pass the binary .weights file as --weights (and the .cfg as --cfg)")
    major, minor, revision = (int(v) for v in np.frombuffer(raw, dtype="<i4"))
    width = 8 if _seen_is_64(major, minor) else 4
    seen_raw = fh.read(width)
    if len(seen_raw) < width:
        raise WeightsError(f"{fh.name}: file is too short for a Darknet header")
    seen = int(np.frombuffer(seen_raw, dtype="<i8" if width == 8 else "<i4")[0])
    return major, minor, revision, seen


def read_weights(path: str | os.PathLike, model: nn.Module, cutoff: int | None = None) -> tuple[int, int, int, int]:
    """Load Darknet weights into `model` (layers before `cutoff` only, if given). Returns the header."""
    path = require_regular(path, "--weights", WeightsError)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found; pass an existing --weights")
    with open(path, "rb") as fh:
        header = read_header(fh)
        payload = fh.read()
    if len(payload) % 4:
        raise WeightsError(f"{path}: {len(payload)} bytes after the header are not a whole number of float32 "
                           "values; not a Darknet .weights file, or a damaged one")
    data = np.frombuffer(payload, dtype="<f4")
    tensors = darknet_tensors(model, cutoff)
    expected = sum(t.numel() for _, t in tensors)
    if cutoff is None and data.size != expected:
        raise WeightsError(_mismatch(path, model, expected, data.size))
    if data.size < expected:
        raise WeightsError(f"{path}: has {data.size} floats but layers 0..{cutoff - 1} need {expected}; "
                           "the file is truncated or belongs to another cfg")
    pos = 0
    with torch.no_grad():
        for _, t in tensors:
            n = t.numel()
            t.copy_(torch.from_numpy(data[pos:pos + n].copy()).view_as(t))
            pos += n
    if hasattr(model, "header"):
        model.header = header
    return header


def _mismatch(path: Path, model: nn.Module, expected: int, found: int) -> str:
    cfg_name = getattr(getattr(model, "cfg", None), "path", None) or "the cfg"
    if found < expected:
        cause = "the file is truncated, or the cfg has more/wider layers than the network these weights came from"
    else:
        cause = "the cfg has fewer/narrower layers (e.g. fewer classes) than the network these weights came from"
    return (f"{path}: holds {found} floats but {cfg_name} needs {expected} ({found - expected:+d}); {cause}. "
            "Use the cfg the weights were trained with, or --cutoff N to load only the first N layers")


def write_weights(path: str | os.PathLike, model: nn.Module, header: tuple[int, int, int, int] | None = None) -> None:
    """Write all of `model`'s Darknet tensors (atomically). Keeps the model's header unless one is given."""
    major, minor, revision, seen = header or getattr(model, "header", (0, 2, 5, 0))
    with atomic_write(path, "wb") as fh:
        fh.write(np.array([major, minor, revision], dtype="<i4").tobytes())
        fh.write(np.array([seen], dtype="<i8" if _seen_is_64(major, minor) else "<i4").tobytes())
        for _, t in darknet_tensors(model):
            fh.write(t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes())
