"""How close `darknet.memory.inference_bytes` (the estimate `eval`/`detect` check before allocating) is to the
measured peak of an eval-mode forward pass.

Each row runs in a fresh child process: build the model (random weights), note the peak RSS, run one forward of
`batch` random images of `size` under no_grad, and report the growth of the peak RSS next to the estimate for the
activations and the input (weights excluded: they are allocated before the first mark). Ratio = estimate /
measured; above 1 is the safe side (the check refuses a little early, never lets an OOM through).

    PYTHONPATH=. python benchmarks/inference_memory.py [--rows yolov3:416:1,yolov3:608:2] [--out runs/mem.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("YOLO_COMPRESS_ASSETS", ROOT.parent / "shared" / "assets"))
DEFAULT_ROWS = "yolov3:416:1,yolov3:608:2,yolov4-tiny:416:1,yolov4-tiny:416:4,yolov4:416:1"


def _child(cfg: str, size: int, batch: int) -> dict:
    import torch

    from compress.darknet.cfg import read_cfg
    from compress.darknet.memory import inference_bytes
    from compress.darknet.model import build_model

    torch.set_num_threads(1)
    model = build_model(read_cfg(cfg)).eval()
    x = torch.rand(batch, 3, size, size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.no_grad():
        model(x)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    estimate, _ = inference_bytes(model.graph, (size, size), batch, 0)
    return {"measured_mib": round((peak - before) / 2**20, 1), "estimate_mib": round(estimate / 2**20, 1)}


def _cpu_flags() -> list[str]:
    """The SIMD flags that matter for these kernels, as /proc/cpuinfo lists them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in ("avx2", "avx512f", "avx512_vnni") if f in flags]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=DEFAULT_ROWS, help="cfg:size:batch,... (cfgs from the shared assets)")
    ap.add_argument("--out", default="runs/inference_memory.json")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], int(args.child[1]), int(args.child[2]))))
        return
    from tabulate import tabulate

    rows = []
    for spec in args.rows.split(","):
        name, size, batch = spec.split(":")
        cfg = ASSETS / "cfg" / f"{name}.cfg"
        out = subprocess.run([sys.executable, __file__, "--child", str(cfg), size, batch], check=True,
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
        r = json.loads(out.strip().splitlines()[-1])
        rows.append({"cfg": name, "size": int(size), "batch": int(batch), **r,
                     "ratio": round(r["estimate_mib"] / max(r["measured_mib"], 1e-9), 2)})
    print(tabulate(rows, headers="keys", tablefmt="github"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cpu_flags": _cpu_flags(), "rows": rows}, indent=1) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
