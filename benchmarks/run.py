"""Run every benchmark script in this folder and collect their results into one JSON file.

    python benchmarks/run.py --out benchmarks/results.json [--only eval_speed --only int8_latency] [--timeout 900]

Each `benchmarks/<name>.py` (except this file) is run as `python <name>.py --out <tmp>/<name>.json`, one after
the other (so timings do not compete for the CPU). Its JSON is stored under `results[<name>]`, with its exit
status and wall time; a failing script is recorded (stderr tail) and does not stop the others. The combined file
also records the environment (torch / Python versions, CPU count and model, threads, git commit, dirty flag), so
two results files from different machines or commits can be compared.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

from compress.base.fileio import write_text_atomic

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
log = logging.getLogger("benchmarks")


def scripts(only: list[str]) -> list[Path]:
    found = sorted(p for p in HERE.glob("*.py") if p.name != Path(__file__).name and not p.name.startswith("_"))
    if only:
        missing = sorted(set(only) - {p.stem for p in found})
        if missing:
            raise SystemExit(f"--only {', '.join(missing)}: no such benchmark in {HERE}; "
                             f"available: {', '.join(p.stem for p in found)}")
        found = [p for p in found if p.stem in only]
    return found


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment() -> dict:
    import torch
    cpu = platform.processor()
    if Path("/proc/cpuinfo").is_file():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), "git_commit": _git("rev-parse", "HEAD"),
            "git_dirty": bool(_git("status", "--porcelain")), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def run_one(script: Path, tmp: Path, timeout: float, extra: list[str]) -> dict:
    out = tmp / f"{script.stem}.json"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(script), "--out", str(out), *extra], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
        rc, stderr, stdout = proc.returncode, proc.stderr, proc.stdout
    except subprocess.TimeoutExpired as exc:
        rc, stderr, stdout = None, f"timed out after {timeout:.0f} s", exc.stdout or ""
    entry = {"status": "ok" if rc == 0 and out.is_file() else "failed", "returncode": rc,
             "wall_s": round(time.perf_counter() - t0, 2)}
    if entry["status"] == "ok":
        entry["result"] = json.loads(out.read_text())
    else:
        entry["stderr_tail"] = (stderr or "")[-2000:]
    if stdout:
        log.info("%s\n%s", script.stem, stdout.rstrip())
    return entry


def _rows(results: dict) -> list[list]:
    """One row per scalar figure of each benchmark (nested dicts are flattened with dots)."""
    rows = []
    for name, entry in results.items():
        flat = _flatten(entry.get("result", {}))
        if not flat:
            rows.append([name, entry["status"], "", "", entry["wall_s"]])
        for i, (key, value) in enumerate(flat.items()):
            rows.append([name if i == 0 else "", entry["status"] if i == 0 else "", key, value,
                         entry["wall_s"] if i == 0 else ""])
    return rows


def _flatten(d: object, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d} if prefix and not isinstance(d, list) else {}
    out: dict = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "results.json", help="combined JSON (default: %(default)s)")
    ap.add_argument("--only", action="append", default=[], help="run just this benchmark (repeatable)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per script (default: %(default)s)")
    ap.add_argument("extra", nargs="*", help="arguments passed on to every script (after --)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for script in scripts(args.only):
            log.info("== %s", script.name)
            results[script.stem] = run_one(script, Path(tmp), args.timeout, args.extra)
    body = {"environment": environment(), "results": results}
    write_text_atomic(args.out, json.dumps(body, indent=2, default=str) + "\n")
    print(tabulate(_rows(results), headers=["benchmark", "status", "figure", "value", "wall s"], tablefmt="github"))
    print(f"\n-> {args.out}")
    return 0 if all(e["status"] == "ok" for e in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
