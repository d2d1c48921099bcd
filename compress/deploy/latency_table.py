"""Per-layer latency tables: what one conv costs on one runtime at a few widths, kept in a JSON file.

A `LatencyTable` belongs to one `TableKey`: the machine (CPU model and the ISA flags that pick the kernels), the
runtime and its version, the thread count, the input size and the model's structure (a fingerprint of its
blocks, so the sparse-trained and the original weights of one cfg share a table). For each conv it holds the
median ms measured on a small grid of (input channels, output channels); `LayerTiming.at` interpolates
bilinearly between the grid points (linearly beyond them), on the grid made monotone in both widths, so that
measurement noise never makes a narrower layer look slower. `model_ms` is the whole unpruned model measured in
the same session; a prediction for a pruned model is `model_ms` minus the per-layer savings (so the per-call
overhead of timing a layer alone cancels out). What the convs timed alone do not show (shortcut adds, route
copies, pooling, the runtime's layout conversions between layers) is charged per element those other blocks
emit: `per_melem` ms per million elements, fitted from the whole model measured at full and at reduced
widths (`calibration` keeps those measurements); where the convs timed alone promise MORE than the whole model
saves (their own input/output conversions shrink with them), their timings are scaled by `conv_scale` < 1.

One file holds any number of tables (one per key): `read_tables`, `find_table`, `store_table` (atomic; a table
with the same key is replaced). The file is the user's cache: `prune --latency-table PATH`, `info --latency-table`.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from compress.base.errors import ExportError
from compress.base.fileio import write_text_atomic
from compress.darknet.cfg import Cfg

__all__ = ["TableKey", "LayerTiming", "LatencyTable", "machine_id", "model_fingerprint", "read_tables",
           "find_table", "store_table", "FORMAT"]

FORMAT = "yolo-compress latency tables"
VERSION = 1
# the /proc/cpuinfo flags that decide which conv kernels a runtime dispatches to
_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
              "avx512_bf16", "amx_tile", "amx_int8", "asimd", "asimdhp", "asimddp", "sve")


def machine_id(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """'<CPU model> | <ISA flags>' (the platform's machine name where /proc/cpuinfo cannot be read)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return f"{platform.processor() or platform.machine()} | ?"
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "CPU part") and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return f"{model or platform.machine()} | {' '.join(f for f in _ISA_FLAGS if f in flags)}"


