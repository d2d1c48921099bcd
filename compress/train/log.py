"""Per-epoch results: `results.csv` (one row per epoch) and `results.png` (loss and mAP curves)."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from compress.base.fileio import atomic_write, write_text_atomic

__all__ = ["write_results_csv", "plot_results"]

FIRST = ("epoch", "total", "box", "obj", "cls")
LAST = ("lr", "data_wait", "map50", "map50_95", "time_s")


def _columns(history: list[dict]) -> list[str]:
    middle: list[str] = []
    for row in history:
        middle += [k for k in row if k not in FIRST and k not in LAST and k not in middle]
    return [*FIRST, *middle, *LAST]


def write_results_csv(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(history), extrasaction="ignore", restval="")
    writer.writeheader()
    for row in history:
        writer.writerow({k: _fmt(v) for k, v in row.items()})
    write_text_atomic(path, buf.getvalue())


def _fmt(v: object) -> object:
    return "" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)


def plot_results(path: Path, history: list[dict]) -> None:
    """Loss parts (left) and mAP (right) per epoch, matplotlib Agg, written atomically."""
    import matplotlib  # optional and slow to import (~0.5 s): only the results plot needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_l, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for key in [c for c in _columns(history) if c not in ("epoch", *LAST)]:
        values = [r.get(key) for r in history]
        if all(isinstance(v, (int, float)) for v in values):
            ax_l.plot(epochs, values, label=key)
    ax_l.set_xlabel("epoch")
    ax_l.set_ylabel("loss")
    if ax_l.lines:
        ax_l.legend()
    for key in ("map50", "map50_95"):
        pts = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
        if pts:
            ax_m.plot(*zip(*pts), marker="o", label=key)
    ax_m.set_xlabel("epoch")
    ax_m.set_ylabel("mAP")
    ax_m.set_ylim(0, 1)
    if ax_m.lines:
        ax_m.legend()
    fig.tight_layout()
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=90)
    plt.close(fig)
