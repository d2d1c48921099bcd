"""Detection data: dataset specs (.data, data.yaml, folders), image decoding, caching, augmentation, the
dataset and loader, format conversion (COCO/VOC) and the synthetic demo set.

Imports `compress.base` and `compress.darknet` (see docs/design.md, "Floors").
"""
