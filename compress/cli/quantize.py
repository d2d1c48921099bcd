"""`yolo-compress quantize`: DoReFa (k-bit) or Google (int8) fake quantization, PTQ or QAT."""
from __future__ import annotations

from typing import Any

import click

from compress.base.checks import SEED
from compress.cli.common import (DATA_HELP, device_option, exist_ok_option, letterbox_option, model_options, out_option,
                                 report_option, run, val_option)
from compress.cli.group import cli
from compress.darknet.summary import format_stage_table
from compress.jobs import QuantizeJob, Report
from compress.quant.adaround import MIXED_ROUNDING_STEPS, ROUNDING_STEPS, ROUNDINGS
from compress.quant.config import ACT_SCHEMES, METHOD_CONFIGS, SAFE_RANGES
from compress.quant.pipeline import QuantVerifyError
from compress.quant.weights import W_CLIPS
from compress.detection.losses import LOSSES

_ROWS = [("fp32", "fp32 (input)"), ("fakequant", "fake-quant (torch)"), ("int8_onnx", "int8 QDQ ONNX"),
         ("darknet", "Darknet pair (weights on grid)")]


def _table(r: Report) -> str:
    rows = [{"stage": head, "map50": r.get(f"map50_{k}"), "map50_95": r.get(f"map50_95_{k}")} for k, head in _ROWS]
    rows[0].update(size=r["size_mb_fp32"], lat=r["latency_ms_fp32_onnx"])
    rows[2].update(size=r["size_mb_int8"], lat=r["latency_ms_int8_onnx"])
    return format_stage_table(rows, [("stage", "stage"), ("map50", "mAP@.5"), ("map50_95", "mAP@.5:.95"),
                                     ("size", "weights MB"), ("lat", "ORT CPU ms")])


@cli.command("quantize")
@model_options(weights_required=True)
@click.option("--data", type=click.Path(exists=True), required=True, help=f"{DATA_HELP}.")
@val_option
@letterbox_option
@out_option()
@click.option("--method", type=click.Choice(sorted(METHOD_CONFIGS)), default="google", show_default=True,
              help="google: symmetric int-k weights (any --bits); dorefa: tanh-normalised 2^k levels.")
@click.option("--bits", type=click.IntRange(2, 8), default=8, show_default=True, help="Weight bits.")
@click.option("--a-bits", type=click.IntRange(2, 8), help="Activation bits (default 8).")
@click.option("--bn-fold/--no-bn-fold", default=True, show_default=True, help="Train with BN folded (Jacob et al.).")
@click.option("--pow2", is_flag=True, help="Round scales up to powers of two (exponents go to quant.json).")
@click.option("--per-tensor", is_flag=True, help="One weight scale per layer instead of per output channel.")
@click.option("--first-last-bits", type=click.IntRange(2, 8), default=8, show_default=True,
              help="Bits of the first conv and the head convs (symmetric).")
@click.option("--act-scheme", type=click.Choice(ACT_SCHEMES), default="asymmetric", show_default=True,
              help="Activations: asymmetric uint8 (fastest in onnxruntime) or symmetric int8, zero point 0 "
                   "(TensorRT).")
@click.option("--reduce-range/--full-range", default=True, show_default=True,
              help="8-bit weight codes in [-63, 63]: exact in onnxruntime on x86 CPUs without VNNI. "
                   "--full-range only where every target has VNNI (or a GPU).")
@click.option("--weight-clip", type=click.Choice(W_CLIPS),
              help="Google weight range per channel: max|w| or the MSE-optimal clip (default: mse below 8 bits).")
@click.option("--epochs", type=click.IntRange(0), default=0, show_default=True,
              help="0 = post-training calibration; >0 = QAT epochs through the trainer.")
@click.option("--freeze-observers-after", type=click.IntRange(0),
              help="QAT: activation ranges stop moving after this many epochs (default: half, rounded up).")
@click.option("--freeze-bn-after", type=click.IntRange(0),
              help="QAT: BN folds with running statistics after this many epochs (default: 80%, rounded up).")
@click.option("--calib-batches", type=click.IntRange(1), default=8, show_default=True,
              help="Calibration batches of --batch-size images (unless --calib-images is given).")
@click.option("--calib-images", type=click.IntRange(1),
              help="PTQ calibration images (activation ranges, learned rounding, bias correction); default "
                   "--calib-batches x --batch-size, at most what the data holds.")
@click.option("--calib-seed", type=click.IntRange(0), default=0, show_default=True,
              help="0: the first calibration images in order; N > 0: a random sample drawn with seed N.")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--lr0", type=click.FloatRange(0, min_open=True), default=1e-4, show_default=True, help="QAT lr (Adam, from the pretrained weights).")
