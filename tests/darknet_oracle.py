"""Darknet's own `forward_yolo_layer` as a test oracle: builds tests/darknet_harness/harness.c with `cc`.

The harness links Darknet's src/yolo_layer.c, box.c, blas.c, activations.c, utils.c, list.c and option_list.c
(CPU; no OpenMP, OpenCV or CUDA) from ../shared/assets/darknet and the [yolo] parsing functions cut verbatim
out of its src/parser.c, so the cfg keys are read by Darknet's code too. It is built once into
.pytest_cache/darknet_harness/<hash of every input> (atomically, so parallel workers agree). Without the
assets or a compiler the test skips locally and fails under CI=true.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, require_assets

HARNESS = Path(__file__).resolve().parent / "darknet_harness" / "harness.c"
SOURCES = ("yolo_layer.c", "box.c", "blas.c", "activations.c", "utils.c", "list.c", "option_list.c")
CACHE = ROOT / ".pytest_cache" / "darknet_harness"


def _missing(msg: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg + " (CI=true: the Darknet oracle is required)")
    pytest.skip(msg)


def _parse_yolo_source(parser_c: str) -> str:
    """`size_params` and parse_yolo_mask .. parse_yolo (up to parse_gaussian_yolo_mask) out of parser.c."""
    lines = parser_c.splitlines()
    start = lines.index("typedef struct size_params{")
    end = lines.index("} size_params;")
    first = next(k for k, s in enumerate(lines) if s.startswith("int *parse_yolo_mask("))
    stop = next(k for k, s in enumerate(lines) if s.startswith("int *parse_gaussian_yolo_mask("))
    return "\n".join(lines[start:end + 1] + [""] + lines[first:stop]) + "\n"


def harness() -> Path:
    """Path of the built harness (built on first use)."""
    darknet = require_assets() / "darknet"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        _missing("no C compiler (cc) to build the Darknet harness")
    src = darknet / "src"
    extract = _parse_yolo_source((src / "parser.c").read_text(errors="replace"))
    digest = hashlib.sha256(HARNESS.read_bytes() + extract.encode())
    for name in SOURCES:
        digest.update((src / name).read_bytes())
    out = CACHE / digest.hexdigest()[:16] / "harness"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        (Path(tmp) / "parse_yolo_extract.c").write_text(extract)
        cmd = [cc, "-O2", "-w", "-std=gnu99", f"-I{darknet / 'include'}", f"-I{src}", f"-I{tmp}", str(HARNESS),
               *(str(src / s) for s in SOURCES), "-lm", "-lpthread", "-o", str(Path(tmp) / "harness")]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            pytest.fail(f"building the Darknet harness failed:\n{' '.join(cmd)}\n{run.stderr[-3000:]}")
        os.replace(Path(tmp) / "harness", out)
    return out


def yolo_block_text(block) -> str:
    return "\n".join(f"{k}={v}" for k, v in block.options) + "\n"


def darknet_delta(block, head: torch.Tensor, targets: torch.Tensor, img_hw: tuple[int, int]) -> torch.Tensor:
    """l.delta of Darknet's forward_yolo_layer for one [yolo] block, head map (N, A, H, W, 5+C) (the conv's
    output: logits, or probabilities with new_coords) and targets (M, 6) [image, class, x, y, w, h]."""
    n, na, h, w, ch = head.shape
    exe = harness()
    max_boxes = block.get_int("max", 200)  # l.truths = max * 6 floats per image
    truth = np.zeros((n, max_boxes, 6), np.float32)
    for b in range(n):
        rows = targets[targets[:, 0] == b]
        for k, r in enumerate(rows[:max_boxes].tolist()):
            truth[b, k, :5] = [r[2], r[3], r[4], r[5], r[1]]
    maps = head.detach().float().permute(0, 1, 4, 2, 3).contiguous().numpy()  # Darknet: [b][a][entry][y][x]
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "layer.txt").write_text(f"{n} {w} {h} {img_hw[1]} {img_hw[0]}\n" + yolo_block_text(block))
        maps.tofile(t / "in.bin")
        truth.tofile(t / "truth.bin")
        run = subprocess.run([str(exe), str(t / "layer.txt"), str(t / "in.bin"), str(t / "truth.bin"),
                              str(t / "out.bin")], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        delta = np.fromfile(t / "out.bin", np.float32).reshape(n, na, ch, h, w)
    return torch.from_numpy(delta).permute(0, 1, 3, 4, 2).contiguous()
