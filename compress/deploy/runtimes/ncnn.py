"""ncnn: convert an exported ONNX graph with pnnx to .param + .bin, and run it with the ncnn Python runtime.

pnnx writes its intermediate files next to its input; the conversion runs in a temporary folder and only the
ncnn pair is moved into the output folder. `half` stores fp16 weights (pnnx `fp16=1`): ncnn then computes in
fp16 where the CPU has fp16 arithmetic (ARMv8.2) and converts to fp32 elsewhere (x86).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from compress.base.errors import ExportError
from compress.deploy.runtimes.predictor import read_metadata, run_per_image

__all__ = ["NcnnPredictor", "to_ncnn"]


def to_ncnn(onnx_model: bytes, param_path: str | os.PathLike, img_hw: tuple[int, int], half: bool = False) -> Path:
    """Convert ONNX bytes (fixed input 1x3xHxW) to `param_path` and the .bin beside it."""
    import pnnx  # optional extra (pip install pnnx): only the ncnn export needs it

    param_path = Path(param_path)
    with tempfile.TemporaryDirectory(prefix="pnnx-") as tmp:
        src = Path(tmp) / "model.onnx"
        src.write_bytes(onnx_model)
        cmd = [pnnx.EXEC_PATH, str(src), f"inputshape=[1,3,{img_hw[0]},{img_hw[1]}]", f"fp16={int(half)}",
               f"ncnnparam={tmp}/model.param", f"ncnnbin={tmp}/model.bin"]
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if proc.returncode or not (Path(tmp) / "model.param").is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ExportError(f"{param_path}: pnnx could not convert the model to ncnn (exit {proc.returncode}: "
                              f"{tail[0]})")
        shutil.move(f"{tmp}/model.bin", param_path.with_suffix(".bin"))
        shutil.move(f"{tmp}/model.param", param_path)
    return param_path


def _blob_names(param: Path) -> tuple[str, str]:
    """(input blob, output blob): the Input layer's top and the last layer's single top."""
    lines = [ln.split() for ln in param.read_text().splitlines()[2:] if ln.strip()]
    inp = next((ln[4 + int(ln[2])] for ln in lines if ln[0] == "Input"), None)
    last = lines[-1] if lines else None
    if inp is None or last is None or int(last[3]) != 1:
        raise ExportError(f"{param}: expected one Input layer and one output blob; re-export with "
                          f"`yolo-compress export --format ncnn`")
    return inp, last[4 + int(last[2])]


class NcnnPredictor:
    """Callable (N,3,H,W) float tensor in [0,1] -> (N, boxes, 5+C); runs image by image (ncnn has no batch)."""

    def __init__(self, path: str | os.PathLike, threads: int = 1) -> None:
        import ncnn  # optional extra (pip install ncnn): imported only when a .param model is loaded

        path = Path(path)
        if not path.with_suffix(".bin").is_file():
            raise ExportError(f"{path}: its weights {path.with_suffix('.bin').name} are missing beside it")
        self.net = ncnn.Net()
        self.net.opt.num_threads = max(1, int(threads))
        self.net.opt.use_vulkan_compute = False
        self.net.opt.openmp_blocktime = 0  # no spin-waiting: on a shared/oversubscribed CPU spinning costs 2-3x
        if self.net.load_param(str(path)) or self.net.load_model(str(path.with_suffix(".bin"))):
            raise ExportError(f"{path}: ncnn cannot load it; re-export with `yolo-compress export --format ncnn`")
        self.input, self.output = _blob_names(path)
        hw = read_metadata(path).get("img_size")
        self.img_hw = tuple(hw) if hw else None
        self._mat = ncnn.Mat

    def _infer(self, x: np.ndarray) -> list[np.ndarray]:
        with self.net.create_extractor() as ex:
            ex.input(self.input, self._mat(x[0]).clone())
            ret, out = ex.extract(self.output)
            if ret:
                raise ExportError(f"ncnn failed to compute {self.output} (code {ret})")
            return [np.array(out)[None]]

    def run(self, imgs: torch.Tensor) -> list[np.ndarray]:
        return run_per_image(self._infer, imgs)

    def __call__(self, imgs: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(imgs)[0])
