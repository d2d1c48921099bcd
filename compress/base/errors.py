"""Typed errors. The CLI turns any CompressError into one clean `Error: ...` line."""
from __future__ import annotations

__all__ = ["CompressError", "CfgError", "WeightsError", "DataError", "PruneError", "QuantError",
           "DistillError", "RecipeError", "ExportError", "GuardError", "DeviceError",
           "WriteError"]


class CompressError(Exception):
    """Base of every error a user can cause; the message names the file/option and the fix."""


class CfgError(CompressError):
    pass


class WeightsError(CompressError):
    pass


class DataError(CompressError):
    pass


class PruneError(CompressError):
    pass


class QuantError(CompressError):
    pass


class DistillError(CompressError):
    pass


class RecipeError(CompressError):
    pass


class ExportError(CompressError):
    pass


class GuardError(CompressError):
    """An output path that would destroy an input, cannot be written, or replaces an earlier run."""


class DeviceError(CompressError):
    """A --device that is malformed or absent on this machine."""


class WriteError(CompressError):
    """An output could not be written (a full disk, `ulimit -f`, a quota, a read-only mount)."""
