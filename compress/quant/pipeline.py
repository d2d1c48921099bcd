"""`quantize(...)`: the whole `yolo-compress quantize` run as one library call.

load -> prepare_qat -> calibrate on a few batches -> (QAT through `compress.train.fit` when epochs > 0) ->
write the folded Darknet pair (weights on the grid), quant.json, weights_int.npz, model-int8.onnx (QDQ)
and model-fp32.onnx -> evaluate fp32 / fake-quant / int8 ONNX / Darknet pair -> verify the two written
artifacts against the fake-quant model (`figures["verify"]`; `check_verified` raises when one fell short).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compress.base import checks
from compress.base.errors import QuantError
from compress.base.fileio import atomic_files
from compress.darknet.persist import load, pair_paths, save
from compress.darknet.summary import file_size_mb, stage_figures
from compress.data.dataset import load_data_spec, make_loader
from compress.deploy.export import ExportConfig, export_onnx
from compress.detection.evaluate import EvalConfig, check_classes, evaluate, input_letterbox
from compress.train import distributed as D
from compress.train.config import DistConfig, TrainConfig
from compress.quant.config import config_to_dict
from compress.quant.prepare import calibrate, prepare_qat
from compress.quant.config import QuantConfig
from compress.quant.adaround import MIXED_ROUNDING_STEPS, ROUNDING_STEPS, ROUNDINGS, RoundingConfig
from compress.quant.reconstruct import learn_rounding
from compress.quant.bias_correct import bias_correction
from compress.quant.mixed import HIGH_BITS, assign_bits, average_bits, layer_sensitivity
from compress.quant.cpuinfo import cpu_flags
from compress.quant.export import write_int_weights, write_quant_json
from compress.quant.modules import QConvBNAct
from compress.quant.onnx_qdq import OnnxPredictor, export_qdq_onnx, onnx_latency
from compress.quant.qat import QATHook, check_resume_config, resume_checkpoint, run_qat

__all__ = ["QuantOutputs", "QuantSettings", "quantize", "QATHook", "check_verified", "QuantVerifyError",
           "check_img_size", "ptq_rounding"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantOutputs:
    """The files one quantize run writes (named once by the caller: `QuantOutputs.in_dir`); `qat` is QAT's run
    folder."""
    cfg: Path
    weights: Path
    quant_json: Path
    weights_int: Path
    onnx: Path
    onnx_fp32: Path

    @classmethod
    def in_dir(cls, out: str | os.PathLike, stem: str) -> "QuantOutputs":
        out = Path(out)
        return cls(*pair_paths(out, stem), out / "quant.json", out / "weights_int.npz",
                   out / "model-int8.onnx", out / "model-fp32.onnx")

    @property
    def qat(self) -> Path:
        return self.cfg.parent / "qat"

    def to_dict(self) -> dict[str, Path]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class QuantSettings:
    """How a run calibrates, trains (QAT, with a TrainConfig), measures and verifies."""
    calib_batches: int = 8
    batch_size: int = 8
    calib_images: int | None = None     # calibration images (ranges, learned rounding, bias correction); None:
                                        # calib_batches x batch_size
    calib_seed: int = 0                 # 0: the first images in order; N > 0: a random sample drawn with seed N
    img_size: int | None = None         # None: the cfg's width
    letterbox: bool | None = None       # eval input geometry; None: the cfg's [net] letter_box
    evaluate: bool = True
    verify: bool = True
    verify_tolerance: float = 0.01
    latency_runs: int = 20
    threads: int = 1
    bias_correction: bool = True        # PTQ: Nagel et al. 2019 empirical bias correction
    sync_bn: bool = False               # QAT under torchrun: BatchNorm statistics over the global batch
    act_drop: float = 0.0               # QAT: QDrop share of activation elements left unquantized (Wei et al. 2022)
    act_drop_after: int = 0             # QAT epochs trained with every activation quantized before QDrop starts
    freeze_observers_after: int | None = None  # QAT epochs; None: half of them (rounded up)
    freeze_bn_after: int | None = None  # QAT epochs; None: 80% of them (rounded up)
    rounding: str | None = None         # PTQ weight rounding: nearest | learned; None: learned at <= 6 bits
    rounding_iters: int | None = None   # learned rounding: Adam steps per layer; None: `rounding_steps`
    avg_bits: float | None = None       # mixed precision: average weight bits; None = uniform --bits

    def __post_init__(self) -> None:
        if self.calib_batches < 1 or self.batch_size < 1:
            raise QuantError("--calib-batches and the batch size must be >= 1")
        checks.check_range("--calib-images", self.calib_images, 1, error=QuantError)
        checks.check_range("--calib-seed", self.calib_seed, 0, error=QuantError)
        check_img_size(self.img_size)
        if self.rounding not in (None, *ROUNDINGS):
            raise QuantError(f"--rounding {self.rounding} is unknown; use {' or '.join(ROUNDINGS)}")
        RoundingConfig(iters=self.rounding_steps)  # its checks
        checks.check_range("--avg-bits", self.avg_bits, 2, 8, error=QuantError)
        if not 0.0 <= self.act_drop < 1.0:
            raise QuantError(f"--act-drop {self.act_drop} must be in [0, 1), e.g. 0.5")
        if not 0.0 <= self.verify_tolerance <= 1.0:
            raise QuantError(f"verify_tolerance={self.verify_tolerance} is a mAP@.5 difference in [0, 1], e.g. 0.01")
        for name in ("freeze_observers_after", "freeze_bn_after", "act_drop_after"):
            if (getattr(self, name) or 0) < 0:
                raise QuantError(f"{name}={getattr(self, name)} must be a number of epochs >= 0 "
                                 f"(--{name.replace('_', '-')})")

    @property
    def rounding_steps(self) -> int:
        """Learned rounding's steps per layer: the ones asked for, else ROUNDING_STEPS, or MIXED_ROUNDING_STEPS with
        mixed precision, measured better there (yolov4-tiny @416 at 4.5 bits, mean of 3 samplings: int8 ONNX / pair
        -1.54 / -1.67 points with 600 against -1.96 / -2.34 with 300; @320 -3.51 / -2.75 against -3.87 / -3.94 on
        one sampling; README, issue 24)."""
        if self.rounding_iters is not None:
            return self.rounding_iters
        return MIXED_ROUNDING_STEPS if self.avg_bits is not None else ROUNDING_STEPS

    @property
    def calib_count(self) -> int:
        """How many calibration images a run takes (fewer when the data holds fewer)."""
        return self.calib_images if self.calib_images is not None else self.calib_batches * self.batch_size


def check_img_size(img_size: int | None) -> None:
    """quantize's --img-size: the shared bounds, a multiple of 32 (calibration and QAT run the network)."""
    checks.check_img_size(img_size, multiple_of=32, error=QuantError)