def model_fingerprint(cfg: Cfg) -> str:
    """A short hash of the model's structure (every block's type and options; not its weights)."""
    blocks = [[b.type, [list(kv) for kv in b.options]] for b in cfg.blocks]
    return hashlib.sha256(json.dumps([cfg.channels, blocks]).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TableKey:
    machine: str
    runtime: str
    runtime_version: str
    threads: int
    img_size: tuple[int, int]
    model: str

    def describe(self) -> str:
        return (f"{self.runtime} {self.runtime_version}, {self.threads} thread(s), "
                f"{self.img_size[1]}x{self.img_size[0]}, model {self.model}, on {self.machine}")


def _interp(xs: tuple[int, ...], ys: np.ndarray, x: float) -> float | np.ndarray:
    """Piecewise-linear in x over the sorted grid xs (the end segments extended beyond it)."""
    if len(xs) == 1:
        return ys[0]
    j = min(max(bisect_right(xs, x) - 1, 0), len(xs) - 2)
    t = (x - xs[j]) / (xs[j + 1] - xs[j])
    return ys[j] + t * (ys[j + 1] - ys[j])


@dataclass(frozen=True)
class LayerTiming:
    """Median ms of conv `layer` alone at input widths `in_widths` x output widths `out_widths` (both sorted;
    a width that cannot change has one point); `ms[a][b]` is at (in_widths[a], out_widths[b])."""

    layer: int
    type: str
    in_widths: tuple[int, ...]
    out_widths: tuple[int, ...]
    ms: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        grid = np.asarray(self.ms, dtype=float)
        if grid.shape != (len(self.in_widths), len(self.out_widths)) or not np.isfinite(grid).all():
            raise ExportError(f"latency table: layer {self.layer} has a {grid.shape} grid for "
                              f"{len(self.in_widths)}x{len(self.out_widths)} widths; measure the table again")
        for ws in (self.in_widths, self.out_widths):
            if list(ws) != sorted(set(ws)) or ws[0] < 1:
                raise ExportError(f"latency table: layer {self.layer} widths {list(ws)} must increase from 1")

    @cached_property
    def monotone(self) -> np.ndarray:
        """The grid with noise removed: non-decreasing along both widths (running maximum)."""
        grid = np.maximum.accumulate(np.asarray(self.ms, dtype=float), axis=0)
        return np.maximum.accumulate(grid, axis=1)

    @property
    def full_ms(self) -> float:
        return float(self.ms[-1][-1])

    def at(self, c_in: float, c_out: float) -> float:
        """Interpolated ms at (c_in, c_out), never below 0."""
        row = np.array([_interp(self.out_widths, r, c_out) for r in self.monotone])
        return max(0.0, float(_interp(self.in_widths, row, c_in)))


@dataclass(frozen=True)
class LatencyTable:
    key: TableKey
    model_ms: float
    layers: tuple[LayerTiming, ...]
    runs: int = 0
    cfg: str = ""
    measured: str = ""                          # UTC time of the measurement
    notes: dict = field(default_factory=dict)   # load average while measuring, ...
    per_melem: float = 0.0                      # ms per million elements emitted by non-conv blocks
    conv_scale: float = 1.0                     # factor on the convs' timings (calibration)
    calibration: dict = field(default_factory=dict)

    @cached_property
    def by_layer(self) -> dict[int, LayerTiming]:
        return {t.layer: t for t in self.layers}

    def ms(self, layer: int, c_in: float, c_out: float) -> float:
        if layer not in self.by_layer:
            raise ExportError(f"latency table ({self.key.describe()}) has no conv {layer}; measure it again")
        return self.conv_scale * self.by_layer[layer].at(c_in, c_out)

    def rows(self) -> list[dict]:
        """Per conv: layer, type, ms at full width and its share of the whole model; then the rest of the model
        (everything that is not a conv, plus the runtime's per-call overhead counted once per layer)."""
        rows = [{"layer": t.layer, "type": t.type, "ms": round(t.full_ms, 4),
                 "share": round(t.full_ms / self.model_ms, 4)} for t in self.layers]
        rest = self.model_ms - sum(t.full_ms for t in self.layers)
        return rows + [{"layer": None, "type": "rest of the model", "ms": round(rest, 4),
                        "share": round(rest / self.model_ms, 4)}]

    def to_dict(self) -> dict:
        return {"key": {**asdict(self.key), "img_size": list(self.key.img_size)}, "model_ms": self.model_ms,
                "runs": self.runs, "cfg": self.cfg, "measured": self.measured, "notes": self.notes,
                "per_melem": self.per_melem, "conv_scale": self.conv_scale, "calibration": self.calibration,
                "layers": [{**asdict(t), "in_widths": list(t.in_widths), "out_widths": list(t.out_widths),
                            "ms": [list(r) for r in t.ms]} for t in self.layers]}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "LatencyTable":
        try:
            key = TableKey(**{**d["key"], "img_size": tuple(d["key"]["img_size"])})
            layers = tuple(LayerTiming(int(t["layer"]), str(t["type"]), tuple(int(w) for w in t["in_widths"]),
                                       tuple(int(w) for w in t["out_widths"]),
                                       tuple(tuple(float(v) for v in r) for r in t["ms"])) for t in d["layers"])
            return cls(key, float(d["model_ms"]), layers, int(d.get("runs", 0)), str(d.get("cfg", "")),
                       str(d.get("measured", "")), dict(d.get("notes", {})), float(d.get("per_melem", 0.0)),
                       float(d.get("conv_scale", 1.0)), dict(d.get("calibration", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise ExportError(f"{where}: not a latency table ({exc.__class__.__name__}: {exc}); delete it or pass "
                              f"another --latency-table") from exc


def read_tables(path: str | os.PathLike) -> list[LatencyTable]:
    """Every table in `path` ([] when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: cannot read it as a latency-table JSON file ({exc}); delete it or pass another "
                          f"--latency-table") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ExportError(f"{path}: not a {FORMAT} file (version {VERSION}); pass another --latency-table")
    return [LatencyTable.from_dict(t, f"{path} (table {n})") for n, t in enumerate(data.get("tables", []))]


def find_table(path: str | os.PathLike | None, key: TableKey) -> LatencyTable | None:
    """The table for `key` in `path`, or None (no path, no file, or no table with that key)."""
    if path is None:
        return None
    return next((t for t in read_tables(path) if t.key == key), None)


def store_table(path: str | os.PathLike, table: LatencyTable) -> None:
    """Add `table` to `path` (replacing one with the same key), atomically."""
    tables = [t for t in read_tables(path) if t.key != table.key] + [table]
    text = json.dumps({"format": FORMAT, "version": VERSION, "tables": [t.to_dict() for t in tables]}, indent=1)
    write_text_atomic(path, text + "\n")
