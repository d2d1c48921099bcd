"""Darknet `.cfg` text <-> `Cfg` (the `[net]` block and an immutable list of `Block`s).

Blocks keep their options in file order as raw strings, so keys we do not interpret (`jitter`,
`nms_kind`, `stopbackward`, ...) survive a parse -> write round trip. The writer is canonical
(`key=value`, LF, one blank line between sections) because Darknet forks reject anything fancier.
Which sections exist, their canonical names, `[header]` spellings and parse-time checks are the section
table's business (`compress.darknet.sections`, which this module sits above: the table and the torch modules
read `compress.darknet.block.Block`, never this module). A cfg is read in a
dialect: `darknet`, or `reference` (the reference compression project: [depthwise], [se] filters=,
activation=none, ASFF heads, [net] channels ignored); it is detected unless given, and written back
in the same dialect.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Iterable

from compress.base.errors import CfgError
from compress.base.fileio import require_regular, write_text_atomic
from compress.darknet.block import Block
from compress.darknet import sections as _sections

__all__ = ["Block", "Cfg", "SUPPORTED_SECTIONS", "parse_cfg", "read_cfg", "format_cfg", "write_cfg"]

log = logging.getLogger(__name__)
SUPPORTED_SECTIONS = _sections.supported_sections()
_NET_NAMES = ("net", "network")


@dataclass(frozen=True)
class Cfg:
    """A parsed cfg: the `[net]` block plus the layer blocks (index = position, as Darknet counts)."""

    net: Block
    blocks: tuple[Block, ...]
    path: str | None = field(default=None, compare=False)
    dialect: str = "darknet"

    @property
    def width(self) -> int:
        return self.net.get_int("width", 416)

    @property
    def height(self) -> int:
        return self.net.get_int("height", 416)

    @property
    def channels(self) -> int:
        """Input channels. The reference project always builds 3 (its count ignores `channels=`)."""
        if self.dialect == "reference":
            return 3
        value = self.net.get_int("channels", 3)
        if value < 1:
            raise CfgError(f"{self.net.where('channels')}: [net] channels={value} must be >= 1")
        return value

    @property
    def classes(self) -> int:
        heads = [b for b in self.blocks if _sections.lookup(b).head]
        return heads[0].get_int("classes", 20) if heads else 0

    def with_blocks(self, blocks: Iterable[Block]) -> "Cfg":
        return Cfg(self.net, tuple(blocks), self.path, self.dialect)

    def with_net(self, **changes: object) -> "Cfg":
        return Cfg(self.net.replace(**changes), self.blocks, self.path, self.dialect)


def _strip_comment(line: str) -> str:
    for mark in ("#", ";"):
        cut = line.find(mark)
        if cut >= 0:
            line = line[:cut]
    return line.strip()


def _short(value: str) -> str:
    return value if len(value) <= 40 else value[:20] + "..."


def parse_cfg(text: str, source: str = "<cfg>", dialect: str | None = None) -> Cfg:
    """Parse cfg text. Raises CfgError naming `source:line` for anything Darknet would not accept.
    `dialect`: "darknet" or "reference"; None detects it (`sections.detect_dialect`)."""
    sections: list[tuple[str, int, list[tuple[str, str]], list[int]]] = []
    repeated: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = _strip_comment(raw.lstrip("\ufeff"))
        if not line:
            continue
        if line.startswith("["):
            if not line.endswith("]") or len(line) < 3:
                raise CfgError(f"{source}:{lineno}: malformed section header {line!r}; write it as [name]")
            sections.append((line[1:-1].strip().lower(), lineno, [], []))
            continue
        if "=" not in line:
            raise CfgError(f"{source}:{lineno}: expected key=value, got {line!r}")
        if not sections:
            raise CfgError(f"{source}:{lineno}: option {line!r} before the first [section]; start with [net]")
        key, value = line.split("=", 1)
        key, value = key.strip(), value.strip()
        if not key or not value:
            raise CfgError(f"{source}:{lineno}: {line!r} has an empty key or value")
        opts, lines = sections[-1][2], sections[-1][3]
        first = next((n for (k, _), n in zip(opts, lines) if k == key), None)
        if first is not None:  # Darknet's option_find and OpenCV's map read the first (so does Block.get): say so
            repeated.append(f"line {lineno} {key}={_short(value)} (line {first} is kept)")
        opts.append((key, value))
        lines.append(lineno)
    if repeated:
        more = f" and {len(repeated) - 3} more" if len(repeated) > 3 else ""
        log.warning("%s: a key repeated in its section; the first value is used, as Darknet and OpenCV do: %s%s",
                    source, "; ".join(repeated[:3]), more)
    if not sections or sections[0][0] not in _NET_NAMES:
        raise CfgError(f"{source}:1: a Darknet cfg starts with a [net] section")
    blocks = []
    for name, lineno, opts, lines in sections[1:]:
        if name in _NET_NAMES:
            raise CfgError(f"{source}:{lineno}: a second [net] section; a cfg has exactly one")
        name = _sections.canonical(name)
        if name not in _sections.SECTIONS:
            hint = " ([crnn]/[connected]/... are recurrent or classifier layers, not detector sections)"
            raise CfgError(f"{source}:{lineno}: unsupported section [{name}]{hint}; supported: "
                           + ", ".join(f"[{s}]" for s in SUPPORTED_SECTIONS))
        blocks.append(Block(name, tuple(opts), lineno, source, tuple(lines)))
    _, net_line, net_opts, net_lines = sections[0]
    net = Block("net", tuple(net_opts), net_line, source, tuple(net_lines))
    dialect = dialect or _sections.detect_dialect(blocks, net)
    if dialect not in _sections.DIALECTS:
        raise CfgError(f"{source}: dialect={dialect!r} is not one of {', '.join(_sections.DIALECTS)}")
    cfg = Cfg(net, tuple(blocks), source, dialect)
    for b in cfg.blocks:
        check = _sections.lookup(b).check
        if check is not None:
            check(b)
    return cfg


def read_cfg(path: str | os.PathLike, dialect: str | None = None) -> Cfg:
    path = require_regular(path, "--cfg", CfgError)  # a FIFO would block, /dev/zero never ends
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise CfgError(f"{path}: cfg file not found; pass an existing --cfg") from None
    except OSError as exc:
        raise CfgError(f"{path}: cannot read cfg ({exc.strerror})") from None
    return parse_cfg(text, str(path), dialect)


def format_cfg(cfg: Cfg) -> str:
    """Canonical text. A reference-dialect cfg whose dialect cannot be detected from its sections gets
    `dialect=reference` in [net] (Darknet and the reference project ignore that key)."""
    net = cfg.net
    if cfg.dialect == "reference" and _sections.detect_dialect(cfg.blocks, net) != "reference":
        net = net.replace(dialect="reference")
    parts = []
    for block in (net, *cfg.blocks):
        lines = [f"[{_sections.header_of(block.type)}]"] + [f"{k}={v}" for k, v in block.options]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def write_cfg(cfg: Cfg, path: str | os.PathLike) -> None:
    write_text_atomic(path, format_cfg(cfg))