def _calibration_batches(spec: Any, img: int, settings: QuantSettings):
    """`settings.calib_count` training images in batches: the first ones, or a seeded random sample (several
    samplings show how much a result owes to the particular calibration images)."""
    seed = settings.calib_seed
    loader = make_loader(spec, img, settings.batch_size, augment=False, workers=0, split="train",
                         shuffle=seed > 0, seed=seed)
    left = settings.calib_count
    for imgs, *_ in loader:
        if left <= 0:
            return
        yield imgs[:left]
        left -= len(imgs)


def _calibration_images(spec: Any, img: int, settings: QuantSettings) -> torch.Tensor:
    """The calibration images as one uint8 tensor (learned rounding samples batches and windows from it)."""
    return torch.cat(list(_calibration_batches(spec, img, settings)))


def ptq_rounding(config: QuantConfig, rounding: str | None) -> str:
    """The PTQ rounding a run uses: the one asked for, else learned for Google weights of <= 6 bits (yolov4-tiny
    W4A8 @320: int8 ONNX 0.4794 against 0.4111 with nearest rounding; mixed precision at 4.5 bits @416, mean of 3
    samplings: 0.4968 against 0.4719, README), nearest at 7-8 bits, where the rounding error is small, and for
    DoReFa, whose tanh grid it does not learn."""
    if rounding is not None:
        return rounding
    bits = getattr(config, "bits", None)
    return "learned" if config.method == "google" and bits is not None and bits <= 6 else "nearest"


