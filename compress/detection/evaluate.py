"""Detection accuracy: inference in the model's input geometry, NMS, boxes mapped back to the original
images, COCO mAP.

The geometry (plain resize, Darknet's default, or letterbox) is `EvalConfig.letterbox` when set, else what
the model declares (`imageio.cfg_letterbox`: a `letterbox` attribute, or `letter_box` in its cfg's [net]),
else plain resize.

`evaluate` takes a `DarknetModel` or any callable mapping a float (N,3,S,S) tensor in [0,1] to eval-mode
output (N, boxes, 5+C) (e.g. an onnxruntime session wrapper). mAP@0.5 and mAP@0.5:0.95 come from
pycocotools, with the ground truth built in memory from the YOLO labels in original pixel coordinates.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from compress.detection.boxes import box_iou, non_max_suppression
from compress.data.dataset import (DataSpec, DetectionDataset, default_workers, find_names, load_data_spec, make_loader,
                   read_names, to_input)
from compress.base.checks import check_img_size, check_range
from compress.base.errors import DataError, WeightsError
from compress.darknet.finite import describe_layer, first_nonfinite_output
from compress.darknet.memory import check_inference_memory
from compress.base.fileio import write_text_atomic
from compress.data.imageio import cfg_letterbox

__all__ = ["EvalConfig", "EvalResult", "evaluate", "predict", "input_letterbox", "coco_ground_truth", "coco_map",
           "precision_recall", "save_detections", "check_classes"]

log = logging.getLogger(__name__)
Predictor = Callable[[torch.Tensor], Any]


@dataclass(frozen=True)
class EvalConfig:
    img_size: int = 416
    batch_size: int = 8
    conf_thres: float = 0.001   # NMS input threshold for mAP (low, as usual)
    iou_thres: float = 0.6      # NMS IoU
    max_det: int = 300
    workers: int = field(default_factory=default_workers)
    progress: bool = True
    pr_conf: float = 0.25       # precision/recall are counted on detections with conf >= this
    pr_iou: float = 0.5         # ... matched to same-class GT at IoU >= this
    letterbox: bool | None = None  # input geometry; None: the model's (cfg letter_box), else plain resize

    def __post_init__(self) -> None:
        check_img_size(self.img_size, multiple_of=32, error=DataError)
        if self.batch_size < 1 or self.max_det < 1 or self.workers < 0:
            raise DataError("batch_size and max_det must be >= 1 and workers >= 0")
        for option, value in (("--conf-thres", self.conf_thres), ("--iou-thres", self.iou_thres),
                              ("pr_conf", self.pr_conf), ("pr_iou", self.pr_iou)):
            check_range(option, value, 0, 1, error=DataError)


@dataclass
class EvalResult:
    map50: float
    map50_95: float
    precision: float
    recall: float
    images: int
    instances: int
    per_class: list[dict]
    timing_ms: dict[str, float]
    pr: dict[str, float]
    detections: list[dict] = field(default_factory=list, repr=False)
    letterbox: bool = False     # the input geometry used (False: plain resize)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("detections")
        return d

    def table(self) -> list[list]:
        """Rows for tabulate: class, instances, AP50, AP50:95, plus an 'all' row."""
        rows = [[c["name"], c["instances"], c["ap50"], c["ap50_95"]] for c in self.per_class if c["instances"]]
        return rows + [["all", self.instances, self.map50, self.map50_95]]


def input_letterbox(model: Any, config_value: bool | None = None) -> bool:
    """The input geometry to feed `model`: the explicit choice, else the model's, else plain resize."""
    if config_value is not None:
        return bool(config_value)
    declared = cfg_letterbox(model)
    return bool(declared) if declared is not None else False


