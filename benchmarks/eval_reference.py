"""Full-COCO128 figures of the eval-geometry check: our `evaluate` (cfg geometry: plain resize) vs the
independent OpenCV-Darknet + pycocotools reference of tests/test_evaluate.py, plus our letterboxed figure.

    PYTHONPATH=. python benchmarks/eval_reference.py [--n 128] [--json runs/eval_reference.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tabulate import tabulate

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from compress.detection.evaluate import EvalConfig, evaluate  # noqa: E402
from compress.darknet.persist import load  # noqa: E402
from conftest import ASSETS  # noqa: E402
from test_evaluate import _reference_map  # noqa: E402

MODELS = [("yolov4-tiny", 416), ("yolo-fastest-1.1", 320)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--json", default="runs/eval_reference.json")
    args = ap.parse_args()
    images = sorted((ASSETS / "data" / "coco128" / "images" / "train2017").glob("*.jpg"))[:args.n]
    rows = []
    for name, size in MODELS:
        cfg, weights = ASSETS / "weights" / f"{name}.cfg", ASSETS / "weights" / f"{name}.weights"
        with tempfile.TemporaryDirectory() as tmp:
            ref = _reference_map(cfg, weights, images, size, Path(tmp))
        model = load(cfg, weights)
        figures = {}
        for lb in (False, True):
            r = evaluate(model, images, EvalConfig(img_size=size, workers=0, progress=False, letterbox=lb))
            figures[lb] = (r.map50, r.map50_95)
        rows.append({"model": name, "size": size, "images": len(images), "ref_map50": ref[0],
                     "ref_map50_95": ref[1], "ours_plain_map50": figures[False][0],
                     "ours_plain_map50_95": figures[False][1], "ours_letterbox_map50": figures[True][0],
                     "ours_letterbox_map50_95": figures[True][1]})
    print(tabulate([[r["model"], r["size"], f"{r['ref_map50']:.4f}", f"{r['ours_plain_map50']:.4f}",
                     f"{r['ref_map50_95']:.4f}", f"{r['ours_plain_map50_95']:.4f}",
                     f"{r['ours_letterbox_map50']:.4f}"] for r in rows], tablefmt="github",
                   headers=["model", "size", "OpenCV ref mAP@.5", "ours mAP@.5", "ref mAP@.5:.95",
                            "ours mAP@.5:.95", "ours letterboxed mAP@.5"]))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
