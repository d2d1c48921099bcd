"""The section table: every cfg section the toolkit reads, one `Section` entry each (see `base.py`).

`cfg`, `graph`, `model`, `weights`, `summary`, the pruning core, quantization, distillation and the darknet
loss read everything section-specific from here; adding a section means registering one entry (plus its torch
module and tests). Imports go one way: `block`, `geometry` <- `layers`, `extra_layers` <- this table <- `cfg`
(the parser) <- `graph` <- `model`; the torch modules never import the table that builds them.
"""
from __future__ import annotations

from compress.darknet.geometry import conv_geometry, maxpool_geometry, strides
from compress.darknet.sections.base import (DIALECTS, SECTIONS, Ctx, FlowOps, Key, Section, Shape, block_inputs,
                                            canonical, check_keys, lookup, register, resolve_refs)
from compress.darknet.sections import conv, joins, spatial, attention, heads  # noqa: F401,E402 - each registers its entries
from compress.darknet.sections.conv import conv_groups, is_depthwise
from compress.darknet.sections.table import detect_dialect, header_of, supported_sections, supported_sections_markdown

__all__ = ["DIALECTS", "SECTIONS", "Ctx", "FlowOps", "Key", "Section", "Shape", "block_inputs", "canonical",
           "check_keys", "lookup", "register", "resolve_refs", "conv_geometry", "conv_groups", "is_depthwise",
           "maxpool_geometry", "strides", "supported_sections", "detect_dialect", "header_of",
           "supported_sections_markdown"]
