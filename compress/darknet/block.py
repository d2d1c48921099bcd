"""`Block`: one `[section]` of a cfg, its options kept in file order as raw strings. No torch import.

It sits below everything that reads blocks (the section table, the torch modules, `cfg.py`'s parser), so it
imports nothing of theirs: which sections exist is the table's business, not the block's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from compress.base.errors import CfgError

__all__ = ["Block"]


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
                break
        return f"{self.source}:{line}"

    def has(self, key: str) -> bool:
        return any(k == key for k, _ in self.options)

    def get(self, key: str, default: str | None = None) -> str | None:
        """The key's FIRST value, as Darknet's option_find and OpenCV's reader take a repeated key."""
        for k, v in self.options:
            if k == key:
                return v
        return default

    def _bad(self, key: str, value: str, kind: str) -> CfgError:
        shown = value if len(value) <= 40 else f"{value[:20]}...({len(value)} characters)"
        return CfgError(f"{self.where(key)}: [{self.type}] {key}={shown!r} is not {kind}; fix the value in the cfg")

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
        except ValueError:  # also Python's 4300-digit limit on int(str): such a value is no layer size
            try:
                as_float = float(raw)
            except ValueError:
                raise self._bad(key, raw, "an integer") from None
            if not math.isfinite(as_float) or as_float != int(as_float):
                raise self._bad(key, raw, "an integer") from None
            return int(as_float)

    def get_float(self, key: str, default: float | None = None) -> float:
        return self._typed(key, default, float, "a number")

    def get_ints(self, key: str, default: tuple[int, ...] | None = None) -> tuple[int, ...]:
        return self._typed(key, default, lambda raw: tuple(int(p) for p in raw.split(",") if p.strip()),
                           "a comma-separated list of integers")

    def get_floats(self, key: str, default: tuple[float, ...] | None = None) -> tuple[float, ...]:
        return self._typed(key, default, lambda raw: tuple(float(p) for p in raw.split(",") if p.strip()),
                           "a comma-separated list of numbers")

    def _typed(self, key: str, default: object, convert: Callable[[str], object], what: str) -> Any:
        """`convert(value)` of `key` (its default when absent); a value it cannot read names file:line and `what`."""
        raw = self.get(key)
        if raw is None:
            return self._default(key, default)
        try:
            return convert(raw)
        except ValueError:
            raise self._bad(key, raw, what) from None

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
