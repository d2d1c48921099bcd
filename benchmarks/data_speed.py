"""Data pipeline speed per CPU core: decode, decode + resize, full augmentation (with and without mosaic),
with and without the RAM cache, at 416; and the DataLoader workers needed to feed a given GPU step rate.

One process, one thread (torch and OpenCV), COCO128 images, items exactly as the trainer gets them (uint8
CHW tensors since issue 15's second round; float CHW before: the float conversion now runs on the device,
in `to_input`, and is not counted). Rates are images per CPU-second of the measuring process (system time
included), which is img/s on one idle core and stays put while other processes load the machine. The
DataLoader row runs one worker process and adds the CPU time of both processes (decode + augmentation in
the worker, batching and the transfer of items between them). `--compare-to DIR` also runs the rows the
package at DIR supports (e.g. an older checkout's `compress/`) in a subprocess, for a before/after ratio
measured under the same load. Both versions run in fresh child processes, row by row in the same order;
each round runs both back to back, and the table gives the ratio of the best rates and the median and
range of the rounds' own ratios (the machine's noise moves single rates by +-3-5%).

    PYTHONPATH=. python benchmarks/data_speed.py [--n 64] [--size 416] [--gpu-rates 200,500,1000]
        [--compare-to /tmp/base] [--repeat 2] [--out runs/data_speed.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("YOLO_COMPRESS_ASSETS", ROOT.parent / "shared" / "assets"))
IMAGES = ASSETS / "data" / "coco128" / "images" / "train2017"


def _rate(fn, n: int, passes: int = 2) -> float:
    """Best of `passes` passes over n items, after one warm-up item (imports, first allocation)."""
    fn(0)
    best = 0.0
    for _ in range(passes):
        t = time.process_time()
        for i in range(n):
            fn(i)
        best = max(best, n / (time.process_time() - t))
    return best


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a live process, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _loader_rate(ds, collate, passes: int = 2) -> float:
    """Images per CPU-second of one persistent DataLoader worker + this process (batches of 16), after a
    warm-up pass (the worker's start is not counted)."""
    from torch.utils.data import DataLoader
    loader = DataLoader(ds, batch_size=16, num_workers=1, collate_fn=collate, persistent_workers=True)
    for _ in loader:  # warm-up: fork, first allocations
        pass
    pid = loader._iterator._workers[0].pid
    t, w = time.process_time(), _proc_cpu(pid)
    n = sum(len(batch[0]) for _ in range(passes) for batch in loader)
    spent = time.process_time() - t + _proc_cpu(pid) - w
    del loader
    gc.collect()
    return n / spent


def standard_augment(path: Path, size: int, rng) -> "torch.Tensor":
    """The field's standard OpenCV augmentation, written here independently of `compress` (as Ultralytics'
    load_image + random_perspective + augment_hsv + fliplr): imread, resize the long side to `size`, one
    warpAffine (scale 0.5-1.5, translate 0.1) into size x size, HSV jitter by lookup tables, horizontal flip,
    uint8 CHW tensor. The yardstick the issue names ("as fast as the standard one in this field")."""
    import cv2
    import numpy as np
    import torch
    img = cv2.imread(str(path))
    h, w = img.shape[:2]
    r = size / max(h, w)
    img = cv2.resize(img, (round(w * r), round(h * r)), interpolation=cv2.INTER_LINEAR)
    s = rng.uniform(0.5, 1.5)
    m = cv2.getRotationMatrix2D((img.shape[1] / 2, img.shape[0] / 2), 0.0, s)
    m[0, 2] += size / 2 - img.shape[1] / 2 + rng.uniform(-0.1, 0.1) * size
    m[1, 2] += size / 2 - img.shape[0] / 2 + rng.uniform(-0.1, 0.1) * size
    img = cv2.warpAffine(img, m, (size, size), borderValue=(114, 114, 114))
    gain = rng.uniform(-1, 1, 3) * (0.015, 0.7, 0.4) + 1
    hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=np.int16)
    lut_h = ((x * gain[0]) % 180).astype(np.uint8)
    lut_s = np.clip(x * gain[1], 0, 255).astype(np.uint8)
    lut_v = np.clip(x * gain[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if rng.random() < 0.5:
        img = np.fliplr(img)
    return torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1)))


