"""The section table: every cfg section the toolkit reads, one `Section` entry each (see `base.py`).

`cfg`, `graph`, `model`, `weights`, `summary`, the pruning core, quantization, distillation and the darknet
loss read everything section-specific from here; adding a section means registering one entry (plus its torch
module and tests). Imports go one way: `block`, `geometry` <- `layers`, `extra_layers` <- this table <- `cfg`
(the parser) <- `graph` <- `model`; the torch modules never import the table that builds them.
"""
from __future__ import annotations

from typing import Iterable

from compress.darknet.geometry import conv_geometry, maxpool_geometry, strides
from compress.darknet.sections.base import (DIALECTS, SECTIONS, Ctx, FlowOps, Key, Section, Shape, block_inputs,
                                            canonical, check_keys, lookup, register, resolve_refs)
from compress.darknet.sections import conv, joins, spatial, attention, heads  # noqa: F401,E402 - each registers its entries
from compress.darknet.sections.conv import conv_groups, is_depthwise

__all__ = ["DIALECTS", "SECTIONS", "Ctx", "FlowOps", "Key", "Section", "Shape", "block_inputs", "canonical",
           "check_keys", "lookup", "register", "resolve_refs", "conv_geometry", "conv_groups", "is_depthwise",
           "maxpool_geometry", "strides", "supported_sections", "detect_dialect", "header_of",
           "supported_sections_markdown"]


def supported_sections() -> tuple[str, ...]:
    return tuple(SECTIONS)


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