def _mixed_config(model: torch.nn.Module, config: QuantConfig, images: torch.Tensor, settings: QuantSettings,
                  device: str) -> tuple[QuantConfig, dict]:
    """Mixed precision: each low-bit conv's sensitivity at every width from --bits to 7 on (up to 8 of) the
    calibration images, then widths chosen for the most error removed per added bit within `settings.avg_bits`;
    the config carries the per-layer bits."""
    if config.method != "google":
        raise QuantError("--mixed-precision needs --method google (DoReFa's 8-bit codes need --full-range)")
    uniform = prepare_qat(model, config)
    convs = {i: m for i, m in enumerate(uniform.layers) if isinstance(m, QConvBNAct)}
    sizes = {i: m.conv.weight.numel() for i, m in convs.items()}
    sens: dict[int, dict[int, float]] = {}
    for b in range(config.bits, HIGH_BITS):
        at_b = uniform if b == config.bits else prepare_qat(model, dataclasses.replace(config, bits=b))
        for i, e in layer_sensitivity(model, at_b, images[:8], device).items():
            if at_b.layers[i].spec.w_bits == b:  # not an edge conv held at --first-last-bits
                sens.setdefault(i, {})[b] = e
    bits = assign_bits(sens, sizes, {i: m.spec.w_bits for i, m in convs.items()}, settings.avg_bits)
    changed = tuple((i, b) for i, b in sorted(bits.items()) if b != convs[i].spec.w_bits)
    return dataclasses.replace(config, layer_bits=changed), {
        "layer_bits": {str(i): b for i, b in bits.items()}, "avg_w_bits": round(average_bits(bits, sizes), 4),
        "sensitivity": {str(i): {str(b): round(v, 6) for b, v in e.items()} for i, e in sens.items()}}


def _evaluate(model_or_fn: Any, spec: Any, img: int, settings: QuantSettings, device: str) -> dict:
    r = evaluate(model_or_fn, spec, EvalConfig(img_size=img, batch_size=settings.batch_size, progress=False,
                                               workers=0, letterbox=settings.letterbox), device)
    return {"map50": r.map50, "map50_95": r.map50_95}


def quantize(cfg: str | os.PathLike, weights: str | os.PathLike | None, data: Any, config: QuantConfig,
             outputs: QuantOutputs, settings: QuantSettings = QuantSettings(), train: TrainConfig | None = None,
             device: str = "cpu", distributed: DistConfig | None = None,
             val: str | os.PathLike | None = None) -> dict:
    """Quantize cfg/weights (PTQ; QAT through `fit` with `train`) calibrating on `data` (a path or DataSpec;
    `val` replaces its valid split),
    write `outputs` and return the report figures (paths, mAPs, sizes, latencies). Writes no report.json:
    `compress.jobs.run_job(QuantizeJob(...))` guards the outputs and writes it.

    `distributed` (torchrun): QAT runs data-parallel (observer ranges agree across processes: each batch's
    min/max is all-reduced); only rank 0 writes and evaluates, the other ranks return `{"world_size", "rank"}`
    after training."""
    dist = distributed or DistConfig()
    created = D.setup(dist, torch.device(device))
    try:
        return _run(cfg, weights, (data, val), config, outputs, settings, train, device, dist)
    finally:
        D.teardown(created)