def _dataset(data: DataSpec | str | os.PathLike | Sequence | DetectionDataset, img_size: int, letterbox: bool
             ) -> tuple[DetectionDataset, list[str], bool]:
    """(dataset, class names, whether the names are authoritative, i.e. from a .data/.names file)."""
    if isinstance(data, (str, os.PathLike)):
        data = load_data_spec(data)
    if isinstance(data, DataSpec):
        source = f"{data.source} [valid]"
        ds = DetectionDataset(data.valid, img_size, num_classes=data.nc, source=source, letterbox=letterbox)
        return ds, data.names, not data.names_from_labels
    if not isinstance(data, DetectionDataset):
        images = [Path(p) for p in data]
        names_file = find_names(images[0].parent) if images else None
        names = read_names(names_file) if names_file else None
        data = DetectionDataset(images, img_size, num_classes=len(names) if names else None, source="images",
                                letterbox=letterbox)
        if names:
            return data, names, True
    elif data.letterbox != letterbox or data.augment or data.img_size != img_size:
        data = copy.copy(data)  # a ready dataset (e.g. the trainer's): same images, the model's geometry
        data.letterbox, data.augment, data.img_size, data.cache = letterbox, False, img_size, None
    nc = data.num_classes or 1 + max((int(c) for lab in data.labels for c in lab[:, 0]), default=0)
    return data, [str(i) for i in range(nc)], data.num_classes is not None


def predict(fn: Predictor, loader, config: EvalConfig, device: str | torch.device = "cpu",
            num_classes: int | None = None, label_classes: int | None = None
            ) -> tuple[list[np.ndarray], dict[str, float]]:
    """Per image (n, 6) x1,y1,x2,y2,conf,cls in ORIGINAL pixels, and mean ms per image of each stage.
    `num_classes`: the model must predict exactly these (names from a file); `label_classes`: at least these
    (ids read from labels without a names file: labels may use a subset of the model's classes)."""
    # an input size or batch that cannot fit is refused with the figure, before the allocator or the OOM killer
    check_inference_memory(fn, (config.img_size, config.img_size), config.batch_size, device,
                           "use a smaller --img-size (or a smaller --batch-size where the command has one)")
    out: list[np.ndarray] = []
    spent = {"preprocess": 0.0, "inference": 0.0, "nms": 0.0}
    bar = tqdm(total=len(loader.dataset), desc="eval", unit="img", leave=False,
               disable=None if config.progress else True)  # None: bars on a TTY only
    t = time.perf_counter()
    for imgs, _, _, shapes in loader:
        imgs = to_input(imgs, device)
        t1 = time.perf_counter()
        with torch.no_grad():
            pred = torch.as_tensor(fn(imgs)).float()
        _check_output(pred, imgs, num_classes, label_classes)
        _check_finite(fn, pred, imgs)
        t2 = time.perf_counter()
        dets = non_max_suppression(pred, config.conf_thres, config.iou_thres, config.max_det)
        out += [_to_original(d.cpu().numpy(), s) for d, s in zip(dets, shapes)]
        t3 = time.perf_counter()
        for key, dt in zip(spent, (t1 - t, t2 - t1, t3 - t2)):
            spent[key] += dt
        bar.update(len(imgs))
        t = time.perf_counter()
    bar.close()
    n = max(1, len(out))
    timing = {k: 1000 * v / n for k, v in spent.items()}
    timing["total"] = sum(timing.values())
    return out, timing


def _check_output(pred: torch.Tensor, imgs: torch.Tensor, nc: int | None, label_nc: int | None = None) -> None:
    if pred.dim() != 3 or pred.shape[0] != imgs.shape[0]:
        raise DataError(f"model output has shape {tuple(pred.shape)}; expected (N, boxes, 5+classes) from an "
                        "eval-mode model")
    check_classes(pred.shape[-1] - 5, nc)
    if label_nc is not None and pred.shape[-1] - 5 < label_nc:
        raise DataError(f"the labels use class ids up to {label_nc - 1} but the model predicts "
                        f"{pred.shape[-1] - 5} classes; check the labels or add a names file")


