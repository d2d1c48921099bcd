"""Deployment: ONNX export (fp32, NMS, simplification), OpenVINO/ncnn conversion and the runtimes that run
exported models as predictors.

Imports `compress.base`, `compress.darknet`, `compress.data`, `compress.detection` (see docs/design.md, "Floors").
"""