def measure(n: int, size: int) -> dict[str, float]:
    """img/s per core of each stage the installed `compress` supports (rows it lacks are left out)."""
    import torch
    torch.set_num_threads(1)
    from compress.data.augment import AugmentConfig
    from compress.data.dataset import DetectionDataset, list_images

    images = list_images(IMAGES)[:n]
    rows: dict[str, float] = {}
    import cv2
    import numpy as np
    cv2.setNumThreads(1)
    # yardsticks independent of `compress`: the same in both columns of a --compare-to run
    rows["decode: OpenCV imread (reference, not ours)"] = _rate(lambda i: cv2.imread(str(images[i % n])), n)
    rng = np.random.default_rng(0)
    rows["standard OpenCV augmentation (reference, not ours)"] = _rate(
        lambda i: standard_augment(images[i % n], size, rng), n)
    try:
        import compress
        from compress.data import imageio
        if Path(imageio.__file__).parent != Path(compress.__file__).parent:
            raise ImportError("an older package: its `compress` lacks imageio (an editable install supplies ours)")
        decode_bgr, fit_image = imageio.decode_bgr, imageio.fit_image
        rows["decode (decode_bgr)"] = _rate(lambda i: decode_bgr(images[i % n]), n)
        rows["decode + resize"] = _rate(lambda i: fit_image(decode_bgr(images[i % n]), size, False), n)
    except ImportError:  # an older package: PIL decode
        from compress.data.dataset import letterbox, load_image
        rows["decode (decode_bgr)"] = _rate(lambda i: load_image(images[i % n]), n)  # PIL there
        rows["decode + resize"] = _rate(lambda i: letterbox(load_image(images[i % n]), size), n)
    for label, kw in [("eval item (no augmentation)", {}),
                      ("full augmentation", {"augment": True, "aug": AugmentConfig()}),
                      ("full augmentation + mosaic", {"augment": True, "aug": AugmentConfig(mosaic=1.0)})]:
        ds = DetectionDataset(images, size, **kw)
        rows[label] = _rate(lambda i: ds[i % n], n)
        try:
            cached = DetectionDataset(images, size, cache="ram", **kw)
        except TypeError:
            continue  # no cache in this version
        rows[f"{label}, RAM cache"] = _rate(lambda i: cached[i % n], n)
    from compress.data.dataset import collate
    rows["full augmentation, 1 DataLoader worker"] = _loader_rate(
        DetectionDataset(images, size, augment=True, aug=AugmentConfig()), collate)
    return rows


def _compare(path: str, n: int, size: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": path}
    out = subprocess.run([sys.executable, __file__, "--child", "--n", str(n), "--size", str(size)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _best(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: max(a.get(k, 0.0), v) for k, v in b.items()}


def _spread(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="COCO128 images per row")
    ap.add_argument("--size", type=int, default=416)
    ap.add_argument("--gpu-rates", default="200,500,1000", help="GPU img/s to feed (comma separated)")
    ap.add_argument("--compare-to", help="PYTHONPATH of another compress package (before/after)")
    ap.add_argument("--out", "--json", dest="json", default="runs/data_speed.json", help="JSON output")
    ap.add_argument("--repeat", type=int, default=2, help="alternating rounds (best of)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.n, args.size)))
        return
    from tabulate import tabulate

    before: dict[str, float] = {}
    after: dict[str, float] = {}
    paired: dict[str, list[float]] = {}  # per round: this version / --compare-to, measured back to back
    for _ in range(args.repeat):  # alternate and keep each row's best: the machine's load varies
        b = _compare(args.compare_to, args.n, args.size) if args.compare_to else {}
        a = _compare(str(ROOT), args.n, args.size)  # a fresh process too: same conditions
        before, after = _best(before, b), _best(after, a)
        for k in b:
            paired.setdefault(k, []).append(a[k] / b[k])
    headers = ["stage (one core, img/s)", "this version",
               *(["--compare-to", "ratio", "paired rounds: median [min-max]"] if before else [])]
    table = [[k, f"{v:.1f}", *([f"{before[k]:.1f}", f"{v / before[k]:.1f}x", _spread(paired[k])] if before else [])]
             for k, v in after.items() if not before or k in before]
    table += [[k, f"{v:.1f}", *(["-", "-", "-"] if before else [])]
              for k, v in after.items() if before and k not in before]
    print(tabulate(table, headers=headers, tablefmt="github"))
    rates = [float(r) for r in args.gpu_rates.split(",") if r]
    need = [[f"{r:.0f}", *[math.ceil(r / after[k]) for k in ("full augmentation", "full augmentation + mosaic",
                                                              "full augmentation + mosaic, RAM cache")]]
            for r in rates]
    print()
    print(tabulate(need, headers=["GPU img/s", "workers: full aug", "full aug + mosaic", "mosaic + RAM cache"],
                   tablefmt="github"))
    print("\n(workers = GPU rate / per-core rate, assuming one core per worker; the machine's load at the time "
          "of measurement changes these figures, the ratios less)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"size": args.size, "images": args.n, "img_per_s_per_core": after,
                                           "compare_to": before, "paired_ratios": paired, "workers_needed": need},
                                          indent=1) + "\n")


if __name__ == "__main__":
    main()
