"""Reading YAML files that a user hands us (data.yaml, --hyp, recipes): bounded, safe, one-line errors.

`yaml.safe_load` runs no code, but it still follows aliases: a 12-line "billion laughs" file (`&a [*b, *b, ...]`
nested ten deep) is cheap to load as shared references and hangs whatever walks it (a recipe's line tracking,
`str()`, a copy). Nothing we read needs aliases, so the loader refuses the first one, which bounds a document's
nodes by its size in bytes. Tags other than YAML's plain types (`!!python/...`, `!custom`) are refused by name
too, instead of being read as whatever the node holds. Every failure is one line: `file:line: problem; fix`.
"""
from __future__ import annotations

import os
from typing import Any

import yaml

from compress.base.errors import CompressError
from compress.base.fileio import require_regular

__all__ = ["YamlLoader", "read_yaml_text", "compose_yaml", "load_yaml", "yaml_problem"]

# The tags SafeLoader constructs (str, int, float, bool, null, seq, map, timestamp, binary, set, omap, ...).
_PLAIN_TAGS = frozenset(tag for tag in yaml.SafeLoader.yaml_constructors if tag is not None)


class YamlLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases (no expansion bombs) and tags it would not construct as plain data."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"an alias (*{event.anchor}) is not accepted here; write "
                                              "the value out in full", event.start_mark)
        node = super().compose_node(parent, index)
        if node.tag not in _PLAIN_TAGS:
            raise yaml.composer.ComposerError(None, None, f"the tag {node.tag!r} is not accepted here; remove it",
                                              node.start_mark)
        return node


def yaml_problem(exc: yaml.YAMLError) -> tuple[int | None, str]:
    """(1-based line or None, the problem on one line) of a YAML error; PyYAML's own text spans several lines."""
    # the context (where the unclosed `{` opened) is where a person looks; else where the parser stopped
    mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
    return (mark.line + 1 if mark is not None else None), " ".join(str(problem).split())


def read_yaml_text(path: str | os.PathLike, error: type[CompressError] = CompressError) -> str:
    """The file's text; a binary or non-UTF-8 file is one error naming the byte, not a UnicodeDecodeError."""
    path = require_regular(path, "YAML file", error)  # a FIFO would block the read, /dev/zero never end
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc}); pass an existing YAML file") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not a text file (byte {exc.start} is not UTF-8); pass a YAML file") from None


def compose_yaml(text: str, source: str, error: type[CompressError] = CompressError) -> yaml.Node | None:
    """The node tree (with line marks) of one YAML document, or `error` naming `source:line`."""
    try:
        return yaml.compose(text, Loader=YamlLoader)
    except yaml.YAMLError as exc:
        raise _error(exc, source, error) from None
    except RecursionError:  # `[[[[...` thousands deep
        raise error(f"{source}: YAML nested too deeply; fix the file") from None


def load_yaml(text: str, source: str, error: type[CompressError] = CompressError) -> Any:
    """The plain data of one YAML document (dicts, lists, scalars), or `error` naming `source:line`."""
    try:
        return yaml.load(text, Loader=YamlLoader)
    except yaml.YAMLError as exc:
        raise _error(exc, source, error) from None
    except RecursionError:
        raise error(f"{source}: YAML nested too deeply; fix the file") from None


def _error(exc: yaml.YAMLError, source: str, error: type[CompressError]) -> CompressError:
    line, problem = yaml_problem(exc)
    where = f"{source}:{line}" if line is not None else source
    return error(f"{where}: not valid YAML ({problem}); fix the file")
