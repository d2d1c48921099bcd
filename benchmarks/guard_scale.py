"""The output guard on a large dataset: seconds to list a dataset's files (`dataset_files`: the .data's lists
and names, each image and its label) and to check a command's outputs against all of them
(`check_job_paths`), for N images.

Since issue #27 every image and label a command reads is an input of the guard (and of a recipe's manifest,
as a fingerprint). The images are empty files (the guard never decodes them); the job is `eval --data X.data
--json OUT/d.json --report OUT/r.json`, which the guard passes. Wall-clock seconds, best of `--repeat`.

    PYTHONPATH=. python benchmarks/guard_scale.py [--n 1000,20000,100000] [--repeat 2] [--quick] [--out runs/guard.json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

from compress.base.guard import check_job_paths
from compress.jobs import job_paths
from compress.jobs.inspect import EvalJob
from compress.jobs.training import dataset_files
from compress.recipe.runner import dataset_fingerprint


def make_dataset(root: Path, n: int) -> Path:
    """root/images/train/NNNNNN.jpg (empty) + labels, a list file, names and a .data."""
    images, labels = root / "images" / "train", root / "labels" / "train"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    names = []
    for i in range(n):
        (images / f"{i:06d}.jpg").touch()
        (labels / f"{i:06d}.txt").write_text("0 0.5 0.5 0.1 0.1\n")
        names.append(f"images/train/{i:06d}.jpg")
    (root / "train.txt").write_text("\n".join(names) + "\n")
    (root / "x.names").write_text("a\n")
    data = root / "x.data"
    data.write_text("classes = 1\ntrain = train.txt\nvalid = train.txt\nnames = x.names\n")
    return data


def best_of(repeat: int, fn) -> tuple[float, object]:
    best, value = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t)
    return best, value


def measure(n: int, repeat: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "ds", n)
        out = Path(tmp) / "out"
        job = EvalJob(cfg=None, weights=None, data=data, json_path=out / "d.json")
        list_s, files = best_of(repeat, lambda: dataset_files(data))
        guard_s, _ = best_of(repeat, lambda: check_job_paths(job_paths(job, out / "r.json")))
        print_s, _ = best_of(repeat, lambda: dataset_fingerprint(files))
        return {"images": n, "files": len(files), "dataset_files_s": round(list_s, 3),
                "guard_total_s": round(guard_s, 3), "manifest_fingerprint_s": round(print_s, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="1000,20000,100000", help="dataset sizes (images), comma-separated")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1,000 and 20,000 images only")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    sizes = "1000,20000" if args.quick else args.n
    rows = [measure(int(n), args.repeat) for n in sizes.split(",")]
    print(tabulate(rows, headers="keys", tablefmt="github"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