@click.option("--img-size", type=click.IntRange(32, 4096), help="Input size (default: the cfg's).")
@click.option("--resume", is_flag=True, help="Continue the interrupted QAT run in --out (OUT/qat/last.pt); "
              "same options as that run.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(*SEED), help="QAT data order and augmentation.")
@click.option("--sync-bn", is_flag=True, help="QAT under torchrun: BatchNorm statistics over the global batch (the folded BN all-reduces its moments itself, on gloo/CPU too; with --no-bn-fold: SyncBatchNorm, CUDA only).")
@click.option("--act-drop", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="QAT: QDrop, the share of activation elements that skip fake quantization in each training "
                   "step (the model then also holds with float activations, as in the Darknet pair).")
@click.option("--act-drop-after", type=click.IntRange(0), default=0, show_default=True,
              help="QAT: epochs trained with every activation quantized before --act-drop starts.")
@click.option("--bias-correction/--no-bias-correction", default=True, show_default=True,
              help="PTQ: shift each conv's bias by the mean output error of its rounded weights (Nagel et al.).")
@click.option("--rounding", type=click.Choice(ROUNDINGS),
              help="PTQ weight rounding: nearest; learned on the calibration images so each layer reproduces "
                   "its float output (AdaRound); block: each block's convs (branches that rejoin, e.g. a CSP "
                   "block) fitted jointly to the block's output (BRECQ), other convs as learned. Default: "
                   "learned at --bits <= 6 with --method google.")
@click.option("--rounding-iters", type=click.IntRange(1),
              help="Learned rounding: optimisation steps per layer or block (8 images, a 24x24 output window or "
                   f"a 32x32 block input window each). Default: {ROUNDING_STEPS}; {MIXED_ROUNDING_STEPS} with "
                   "--mixed-precision (measured better there: README).")
@click.option("--mixed-precision", is_flag=True,
              help="Give each conv a weight width from --bits to 8, most output error (measured on calibration "
                   "images) removed per added bit first, within --avg-bits; report.json and quant.json give each "
                   "layer's bits.")
@click.option("--avg-bits", type=click.FloatRange(2, 8), default=4.5, show_default=True,
              help="--mixed-precision: average weight bits (weighted by weight count, first/last convs included).")
@click.option("--safe-range", type=click.Choice(SAFE_RANGES), default="half", show_default=True,
              help="How reduced-range 8-bit weights avoid int16 overflow: pair = |codes| <= 127 with each "
                   "channel's two largest summing to <= 128; half = |codes| <= 63.")
@click.option("--no-eval", is_flag=True, help="Skip the mAP evaluations (and so the verification).")
@click.option("--no-verify", is_flag=True,
              help="Do not fail (exit 1) when the int8 ONNX or the Darknet pair scores > 1 point mAP@.5 below "
                   "the fake-quant model, or more than --max-drop below the fp32 input model.")
@click.option("--max-drop", type=click.FloatRange(0), help="Points of mAP@.5 each artifact may lose against "
              "the fp32 input model before verification fails (default: 2 at 8 bits; none below 8 bits).")
@click.option("--loss", type=click.Choice(sorted(LOSSES)), help="QAT detection loss (default: darknet, the loss "
              "pretrained Darknet weights were trained with, as every trainer fine-tunes them).")
@device_option
@report_option
@exist_ok_option
def quantize_command(report_path: str | None, exist_ok: bool, **options: Any) -> None:
    """Quantize -> DIR/<cfg>-q<bits>.cfg/.weights (folded, on the grid), quant.json, weights_int.npz,
    model-int8.onnx (QDQ), model-fp32.onnx and report.json."""
    try:
        report = run(QuantizeJob, options, report_path, exist_ok)
    except QuantVerifyError as exc:  # raised after report.json and the artifacts were written: show them
        _echo(exc.report)
        raise
    if report.is_main:  # rank 0 prints and writes
        _echo(report)


def _echo(report: Report) -> None:
    click.echo(_table(report))
    v = report.get("vs_fp32") or {}
    if v.get("checks"):
        drops = ", ".join(f"{k} {c['drop']:+.1f}" for k, c in v["checks"].items() if c["drop"] is not None)
        click.echo(f"mAP@.5 points below fp32: {drops} (--max-drop {v['max_drop']})")
    if v.get("int8_slower"):
        click.echo(f"warning: the int8 ONNX is slower than fp32 on this CPU ({v['latency_ratio']}x)")
    click.echo(f"-> {report['cfg']}, {report['weights']}, {report['onnx']}")
