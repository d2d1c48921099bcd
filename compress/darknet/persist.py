"""Public load/save: Darknet cfg + `.weights` pairs, and self-describing `.pt` checkpoints."""
from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from compress.darknet.cfg import Cfg, format_cfg, parse_cfg, read_cfg, write_cfg
from compress.base.errors import WeightsError
from compress.base.fileio import atomic_files, atomic_write, require_regular
from compress.darknet.finite import check_finite_weights
from compress.darknet.model import DarknetModel, build_model
from compress.darknet.weights import read_weights, write_weights

__all__ = ["load", "save", "pair_paths", "save_checkpoint", "read_checkpoint", "is_exported", "EXPORTED_SUFFIXES"]

# The file types of exported models (ONNX, OpenVINO IR, ncnn): `load` refuses them, and
# compress.deploy.runtimes.RUNTIMES keys its runtimes by exactly these (it sits above this module and imports it).
EXPORTED_SUFFIXES = (".onnx", ".xml", ".param")


def is_exported(path: str | os.PathLike | None) -> bool:
    """Whether `path` names an exported model (as opposed to Darknet .weights or a .pt checkpoint)."""
    return path is not None and Path(path).suffix.lower() in EXPORTED_SUFFIXES


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A yolo-compress `.pt`, unpickled with weights_only=True: a pickle that names any code (not tensors and
    plain containers) is refused without running it."""
    path = require_regular(path, "--weights", WeightsError)
    if not path.is_file():
        raise WeightsError(f"{path}: checkpoint not found; pass an existing --weights")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found is None:
            raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({_first_line(exc)})") from None
        raise WeightsError(f"{path}: refused: the file holds Python objects other than tensors and plain data "
                           f"({found.group(1)}), which loading could run; only checkpoints written by yolo-compress "
                           "(or plain state dicts) are loaded; convert it with a trusted script") from None
    except Exception as exc:  # torch raises many types for corrupt files
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({exc.__class__.__name__}: "
                           f"{_first_line(exc)})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) \
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["model"].items()):
        raise WeightsError(f"{path}: not a yolo-compress checkpoint (expected a dict whose 'model' is a state "
                           f"dict of tensors, found {_describe(ckpt)}); pass a .pt written by yolo-compress or a "
                           "Darknet .weights")
    return ckpt


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else exc.__class__.__name__


def _describe(ckpt: object) -> str:
    if isinstance(ckpt, dict):
        return "a dict with " + (", ".join(f"{k!r}: {type(v).__name__}" for k, v in list(ckpt.items())[:4]) or
                                 "no entries")
    return f"a {type(ckpt).__name__}"


def _plain(value: object) -> object:
    """numpy arrays/scalars (e.g. RNG states) -> tensors/Python numbers, so weights_only loading accepts them."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.astype(np.int64) if value.dtype == np.uint32 else value.copy())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def load(cfg: str | os.PathLike | Cfg | None, weights: str | os.PathLike | None = None,
         device: str | torch.device = "cpu", cutoff: int | None = None) -> DarknetModel:
    """Build a model from a cfg and load `.weights` (Darknet) or `.pt` (checkpoint) into it.

    Example:
        >>> model = compress.load("yolov4-tiny.cfg", "yolov4-tiny.weights")
    `cfg` may be None when `weights` is a `.pt` checkpoint, which embeds its cfg text.
    """
    if is_exported(weights):
        raise WeightsError(f"{weights}: an exported model; `eval --weights` runs it, every other command needs "
                           "the Darknet .weights (or .pt checkpoint) it was exported from")
    ckpt = None
    if weights is not None and str(weights).endswith((".pt", ".pth")):
        ckpt = read_checkpoint(weights)
    if cfg is None:
        if ckpt is None or "cfg" not in ckpt:
            raise WeightsError("no --cfg given and the weights do not embed one; pass --cfg")
        cfg = parse_cfg(ckpt["cfg"], f"{weights}#cfg")
    elif not isinstance(cfg, Cfg):
        cfg = read_cfg(cfg)
    model = build_model(cfg)
    if ckpt is not None:
        _load_state(model, ckpt["model"], weights)
        model.header = tuple(ckpt.get("header", model.header))
    elif weights is not None:
        read_weights(weights, model, cutoff)
    if weights is not None:  # every figure computed from NaN weights would be made up
        check_finite_weights(model, weights)
    return model.to(device).eval()


def _load_state(model: DarknetModel, state: dict, path) -> None:
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise WeightsError(f"{path}: {key} has shape {tuple(value.shape)} but the cfg builds "
                               f"{tuple(own[key].shape)}; use the cfg this checkpoint was saved with")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{path}: checkpoint does not fit the cfg (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}); use the cfg this checkpoint was saved with")


def save_checkpoint(model: DarknetModel, path: str | os.PathLike, **extra: object) -> None:
    """A `.pt` that embeds the cfg text, so it is self-describing."""
    payload = {"cfg": format_cfg(model.cfg), "model": model.state_dict(), "header": model.header,
               **_plain(extra)}
    buf = io.BytesIO()
    torch.save(payload, buf)
    with atomic_write(path, "wb") as fh:
        fh.write(buf.getvalue())


def pair_paths(folder: str | os.PathLike, stem: str) -> tuple[Path, Path]:
    """The Darknet pair `folder/stem.cfg` + `folder/stem.weights` (how every command names its output model)."""
    return Path(folder) / f"{stem}.cfg", Path(folder) / f"{stem}.weights"


def save(model: DarknetModel, cfg_path: str | os.PathLike, weights_path: str | os.PathLike) -> None:
    """Write the model as a Darknet pair (or a `.pt` checkpoint when weights_path ends in .pt)."""
    model = getattr(model, "module", model)
    if hasattr(model, "to_darknet"):  # e.g. a quantization-aware model folds itself first
        model = model.to_darknet()
    # both files or neither: a cfg without its weights (a full disk) would look like a whole model; the cfg
    # is renamed last, so a cfg on disk always has its weights beside it
    with atomic_files(weights_path, cfg_path) as (weights_tmp, cfg_tmp):
        write_cfg(model.cfg, cfg_tmp)
        if str(weights_path).endswith((".pt", ".pth")):
            save_checkpoint(model, weights_tmp)
        else:
            write_weights(weights_tmp, model)
