"""Questions about the whole table: which sections exist, their headers, a cfg's dialect, the README's table.

The table fills as each family module (`conv`, `joins`, ...) registers its entries; these read it when called.
"""
from __future__ import annotations

from typing import Iterable

from compress.darknet.sections.base import DIALECTS, SECTIONS, canonical

__all__ = ["supported_sections", "header_of", "detect_dialect", "supported_sections_markdown"]


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
