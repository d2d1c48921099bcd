"""quantize's truth check: each written artifact against the fp32 INPUT model, not only against fake-quant.

The fake-quant comparison (`pipeline._verify`) proves an artifact is what calibration/QAT built; it cannot see
what quantization itself cost. Issue 23: a depthwise model's int8 ONNX lost 8.9 points of mAP@.5 against fp32
with `verify.passed: true`. Here every artifact's drop from fp32 (in points of mAP@.5) is reported and held to
`--max-drop`, and an int8 ONNX slower than the fp32 ONNX on this CPU is called out.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from compress.quant.pipeline import QuantVerifyError

__all__ = ["default_max_drop", "fp32_drops", "apply_fp32_check", "check_fp32", "fakequant_verdict", "Fp32DropError",
           "MAX_DROP_8BIT"]

log = logging.getLogger(__name__)
MAX_DROP_8BIT = 2.0  # points of mAP@.5 an 8-bit artifact may lose against fp32 by default
ARTIFACTS = {"int8_onnx": ("int8 QDQ ONNX", "onnx"), "darknet": ("Darknet pair", "weights")}


class Fp32DropError(QuantVerifyError):
    """A written artifact lost more than --max-drop points of mAP@.5 against the fp32 input model."""


def default_max_drop(bits: int, a_bits: int | None) -> float | None:
    """The bound without --max-drop: 2 points for 8-bit weights and activations; below 8 bits no default bound
    (the drop is reported and warned about; pass --max-drop to enforce one)."""
    return MAX_DROP_8BIT if bits >= 8 and (a_bits or 8) >= 8 else None


def fp32_drops(figures: dict[str, Any], max_drop: float | None) -> dict[str, Any]:
    """{reference, map50_reference, max_drop, checks: {artifact: {map50, drop (points), ok}}, passed,
    int8_slower, latency_ratio} from quantize's figures (None values when evaluation was off)."""
    ref = figures.get("map50_fp32")
    fp32_ms, int8_ms = figures.get("latency_ms_fp32_onnx"), figures.get("latency_ms_int8_onnx")
    ratio = round(int8_ms / fp32_ms, 3) if fp32_ms and int8_ms else None
    out: dict[str, Any] = {"reference": "fp32", "map50_reference": ref, "max_drop": max_drop,
                           "int8_slower": ratio is not None and ratio > 1.0, "latency_ratio": ratio}
    if ref is None:
        return {**out, "checks": {}, "passed": None}
    checks = {}
    for tag in ARTIFACTS:
        score = figures.get(f"map50_{tag}")
        drop = round(100 * (ref - score), 2) if score is not None else None
        ok = drop is None or max_drop is None or drop <= max_drop
        checks[tag] = {"map50": score, "drop": drop, "ok": ok}
    return {**out, "checks": checks, "passed": all(c["ok"] for c in checks.values())}


def apply_fp32_check(figures: dict[str, Any], max_drop: float | None) -> dict[str, Any]:
    """`figures` with `vs_fp32` added; `verify.passed` covers both checks (`verify.passed_fakequant`: the
    fake-quant one alone); logs the warnings."""
    result = fp32_drops(figures, max_drop)
    for tag, check in result["checks"].items():
        if check["drop"] is not None and not check["ok"]:
            log.warning("%s scores mAP@.5 %.4f, %.1f points below the fp32 input model (%.4f; --max-drop %g)",
                        ARTIFACTS[tag][0], check["map50"], check["drop"], result["map50_reference"], max_drop)
        elif check["drop"] is not None and max_drop is None and check["drop"] > MAX_DROP_8BIT:
            log.warning("%s is %.1f points of mAP@.5 below fp32 (no --max-drop bound below 8 bits)",
                        ARTIFACTS[tag][0], check["drop"])
    if result["int8_slower"]:
        log.warning("the int8 ONNX runs slower than the fp32 ONNX on this CPU (%.2fx, onnxruntime, 1 thread): "
                    "keep the default asymmetric activations and reduced range, or deploy fp32 here",
                    result["latency_ratio"])
    out = dict(figures, vs_fp32=result)
    verify = figures.get("verify")
    if isinstance(verify, dict) and "passed" in verify:
        out["verify"] = dict(verify, passed_fakequant=verify["passed"], passed_fp32=result["passed"],
                             passed=bool(verify["passed"]) and result["passed"] is not False)
    return out


def fakequant_verdict(figures: dict[str, Any]) -> dict[str, Any]:
    """`figures` with `verify.passed` back to the fake-quant check alone (what `pipeline.check_verified` reads)."""
    verify = figures.get("verify")
    if isinstance(verify, dict) and "passed_fakequant" in verify:
        return dict(figures, verify=dict(verify, passed=verify["passed_fakequant"]))
    return figures


def check_fp32(figures: dict[str, Any], report_path: str | os.PathLike | None = None) -> None:
    """Raise `Fp32DropError` when `figures["vs_fp32"]` failed and verification is enforced (not --no-verify)."""
    v, enforced = figures.get("vs_fp32") or {}, (figures.get("verify") or {}).get("enforced", True)
    if v.get("passed") is not False or not enforced:
        return
    bad = [f"{ARTIFACTS[t][0]} {figures.get(ARTIFACTS[t][1])} scores mAP@.5 {c['map50']:.4f}, {c['drop']:.1f} "
           f"points below the fp32 input model ({v['map50_reference']:.4f})" for t, c in v["checks"].items()
           if not c["ok"]]
    where = f"; figures in {report_path}" if report_path else ""
    raise Fp32DropError("; ".join(bad) + f" (--max-drop {v['max_drop']:g}). The artifacts are kept{where}. Try "
                        "QAT (--epochs N), per-channel weights, or keep the layer in float; --max-drop raises the "
                        "bound, --no-verify accepts them anyway.")
