"""A shipped real-model recipe, run as a user runs it, then every stage measured (issue 23's README tables).

    python benchmarks/recipe_real.py --model yolov4-tiny --recipe recipes/yolov4-tiny-slim.yaml --work runs/v4t
    python benchmarks/recipe_real.py --model yolo-fastest-1.1 --recipe recipes/yolo-fastest-slim.yaml --work runs/yf
    # re-measure an earlier run without running it again
    python benchmarks/recipe_real.py --model yolov4-tiny --work runs/v4t --no-run

1. `data split` of COCO128 (96 train / 32 held out: sorted by file name, every 4th held out) into WORK/split;
2. `yolo-compress run RECIPE --set model.cfg=... --set model.weights=... --set data=WORK/split/split.data
   --out WORK/run` (wall time and the CPU time of the run's processes are recorded);
3. every stage's saved model (the official pair, each model-producing step's pair, the int8 ONNX of `quantize`)
   evaluated by `yolo-compress eval` on all 128 images and on the held-out 32, at the cfg's size;
4. the original and the final Darknet pair timed by `yolo-compress benchmark` on onnxruntime, OpenVINO and ncnn
   (1 thread): the latency ratio against the GFLOPs ratio (goal <= 1.15x).
COCO128 is 128 COCO *train2017* images: the "all 128" figure includes the 96 images the recipe trained on.
Prints tabulate tables and writes WORK/recipe_real.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner
from tabulate import tabulate

from compress import read_cfg
from compress.base.fileio import write_text_atomic
from compress.cli import cli
from compress.quant.cpuinfo import cpu_flags

ASSETS = Path(os.environ.get("YOLO_COMPRESS_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
COCO128 = ASSETS / "data" / "coco128" / "images" / "train2017"
RUNTIMES = ("onnx", "openvino", "ncnn")


def _cli(args: list[str]) -> None:
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    if res.exit_code:
        raise SystemExit(f"yolo-compress {' '.join(args)} failed:\n{res.output}")


def _report(args: list[str], path: Path) -> dict:
    _cli(args + ["--report", str(path)])
    return json.loads(path.read_text())


def split(work: Path) -> Path:
    folder = work / "split"
    if not (folder / "split.data").is_file():
        _cli(["data", "split", "--data", str(COCO128), "--out", str(folder)])
    return folder


def run_recipe(recipe: Path, cfg: Path, weights: Path, data: Path, out: Path, sets: list[str]) -> dict:
    """The recipe in a child process (as a user runs it); wall and CPU seconds of it."""
    args = [sys.executable, "-m", "compress", "run", str(recipe), "--out", str(out), "--set", f"model.cfg={cfg}",
            "--set", f"model.weights={weights}", "--set", f"data={data}"]
    for s in sets:
        args += ["--set", s]
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(args, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"wall_s": round(time.perf_counter() - t0), "cpu_s": round(cpu)}


def stages(cfg: Path, weights: Path, run: Path) -> list[dict]:
    """(stage, cfg, weights) of the input model, each step's saved pair and the int8 ONNX, in order."""
    rows = [{"stage": "original", "cfg": str(cfg), "weights": str(weights)}]
    for step in sorted(p for p in run.iterdir() if p.is_dir() and (p / "report.json").is_file()):
        report = json.loads((step / "report.json").read_text())
        if report.get("cfg") and str(report.get("weights", "")).endswith(".weights"):
            rows.append({"stage": step.name, "cfg": report["cfg"], "weights": report["weights"],
                         "params": report.get("params"), "report": report})
        if report.get("onnx") and step.name.endswith("quantize"):
            rows.append({"stage": step.name + " int8 ONNX", "cfg": None, "weights": report["onnx"],
                         "model_cfg": report["cfg"]})
    return rows


