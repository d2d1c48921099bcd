"""Darknet `.cfg` text <-> `Cfg` (an immutable list of `Block`s). No torch import.

Blocks keep their options in file order as raw strings, so keys we do not interpret (`jitter`,
`nms_kind`, `stopbackward`, ...) survive a parse -> write round trip. The writer is canonical
(`key=value`, LF, one blank line between sections) because Darknet forks reject anything fancier.
Which sections exist is the section table's business (`compress.darknet.sections`). A cfg is read in a
dialect: `darknet`, or `reference` (the reference compression project: [depthwise], [se] filters=,
activation=none, ASFF heads, [net] channels ignored); it is detected unless given, and written back
in the same dialect.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from compress.base.errors import CfgError
from compress.base.fileio import write_text_atomic
from compress.darknet import sections as _sections
from compress.darknet.sections.heads import check_yolo_block

__all__ = ["Block", "Cfg", "SUPPORTED_SECTIONS", "parse_cfg", "read_cfg", "format_cfg", "write_cfg"]

SUPPORTED_SECTIONS = _sections.supported_sections()
_NET_NAMES = ("net", "network")


@dataclass(frozen=True)
class Block:
    """One `[section]` of a cfg; `line` is its header line for error messages."""

    type: str
    options: tuple[tuple[str, str], ...] = ()
    line: int = 0
    source: str = field(default="<cfg>", compare=False)
    option_lines: tuple[int, ...] = field(default=(), compare=False)

    def where(self, key: str | None = None) -> str:
        line = self.line
        for (k, _), n in zip(self.options, self.option_lines):
            if k == key:
                line = n
        return f"{self.source}:{line}"

    def has(self, key: str) -> bool:
        return any(k == key for k, _ in self.options)

    def get(self, key: str, default: str | None = None) -> str | None:
        value = default
        for k, v in self.options:
            if k == key:
                value = v
        return value

    def _bad(self, key: str, value: str, kind: str) -> CfgError:
        return CfgError(f"{self.where(key)}: [{self.type}] {key}={value!r} is not {kind}; fix the value in the cfg")

    def _default(self, key: str, default):
        if default is None:
            raise CfgError(f"{self.where()}: [{self.type}] needs `{key}=`; add it to the cfg")
        return default

    def get_int(self, key: str, default: int | None = None) -> int:
        raw = self.get(key)
        if raw is None:
            return self._default(key, default)
        try:
            return int(raw)
        except ValueError:
            try:
                as_float = float(raw)
            except ValueError:
                raise self._bad(key, raw, "an integer") from None
            if as_float != int(as_float):
                raise self._bad(key, raw, "an integer") from None
            return int(as_float)

    def get_float(self, key: str, default: float | None = None) -> float:
        raw = self.get(key)
        if raw is None:
            return self._default(key, default)
        try:
            return float(raw)
        except ValueError:
            raise self._bad(key, raw, "a number") from None

    def get_ints(self, key: str, default: tuple[int, ...] | None = None) -> tuple[int, ...]:
        raw = self.get(key)
        if raw is None:
            return self._default(key, default)
        try:
            return tuple(int(p) for p in raw.split(",") if p.strip())
        except ValueError:
            raise self._bad(key, raw, "a comma-separated list of integers") from None

    def get_floats(self, key: str, default: tuple[float, ...] | None = None) -> tuple[float, ...]:
        raw = self.get(key)
        if raw is None:
            return self._default(key, default)
        try:
            return tuple(float(p) for p in raw.split(",") if p.strip())
        except ValueError:
            raise self._bad(key, raw, "a comma-separated list of numbers") from None

    def replace(self, **changes: object) -> "Block":
        """New block with keys changed (None removes a key); order kept, new keys appended."""
        opts = []
        seen = set()
        for k, v in self.options:
            if k in changes:
                if k in seen or changes[k] is None:
                    continue
                seen.add(k)
                opts.append((k, _fmt(changes[k])))
            else:
                opts.append((k, v))
        for k, v in changes.items():
            if k not in seen and v is not None and not self.has(k):
                opts.append((k, _fmt(v)))
        return Block(self.type, tuple(opts), self.line, self.source)  # option lines no longer apply


def _fmt(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_fmt(v) for v in value)
    if isinstance(value, bool):
        return str(int(value))
    return str(value)


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


def parse_cfg(text: str, source: str = "<cfg>", dialect: str | None = None) -> Cfg:
    """Parse cfg text. Raises CfgError naming `source:line` for anything Darknet would not accept.
    `dialect`: "darknet" or "reference"; None detects it (`sections.detect_dialect`)."""
    sections: list[tuple[str, int, list[tuple[str, str]], list[int]]] = []
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
        sections[-1][2].append((key, value))
        sections[-1][3].append(lineno)
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
        if b.type == "yolo":
            check_yolo_block(b)
    return cfg


def read_cfg(path: str | os.PathLike, dialect: str | None = None) -> Cfg:
    path = Path(path)
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