def _run(cfg: Any, weights: Any, data: Any, config: QuantConfig, paths: QuantOutputs, settings: QuantSettings,
         train: TrainConfig | None, device: str, dist: DistConfig) -> dict:
    resume = train is not None and train.resume
    if resume:
        resume_checkpoint(paths.qat)
        check_resume_config(paths.qat, cfg, config)
    model = load(cfg, weights, device=device)
    img = settings.img_size or model.cfg.width
    # one input geometry for every subject: the ONNX predictor has no cfg to read it from
    settings = dataclasses.replace(settings, letterbox=input_letterbox(model, settings.letterbox))
    spec = load_data_spec(*data, training=True)
    check_classes(model.num_classes, spec.nc, spec.source)  # before calibrating and writing anything
    mixed: dict[str, Any] = {}
    if settings.avg_bits is not None and not resume:
        config, mixed = _mixed_config(model, config, _calibration_images(spec, img, settings), settings, device)
    qmodel = prepare_qat(model, config)
    _set_sync_bn(qmodel, settings.sync_bn, dist)
    # a resumed run takes its ranges from the checkpoint (calibrated, then moved by QAT)
    seen = 0 if resume else calibrate(qmodel, _calibration_batches(spec, img, settings), device)
    rounding = ptq_rounding(config, settings.rounding) if train is None and not resume else "nearest"
    learned = learn_rounding(model, qmodel, _calibration_images(spec, img, settings),
                             RoundingConfig(iters=settings.rounding_steps, blocks=rounding == "block"),
                             device) if rounding != "nearest" else {}
    corrected = bias_correction(qmodel, _calibration_batches(spec, img, settings), device) \
        if settings.bias_correction and train is None else 0
    figures: dict[str, Any] = {"method": config.method, "quant_config": config_to_dict(config),
                               "calib_images": seen, "img_size": img, "cpu": cpu_flags(),
                               "onnxruntime": _ort_version(), "world_size": dist.world_size,
                               "bias_corrected_convs": corrected, "rounding": rounding,
                               "rounding_iters": settings.rounding_steps if rounding != "nearest" else None,
                               "rounding_error": {str(i): e for i, e in learned.items()}, **mixed}
    if train is not None:
        figures.update(run_qat(qmodel, spec, train, settings, paths.qat, (cfg, config), device, dist))
        qmodel.eval()
    D.barrier(dist)
    if not dist.is_main:
        return {"world_size": dist.world_size, "rank": dist.rank}
    _write(qmodel, cfg, weights, paths, img)
    figures.update({k: str(v) for k, v in paths.to_dict().items()})
    figures.update(size_mb_fp32=round(file_size_mb(weights), 4) if weights else None,
                   size_mb_int8=round(file_size_mb(paths.weights_int), 4),
                   size_mb=round(file_size_mb(paths.weights), 4),
                   latency_ms_fp32_onnx=round(onnx_latency(paths.onnx_fp32, (img, img), settings.latency_runs,
                                                           threads=settings.threads), 3),
                   latency_ms_int8_onnx=round(onnx_latency(paths.onnx, (img, img), settings.latency_runs,
                                                           threads=settings.threads), 3))
    out_model = load(paths.cfg, paths.weights, device=device)
    figures.update(_accuracy(model, qmodel, out_model, paths.onnx, spec, img, settings, device))
    figures["verify"] = _verify(figures, settings)
    stage = stage_figures(out_model, paths.cfg, paths.weights, None, (img, img))
    figures.update({k: v for k, v in stage.items() if k not in ("map50", "map50_95")})
    return figures


def _write(qmodel: torch.nn.Module, cfg: Any, weights: Any, paths: QuantOutputs, img: int) -> None:
    """The Darknet pair (weights on the grid), quant.json, the integer weights and both ONNX graphs, as one set
    (a full disk leaves none of them; the cfg, renamed last, marks the set complete)."""
    order = (paths.quant_json, paths.weights_int, paths.onnx, paths.onnx_fp32, paths.weights, paths.cfg)
    with atomic_files(*order) as (quant_json, weights_int, onnx, onnx_fp32, weights_out, cfg_out):
        save(qmodel, cfg_out, weights_out)
        write_quant_json(qmodel, quant_json, {"img_size": img, "source_cfg": str(cfg)})
        write_int_weights(qmodel, weights_int)
        export_qdq_onnx(qmodel, onnx, (img, img))
        export_onnx(load(cfg, weights), onnx_fp32, ExportConfig(img_size=img, dynamic_batch=True, opset=13))


def _accuracy(model: torch.nn.Module, qmodel: torch.nn.Module, out_model: torch.nn.Module, onnx_path: os.PathLike,
              spec: Any, img: int, settings: QuantSettings, device: str) -> dict:
    """mAP of fp32, fake-quant (weights + activations), int8 ONNX and the written Darknet pair (weights on
    the grid, float activations). `map50`/`map50_95` describe the written pair, as for every command."""
    tags = ("fp32", "fakequant", "int8_onnx", "darknet")
    if not settings.evaluate:
        return {f"map50{s}_{t}": None for t in tags for s in ("", "_95")} | {"map50": None, "map50_95": None}
    out = {}
    subjects = (model, qmodel, OnnxPredictor(onnx_path, settings.threads), out_model)
    for tag, subject in zip(tags, subjects):
        r = _evaluate(subject, spec, img, settings, device)
        out[f"map50_{tag}"], out[f"map50_95_{tag}"] = r["map50"], r["map50_95"]
        log.info("%s: mAP@0.5 %.4f, mAP@0.5:0.95 %.4f", tag, r["map50"], r["map50_95"])
    out["map50"], out["map50_95"] = out["map50_darknet"], out["map50_95_darknet"]
    return out


