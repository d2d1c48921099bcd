"""Detection math: boxes and NMS, the training losses (YOLOv5-style and Darknet's), mAP evaluation, detect
(drawn boxes), k-means anchors.

Imports `compress.base`, `compress.darknet`, `compress.data` (see docs/design.md, "Floors").
"""
