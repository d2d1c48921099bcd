"""Quantization: `prepare_qat` swaps convs for fake-quant ones, `calibrate` sets activation ranges,
`to_darknet` folds and writes weights on the quantization grid, `export_quant` / `export_qdq_onnx` write the
integer view.

Example:
    >>> qmodel = prepare_qat(model, GoogleConfig(bits=8))
    >>> calibrate(qmodel, batches)
    >>> compress.save(qmodel, "out.cfg", "out.weights")   # folded, weights on the int8 grid
"""
from __future__ import annotations

from compress.quant.config import DorefaConfig, GoogleConfig, config_to_dict, make_config
from compress.quant.fake_quant import ActQuant
from compress.quant.fold import fold_bn, fold_model
from compress.quant.int8_format import int8_artifact
from compress.quant.modules import QConvBNAct, QuantOut
from compress.quant.prepare import (QATModel, calibrate, convert, edge_convs, freeze_bn, freeze_observers,
                                    prepare_qat, set_act_drop, to_darknet)

__all__ = ["prepare_qat", "calibrate", "convert", "to_darknet", "QATModel", "DorefaConfig", "GoogleConfig",
           "make_config", "config_to_dict", "fold_bn", "fold_model", "QConvBNAct", "QuantOut", "ActQuant",
           "edge_convs", "freeze_bn", "freeze_observers", "set_act_drop", "int8_artifact"]