class QuantVerifyError(QuantError):
    """A written artifact scores more than the tolerance below the fake-quant model it was built from."""


_ARTIFACTS = {"int8_onnx": ("int8 QDQ ONNX", "onnx"), "darknet": ("Darknet pair", "weights")}


def _ort_version() -> str | None:
    try:
        import onnxruntime
    except ImportError:  # the fp32/int8 ONNX steps will say so
        return None
    return onnxruntime.__version__


def _verify(figures: dict, settings: QuantSettings) -> dict:
    """Each written artifact's mAP@.5 against the fake-quant model's (what QAT/calibration promised)."""
    if not settings.evaluate:
        return {"skipped": "evaluation off (--no-eval)"}
    ref = figures["map50_fakequant"]
    checks = {}
    for tag in _ARTIFACTS:
        drop = ref - figures[f"map50_{tag}"]
        checks[tag] = {"map50": figures[f"map50_{tag}"], "drop": round(drop, 4), "ok": drop <= settings.verify_tolerance}
    passed = all(c["ok"] for c in checks.values())
    if not passed and not settings.verify:
        log.warning("verification failed but --no-verify was given: %s", checks)
    return {"reference": "fakequant", "map50_reference": ref, "tolerance": settings.verify_tolerance,
            "checks": checks, "passed": passed, "enforced": settings.verify}


def check_verified(figures: dict, report_path: str | os.PathLike | None = None) -> None:
    """Raise `QuantVerifyError` when `figures["verify"]` (from `quantize`) failed and was enforced."""
    v = figures.get("verify") or {}
    if v.get("passed", True) or not v.get("enforced", True):
        return
    bad = [f"{_ARTIFACTS[t][0]} {figures[_ARTIFACTS[t][1]]} scores mAP@.5 {c['map50']:.4f}, {100 * c['drop']:.1f} "
           f"points below the fake-quant model ({v['map50_reference']:.4f})"
           for t, c in v["checks"].items() if not c["ok"]]
    cpu = figures.get("cpu") or {}
    hint = (" This CPU has AVX2 without VNNI: full-range int8 weights saturate onnxruntime's kernels here; "
            "drop --full-range." if cpu.get("int8_saturation_risk") and not figures["quant_config"].get(
                "reduce_range", True) else "")
    if not v["checks"]["darknet"]["ok"] and figures.get("qat_epochs") and not figures.get("qat_act_drop"):
        hint += (" The Darknet pair has float activations the QAT model never saw: QAT with --act-drop 0.5 "
                 "(QDrop) trains for both, given enough epochs (yolov4-tiny 4-bit pow2, 12 epochs @320: pair 1.0 "
                 "point below -> 1.3 above; with 8 epochs @416 the int8 ONNX lost 2.5 instead).")
    where = f"; figures in {report_path}" if report_path else ""
    raise QuantVerifyError("; ".join(bad) + f" (allowed {100 * v['tolerance']:.1f}). The artifacts are kept"
                           f"{where}.{hint} Pass --no-verify to accept them anyway.")


def _set_sync_bn(qmodel: torch.nn.Module, sync_bn: bool, dist: DistConfig) -> None:
    """--sync-bn: folded BNs (the default) all-reduce their batch moments themselves (gloo or nccl); without
    --bn-fold the plain BatchNorms go through the trainer's SyncBatchNorm (CUDA only)."""
    if not sync_bn:
        return
    if dist.world_size <= 1:
        log.warning("--sync-bn: one process, nothing to synchronise (run under torchrun)")
    for m in qmodel.modules():
        if isinstance(m, QConvBNAct):
            m.sync_bn = True