def check_classes(model_classes: int | None, data_classes: int | None, data: object = None) -> None:
    """The model's classes against the data's (None: unknown, nothing to check). Commands that write artifacts
    call this before the work, so a mismatch fails before anything is written."""
    if model_classes is not None and data_classes is not None and model_classes != data_classes:
        source = f" ({data})" if data else ""
        raise DataError(f"model predicts {model_classes} classes but the data{source} has {data_classes}; use "
                        "matching --data names / classes")


def _check_finite(fn: Predictor, pred: torch.Tensor, imgs: torch.Tensor) -> None:
    """NaN boxes would be scored as a made-up mAP (and written as invalid JSON): an error naming the layer."""
    if bool(torch.isfinite(pred).all()):
        return
    i = first_nonfinite_output(fn, imgs)
    where = f"{describe_layer(fn, i)} is the first to output NaN/Inf" if i is not None else "its output holds NaN/Inf"
    raise WeightsError(f"the model's output is not finite: {where}; check that layer's cfg values and the weights")


def _to_original(d: np.ndarray, shape) -> np.ndarray:
    (h0, w0), (ratio, (pw, ph)) = shape
    rw, rh = ratio if isinstance(ratio, (tuple, list)) else (ratio, ratio)
    d = d.copy()
    d[:, [0, 2]] = ((d[:, [0, 2]] - pw) / rw).clip(0, w0)
    d[:, [1, 3]] = ((d[:, [1, 3]] - ph) / rh).clip(0, h0)
    return d


def coco_ground_truth(ds: DetectionDataset, nc: int) -> COCO:
    """A pycocotools COCO object of the dataset's labels, in original pixels (image id = dataset index)."""
    images, anns = [], []
    for i, ((h, w), lab) in enumerate(zip(ds.shapes, ds.labels)):
        images.append({"id": i, "width": w, "height": h, "file_name": str(ds.images[i])})
        for c, cx, cy, bw, bh in lab.tolist():
            box = [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c), "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": k, "name": str(k)}
                                                                         for k in range(nc)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def coco_detections(preds: list[np.ndarray], ds: DetectionDataset | None = None) -> list[dict]:
    """COCO result list: image_id (dataset index), category_id (class id), bbox x,y,w,h, score."""
    dets = []
    for i, d in enumerate(preds):
        for x1, y1, x2, y2, conf, cls in d.tolist():
            det = {"image_id": i, "category_id": int(cls), "bbox": [round(v, 3) for v in (x1, y1, x2 - x1, y2 - y1)],
                   "score": round(conf, 5)}
            if ds is not None:
                det["file_name"] = ds.images[i].name
            dets.append(det)
    return dets


