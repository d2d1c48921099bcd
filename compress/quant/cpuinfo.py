"""What the int8 kernels of this machine can do: the x86 flags that decide onnxruntime's integer GEMM path."""
from __future__ import annotations

import platform
from pathlib import Path

__all__ = ["cpu_flags"]

# /proc/cpuinfo spellings; VNNI is avx512_vnni (server) or avx_vnni (AVX2-class client cores)
_FLAGS = {"avx2": ("avx2",), "avx512": ("avx512f",), "vnni": ("avx512_vnni", "avx_vnni"), "amx": ("amx_int8",)}


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> dict:
    """{'machine', 'model', 'avx2', 'avx512', 'vnni', 'amx', 'int8_saturation_risk'}; flags are None where
    /proc/cpuinfo is unreadable (not Linux). Saturation risk: x86 without VNNI runs onnxruntime's u8 x s8
    kernels with int16 pair sums (full-range int8 weights can overflow them)."""
    info = {"machine": platform.machine(), "model": None}
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return info | {k: None for k in _FLAGS} | {"int8_saturation_risk": None}
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features") and not flags:
            flags = set(value.split())
        elif key == "model name" and info["model"] is None:
            info["model"] = value.strip()
    info.update({k: any(f in flags for f in names) for k, names in _FLAGS.items()})
    info["int8_saturation_risk"] = bool(info["avx2"] and not info["vnni"])
    return info
