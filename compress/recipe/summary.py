"""The end-of-run stage table: one row per model-producing or eval step, from each step's report.json."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from compress.base.errors import CompressError
from compress.base.fileio import atomic_write, write_text_atomic
from compress.darknet.cfg import read_cfg
from compress.darknet.model import build_model
from compress.darknet.summary import format_stage_table, summarize
from compress.recipe.runner import RunResult

__all__ = ["STAGE_KEYS", "stage_rows", "write_summary", "stage_table"]

log = logging.getLogger(__name__)

STAGE_KEYS: list[tuple[str, str]] = [("stage", "stage"), ("params", "params"), ("gflops", "GFLOPs"),
                                     ("size_mb", "size MB"), ("map50", "mAP@0.5"), ("map50_95", "mAP@0.5:0.95"),
                                     ("latency_ms", "CPU latency ms")]
FIGURES = [k for k, _ in STAGE_KEYS[1:]]


def stage_rows(result: RunResult) -> list[dict]:
    """Model-producing steps report their output model; an eval step adds its mAP to the model it evaluated.
    GFLOPs are counted again at one input size for every row, the recipe's input cfg's width (`gflops_img_size`;
    issue #26: each step reported them at its own --img-size, e.g. train at 64 beside prune at 128)."""
    rows: list[dict] = []
    steps = {s.index: s for s in result.plan.steps}
    size = read_cfg(result.plan.input_model[0]).width
    current: dict = {}
    for record in result.records:
        step = steps[record.index]
        figures = {k: record.figures.get(k) for k in FIGURES}
        if step.kind.produces_model:
            figures.update(gflops=_gflops(record.outputs.get("cfg"), size), gflops_img_size=size)
            current = figures
        if step.kind.in_summary:
            merged = {**current, **{k: v for k, v in figures.items() if v is not None}} \
                if not step.kind.produces_model else figures
            rows.append({"stage": step.label, **merged, "status": record.status})
    return rows


def _gflops(cfg: str | None, size: int) -> float | None:
    """GFLOPs of the cfg's network at size x size (from the section table; no weights are read)."""
    if not cfg:
        return None
    try:
        return round(summarize(build_model(read_cfg(cfg)), (size, size)).gflops, 4)
    except CompressError as exc:  # the size cannot flow through this network: no figure rather than a wrong one
        log.warning("%s: no GFLOPs at %dx%d (%s)", cfg, size, size, exc)
        return None


def stage_table(rows: list[dict]) -> str:
    sizes = sorted({r.get("gflops_img_size") for r in rows} - {None})
    gflops = f"GFLOPs @{sizes[0]}" if len(sizes) == 1 else "GFLOPs"
    return format_stage_table(rows, [(k, gflops if k == "gflops" else h) for k, h in STAGE_KEYS])


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