def coco_map(gt: COCO, dets: list[dict], nc: int) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(mAP50, mAP50:95, per-class AP50 (nc,), per-class AP50:95 (nc,)); NaN per class without GT."""
    nan = np.full(nc, np.nan)
    if not dets or not gt.dataset["annotations"]:
        ap = np.where([len(gt.getAnnIds(catIds=[k])) > 0 for k in range(nc)], 0.0, np.nan)
        return 0.0, 0.0, ap, ap.copy()
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes([{k: v for k, v in d.items() if k != "file_name"} for d in dets])
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = sorted(gt.getImgIds())
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    prec = ev.eval["precision"][:, :, :, 0, -1]  # (T iou, R recall, K class), area=all, maxDets=100
    per50, per = nan.copy(), nan.copy()
    for k, cat in enumerate(ev.params.catIds):
        p = prec[:, :, k]
        if (p > -1).any():
            per[cat] = p[p > -1].mean()
            p0 = p[0]
            per50[cat] = p0[p0 > -1].mean() if (p0 > -1).any() else 0.0
    return max(0.0, float(ev.stats[1])), max(0.0, float(ev.stats[0])), per50, per


def precision_recall(preds: list[np.ndarray], ds: DetectionDataset, conf: float = 0.25,
                     iou: float = 0.5) -> dict[str, float]:
    """Greedy (by confidence) one-to-one matching to same-class GT boxes, at a fixed confidence."""
    tp = n_det = n_gt = 0
    for d, lab, (h, w) in zip(preds, ds.labels, ds.shapes):
        d = d[d[:, 4] >= conf]
        d = d[np.argsort(-d[:, 4], kind="stable")]
        gt = np.stack([(lab[:, 1] - lab[:, 3] / 2) * w, (lab[:, 2] - lab[:, 4] / 2) * h,
                       (lab[:, 1] + lab[:, 3] / 2) * w, (lab[:, 2] + lab[:, 4] / 2) * h], 1)
        n_det, n_gt = n_det + len(d), n_gt + len(lab)
        if not len(d) or not len(lab):
            continue
        ious = box_iou(torch.from_numpy(d[:, :4]).double(), torch.from_numpy(gt).double()).numpy()
        ious[d[:, 5][:, None] != lab[:, 0][None, :]] = 0.0
        free = np.ones(len(lab), bool)
        for row in ious:
            j = int(np.argmax(np.where(free, row, -1.0)))
            if free[j] and row[j] >= iou:
                free[j], tp = False, tp + 1
    p, r = tp / max(n_det, 1), tp / max(n_gt, 1)
    return {"conf": conf, "iou": iou, "tp": tp, "detections": n_det, "gt": n_gt,
            "precision": p, "recall": r, "f1": 2 * p * r / max(p + r, 1e-9)}


def evaluate(model_or_predictor: Predictor, data: DataSpec | str | os.PathLike | Sequence | DetectionDataset,
             config: EvalConfig = EvalConfig(), device: str | torch.device = "cpu") -> EvalResult:
    """mAP@0.5, mAP@0.5:0.95, P/R, per-class AP and per-image timing of a model on `data`'s valid split.

    Example:
        >>> evaluate(compress.load("yolov4-tiny.cfg", "yolov4-tiny.weights"), "coco128/images/train2017")
    """
    letterbox = input_letterbox(model_or_predictor, config.letterbox)
    ds, names, strict = _dataset(data, config.img_size, letterbox)
    nc = len(names)
    loader = make_loader(ds, config.img_size, config.batch_size, workers=config.workers)
    module = model_or_predictor if isinstance(model_or_predictor, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        preds, timing = predict(model_or_predictor, loader, config, device, nc if strict else None,
                                None if strict else nc)
    finally:
        if module is not None:
            module.train(was_training)
    dets = coco_detections(preds, ds)
    map50, map5095, ap50, ap = coco_map(coco_ground_truth(ds, nc), dets, nc)
    pr = precision_recall(preds, ds, config.pr_conf, config.pr_iou)
    counts = np.bincount(np.concatenate([lab[:, 0].astype(int) for lab in ds.labels] + [np.zeros(0, int)]),
                         minlength=nc)
    per_class = [{"id": k, "name": names[k], "instances": int(counts[k]),
                  "ap50": None if np.isnan(ap50[k]) else float(ap50[k]),
                  "ap50_95": None if np.isnan(ap[k]) else float(ap[k])} for k in range(nc)]
    log.info("eval: %d images, mAP@0.5 %.4f, mAP@0.5:0.95 %.4f", len(ds), map50, map5095)
    return EvalResult(map50=map50, map50_95=map5095, precision=pr["precision"], recall=pr["recall"],
                      images=len(ds), instances=int(counts.sum()), per_class=per_class, timing_ms=timing,
                      pr=pr, detections=dets, letterbox=letterbox)


def save_detections(result: EvalResult, path: str | os.PathLike) -> Path:
    """Write the COCO-format detections JSON (atomically)."""
    write_text_atomic(path, json.dumps(result.detections) + "\n")
    return Path(path)
