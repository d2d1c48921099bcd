"""Reading JSON state files a run left behind (resume records, calibration state): one-line errors.

A resumed run reads files from its own earlier run, but those may be truncated, edited or replaced; a
JSONDecodeError, a KeyError on a missing field or a RecursionError on a deeply nested file would end in a
traceback. `read_json` turns them into `error` naming the file and the fix; `require` checks the fields.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from compress.base.errors import CompressError

__all__ = ["read_json", "require"]


def read_json(path: str | os.PathLike, error: type[CompressError], fix: str) -> Any:
    """The parsed file, or `error("{path}: not valid JSON (...); {fix}")`."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc}); {fix}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise error(f"{path}: not valid JSON ({str(exc).splitlines()[0][:120]}); {fix}") from None
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deeply); {fix}") from None


def require(doc: Any, types: Mapping[str, type | tuple[type, ...]], path: str | os.PathLike,
            error: type[CompressError], fix: str) -> dict:
    """`doc` as a dict holding each key of `types` with a value of that type, else `error` naming the key."""
    if not isinstance(doc, dict):
        raise error(f"{path}: expected a JSON object, found {type(doc).__name__}; {fix}")
    for key, kind in types.items():
        if not isinstance(doc.get(key), kind):
            got = "missing" if key not in doc else f"a {type(doc[key]).__name__}"
            raise error(f"{path}: field {key!r} is {got}; {fix}")
    return doc
