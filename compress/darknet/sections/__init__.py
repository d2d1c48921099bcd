"""The section table: every cfg section the toolkit reads, one `Section` entry each (see `base.py`).

`cfg`, `graph`, `model`, `weights`, `report` and the pruning core read everything section-specific from
here; adding a section means registering one entry (plus its torch module and tests).
"""
from __future__ import annotations

from typing import Iterable

from compress.darknet.sections.base import (DIALECTS, SECTIONS, Ctx, FlowOps, Key, Section, Shape, block_inputs, canonical, check_keys,
                   lookup, register, resolve_refs, strides)
from compress.darknet.sections import conv, joins, spatial, attention, heads  # noqa: F401,E402 - each registers its entries
from compress.darknet.sections.conv import conv_geometry, conv_groups, is_depthwise
from compress.darknet.sections.spatial import maxpool_geometry

__all__ = ["DIALECTS", "SECTIONS", "Ctx", "FlowOps", "Key", "Section", "Shape", "block_inputs", "canonical",
           "check_keys", "lookup", "register", "resolve_refs", "conv_geometry", "conv_groups", "is_depthwise",
           "maxpool_geometry", "strides", "output_quant_rule", "supported_sections", "detect_dialect", "header_of", "supported_sections_markdown"]


def supported_sections() -> tuple[str, ...]:
    return tuple(SECTIONS)


def output_quant_rule(section: Section, n_inputs: int) -> str | None:
    """How a non-conv block's output is quantized: "keep" its input's grid (pooling, upsample, a one-input
    route), "new" observer for joins of differently scaled tensors (concat, residual add), None otherwise."""
    if section.quant == "keep" or (section.quant == "join" and n_inputs == 1):
        return "keep"
    return "new" if section.quant == "join" else None


def header_of(name: str) -> str:
    """The `[header]` spelling Darknet expects for a section name."""
    section = SECTIONS.get(canonical(name))
    return section.header if section is not None and section.header else name


def detect_dialect(blocks: Iterable, net=None) -> str:
    """`reference` when the cfg uses something only the reference project reads ([depthwise], [se] filters=,
    activation=none/h_swish, [yolo] from=), else `darknet`; `[net] dialect=` overrides."""
    declared = (net.get("dialect") or "").lower() if net is not None else ""
    if declared in DIALECTS:
        return declared
    for b in blocks:
        if b.type == "depthwise" or (b.type == "se" and b.has("filters")) or (b.type == "yolo" and b.has("from")):
            return "reference"
        if (b.get("activation") or "").lower() in ("none", "h_swish"):
            return "reference"
    return "darknet"


def supported_sections_markdown() -> str:
    """The README's table of supported sections, generated from the table itself."""
    rows = ["| section | what it does | stored weights | pruning | from |", "|---|---|---|---|---|"]
    for s in SECTIONS.values():
        name = f"`[{s.header or s.name}]`" + "".join(f", `[{a}]`" for a in s.aliases)
        cells = (name, s.summary, s.weights or "-", s.pruning, ", ".join(s.dialects))
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"
