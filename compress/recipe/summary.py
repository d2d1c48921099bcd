"""The end-of-run stage table: one row per model-producing or eval step, from each step's report.json."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from compress.base.fileio import atomic_write, write_text_atomic
from compress.darknet.summary import format_stage_table
from compress.recipe.runner import RunResult

__all__ = ["STAGE_KEYS", "stage_rows", "write_summary", "stage_table"]

log = logging.getLogger(__name__)

STAGE_KEYS: list[tuple[str, str]] = [("stage", "stage"), ("params", "params"), ("gflops", "GFLOPs"),
                                     ("size_mb", "size MB"), ("map50", "mAP@0.5"), ("map50_95", "mAP@0.5:0.95"),
                                     ("latency_ms", "CPU latency ms")]
FIGURES = [k for k, _ in STAGE_KEYS[1:]]


def stage_rows(result: RunResult) -> list[dict]:
    """Model-producing steps report their output model; an eval step adds its mAP to the model it evaluated."""
    rows: list[dict] = []
    steps = {s.index: s for s in result.plan.steps}
    current: dict = {}
    for record in result.records:
        step = steps[record.index]
        figures = {k: record.figures.get(k) for k in FIGURES}
        if step.kind.produces_model:
            current = figures
        if step.kind.in_summary:
            merged = {**current, **{k: v for k, v in figures.items() if v is not None}} \
                if not step.kind.produces_model else figures
            rows.append({"stage": step.label, **merged, "status": record.status})
    return rows


def stage_table(rows: list[dict]) -> str:
    return format_stage_table(rows, STAGE_KEYS)


def write_summary(result: RunResult, rows: list[dict]) -> tuple[Path, Path]:
    out = result.plan.out
    body = {"recipe": str(result.plan.recipe.path.resolve()), "wall_s": round(result.seconds, 2), "stages": rows,
            "steps": [{"stage": f"{r.index:02d}-{r.name.replace(' ', '-')}", "status": r.status,
                       "seconds": r.seconds} for r in result.records]}
    write_text_atomic(out / "summary.json", json.dumps(body, indent=2) + "\n")
    _plot(rows, out / "summary.png")
    return out / "summary.json", out / "summary.png"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    names = [r["stage"] for r in rows]
    for ax, (key, title) in zip(axes.flat, STAGE_KEYS[1:]):
        values = [r.get(key) if r.get(key) is not None else 0 for r in rows]
        ax.bar(range(len(rows)), values, color="#3b75af")
        ax.set_xticks(range(len(rows)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title)
        for x, (v, r) in enumerate(zip(values, rows)):
            ax.annotate("-" if r.get(key) is None else f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=90)
    plt.close(fig)
