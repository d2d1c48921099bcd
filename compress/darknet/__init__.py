"""The Darknet core: cfg text and its section table, the layers, the model built from a cfg, its layer graph,
.weights I/O, load/save of a cfg + weights pair, and the model summary (params, FLOPs, BN gammas).

Imports only `compress.base` (see docs/design.md, "Floors").
"""
