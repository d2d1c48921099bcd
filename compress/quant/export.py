"""Integer view of a quantized model: `quant.json` (per layer bits, scales, zero points, pow2 exponents,
activation ranges) and `weights_int.npz` (integer weight codes, per-channel scales, float biases)."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import torch

from compress.base.fileio import write_bytes_atomic, write_text_atomic
from compress.quant.config import config_to_dict
from compress.quant.fake_quant import ActQuant, QParams, pow2_exponent
from compress.quant.modules import QConvBNAct, QuantOut

__all__ = ["quant_layers", "write_quant_json", "write_int_weights", "code_dtype"]


def code_dtype(codes: torch.Tensor) -> np.dtype:
    """Smallest signed container for the codes (int8 unless DoReFa 8-bit odd codes need int16)."""
    return np.dtype(np.int8) if int(codes.abs().max()) <= 127 else np.dtype(np.int16)


def _act(q: ActQuant | None) -> dict | None:
    return q.to_dict() if q is not None and bool(q.initialized) else None


def _weight_entry(q: QConvBNAct) -> dict:
    f = q.folded()
    qp: QParams = f.w_qp
    entry = {"scheme": q.spec.w_scheme, "bits": q.spec.w_bits, "per_channel": q.spec.per_channel,
             "levels": 2 ** q.spec.w_bits, "qmin": qp.qmin, "qmax": qp.qmax, "scale": qp.scale.tolist(),
             "zero_point": 0, "dtype": code_dtype(f.codes).name}
    if q.spec.pow2:
        entry["exponent"] = pow2_exponent(qp.scale).tolist()
    return entry


def quant_layers(model: torch.nn.Module) -> list[dict]:
    """One dict per quantized layer, in layer order."""
    rows = []
    for i, layer in enumerate(model.layers):
        if isinstance(layer, QConvBNAct):
            rows.append({"layer": i, "type": "convolutional", "weight": _weight_entry(layer),
                         "input": _act(layer.in_quant), "pre_activation": _act(layer.pre_quant),
                         "output": _act(layer.act_quant)})
        elif isinstance(layer, QuantOut):
            rows.append({"layer": i, "type": model.cfg.blocks[i].type, "output": _act(layer.source),
                         "shares_input_grid": layer.quant is None})
    return rows


def write_quant_json(model: torch.nn.Module, path: str | os.PathLike, extra: dict | None = None) -> Path:
    doc = {"format": "yolo-compress-quant/1", "config": config_to_dict(model.qconfig),
           "conventions": "x = (q - zero_point) * scale; exponent n means scale = 2^-n; weights signed, "
                          "zero point 0, per output channel; activations per tensor, unsigned with a zero point "
                          "(act_scheme asymmetric) or signed with zero point 0 (symmetric)",
           **(extra or {}), "layers": quant_layers(model)}
    write_text_atomic(path, json.dumps(doc, indent=1) + "\n")
    return Path(path)


def write_int_weights(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """`layer{i}.codes` (int8/int16, OIHW), `layer{i}.scale` (float32 per out channel), `layer{i}.bias` (float32)."""
    arrays: dict[str, np.ndarray] = {}
    for i, layer in enumerate(model.layers):
        if isinstance(layer, QConvBNAct):
            f = layer.folded()
            arrays[f"layer{i}.codes"] = f.codes.cpu().numpy().astype(code_dtype(f.codes))
            arrays[f"layer{i}.scale"] = f.w_qp.scale.cpu().numpy().astype(np.float32)
            arrays[f"layer{i}.bias"] = f.bias.cpu().numpy().astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())
    return Path(path)