def evaluate_stage(row: dict, size: int, work: Path, split_dir: Path) -> dict:
    out = {}
    for key, data in (("all", split_dir / "all.data"), ("held_out", split_dir / "split.data")):
        args = ["eval", "--weights", row["weights"], "--data", str(data), "--img-size", str(size), "--no-progress"]
        args += ["--cfg", row["cfg"] or row["model_cfg"]]  # an exported model: its weights name the format
        r = _report(args, work / "eval.json")
        out.update({f"map50_{key}": round(r["map50"], 4), f"map50_95_{key}": round(r["map50_95"], 4)})
    cfg = row["cfg"] or row.get("model_cfg")
    if cfg:
        r = _report(["info", "--cfg", cfg, "--img-size", str(size)], work / "info.json")
        out.update({"params": r.get("params"), "gflops": round(r["gflops"], 4)})
    return out


def latency(cfg: str, weights: str, size: int, data: Path, work: Path, threads: int) -> dict[str, float | None]:
    r = _report(["benchmark", "--cfg", cfg, "--weights", weights, "--data", str(data), "--img-size", str(size),
                 "--formats", ",".join(RUNTIMES), "--threads", str(threads)], work / "bench.json")
    return {row["format"]: row.get("latency_ms") for row in r["rows"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="yolov4-tiny | yolo-fastest-1.1 (official pair in assets)")
    ap.add_argument("--recipe", type=Path)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="More recipe --set KEY=VALUE.")
    ap.add_argument("--no-run", action="store_true", help="Measure the stages of an earlier run in WORK/run.")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    cfg, weights = ASSETS / "weights" / f"{args.model}.cfg", ASSETS / "weights" / f"{args.model}.weights"
    size = read_cfg(cfg).width
    args.work.mkdir(parents=True, exist_ok=True)
    split_dir = split(args.work)
    result = {"model": args.model, "img_size": size, "recipe": str(args.recipe), "sets": args.sets, "cpu": cpu_flags()}
    if not args.no_run:
        result["time"] = run_recipe(args.recipe, cfg, weights, split_dir / "split.data", args.work / "run", args.sets)
        write_text_atomic(args.work / "recipe_time.json", json.dumps(result["time"]) + "\n")
    elif (args.work / "recipe_time.json").is_file():
        result["time"] = json.loads((args.work / "recipe_time.json").read_text())
    rows = stages(cfg, weights, args.work / "run")
    for row in rows:
        row.update(evaluate_stage(row, size, args.work, split_dir))
        print(row["stage"], {k: v for k, v in row.items() if k.startswith("map")}, flush=True)
    final = [r for r in rows if r["cfg"]][-1]
    timing = {name: latency(r["cfg"], r["weights"], size, split_dir / "split.data", args.work, args.threads)
              for name, r in (("original", rows[0]), ("final", final))}
    flops_ratio = final["gflops"] / rows[0]["gflops"]
    result["latency"] = {rt: {"original_ms": timing["original"][rt], "final_ms": timing["final"][rt],
                              "latency_ratio": _ratio(timing["final"][rt], timing["original"][rt]),
                              "vs_flops_ratio": _ratio(_ratio(timing["final"][rt], timing["original"][rt]),
                                                       flops_ratio)} for rt in RUNTIMES}
    result["flops_ratio"] = round(flops_ratio, 4)
    result["stages"] = [{k: v for k, v in r.items() if k != "report"} for r in rows]
    keys = ["stage", "params", "gflops", "map50_all", "map50_95_all", "map50_held_out", "map50_95_held_out"]
    print(tabulate([[r.get(k) for k in keys] for r in rows], headers=keys, tablefmt="github"))
    print(tabulate([[rt, *v.values()] for rt, v in result["latency"].items()],
                   headers=["runtime", "original ms", "final ms", "latency ratio", "/ FLOPs ratio"], tablefmt="github"))
    print(f"FLOPs ratio {flops_ratio:.3f}; time {result.get('time')}; CPU {result['cpu']}")
    write_text_atomic(args.work / "recipe_real.json", json.dumps(result, indent=2, default=str) + "\n")


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 4)


if __name__ == "__main__":
    main()
