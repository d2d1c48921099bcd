"""`yolo-compress quantize`: DoReFa (k-bit) or Google (int8) fake quantization, PTQ or QAT."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

from compress.base.checks import SEED, check_choice, check_range
from compress.base.errors import QuantError
from compress.base.guard import Output
from compress.darknet.cfg import read_cfg
from compress.detection.losses import LOSSES
from compress.train.config import DistConfig, TrainConfig
from compress.jobs.base import Job, PathLike, Report, out_folder, paths, register_job
from compress.jobs.ranks import process_device
from compress.jobs.training import data_path, dataset_files
from compress.quant.config import QuantConfig, make_config
from compress.quant.pipeline import QuantOutputs, QuantSettings, check_img_size, check_verified, quantize
from compress.quant.fp32_check import apply_fp32_check, check_fp32, default_max_drop, fakequant_verdict
from compress.quant.qat import qat_train_config
from compress.train.hyp import FINETUNE_LOSS, finetune_defaults

__all__ = ["QuantizeJob"]


@register_job
@dataclass(frozen=True)
class QuantizeJob(Job):
    """Quantize cfg/weights -> `out`/<cfg stem>-q<bits>.cfg/.weights (folded, on the grid), quant.json,
    weights_int.npz, model-int8.onnx (QDQ), model-fp32.onnx. `train`: the QAT loop (None: post-training
    calibration); its options are --epochs (0: PTQ), --lr0, --resume, --seed, --loss (default: darknet, the loss
    of pretrained Darknet weights, as every trainer fine-tunes them). `max_drop`: the points of mAP@.5 each
    artifact may lose against the fp32 input model (None: 2 at 8 bits, unbounded below)."""

    command: ClassVar[str] = "quantize"
    produces_model: ClassVar[bool] = True  # recipes continue from its report's cfg/weights
    in_summary: ClassVar[bool] = True
    train_options: ClassVar[tuple[str, ...]] = ("epochs", "lr0", "resume", "seed", "loss")
    train_defaults: ClassVar[Mapping[str, Any]] = {"epochs": 0, "lr0": 1e-4, "resume": False, "seed": 0,
                                                   "loss": None}
    false_flags: ClassVar[Mapping[str, str]] = {"reduce_range": "--full-range"}

    cfg: PathLike
    weights: PathLike | None
    data: PathLike
    out: PathLike
    train: TrainConfig | None = None
    val: PathLike | None = None
    letterbox: bool | None = None
    method: str = "google"
    bits: int = 8
    a_bits: int | None = None
    bn_fold: bool = True
    pow2: bool = False
    per_tensor: bool = False
    first_last_bits: int = 8
    act_scheme: str = "asymmetric"
    reduce_range: bool = True
    weight_clip: str | None = None
    freeze_observers_after: int | None = None
    freeze_bn_after: int | None = None
    calib_batches: int = 8
    calib_images: int | None = None
    calib_seed: int = 0
    batch_size: int = 8
    img_size: int | None = None
    sync_bn: bool = False
    act_drop: float = 0.0
    act_drop_after: int = 0
    bias_correction: bool = True
    safe_range: str = "half"
    rounding: str | None = None
    rounding_iters: int | None = None  # None: 300, 600 with --mixed-precision (QuantSettings.rounding_steps)
    mixed_precision: bool = False
    avg_bits: float = 4.5
    no_eval: bool = False
    no_verify: bool = False
    max_drop: float | None = None
    device: str = "auto"      # resolved when it runs (auto: a GPU if one is visible)

    def __post_init__(self) -> None:
        self.quant_config(), self.settings()  # their rules and messages
        check_range("--max-drop", self.max_drop, 0, error=QuantError)
        check_range("--avg-bits", self.avg_bits, 2, 8, error=QuantError)  # also when --mixed-precision is off
        if self.train is not None and self.rounding not in (None, "nearest"):
            raise QuantError(f"--rounding {self.rounding} is post-training rounding; QAT (--epochs N) learns the weights "
                             "themselves: drop --rounding or --epochs")
        if self.train is not None and self.train.resume and self.mixed_precision:
            raise QuantError("--resume with --mixed-precision is not supported: rerun the QAT from the start")

    @classmethod
    def make_train(cls, options: Mapping[str, Any], train: Mapping[str, Any], given: set[str]) -> TrainConfig | None:
        """The QAT loop from --epochs/--lr0/--resume/--seed and the job's batch size, input size and --sync-bn."""
        values = {**cls.train_defaults, **{k: v for k, v in train.items() if v is not None}}
        if values["epochs"] < 0:
            raise QuantError(f"--epochs {values['epochs']} must be >= 0 (0 = post-training calibration only)")
        check_range("--lr0", values["lr0"], 0, lo_open=True, error=QuantError)  # also when PTQ does not use it
        check_choice("--loss", values["loss"], LOSSES, error=QuantError)  # also when PTQ does not use it
        check_range("--seed", values["seed"], *SEED, error=QuantError)
        if values["resume"] and not values["epochs"]:
            raise QuantError("--resume continues an interrupted QAT run: pass the run's --epochs N (N > 0)")
        if not values["epochs"]:
            return None
        option = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        option.update(options)
        check_img_size(option["img_size"])
        img = option["img_size"] or read_cfg(option["cfg"]).width
        sync_bn = option["sync_bn"] and not option["bn_fold"]  # folded BNs synchronise themselves
        qat = qat_train_config(values["epochs"], option["batch_size"], img, values["lr0"], values["seed"],
                               values["resume"], sync_bn)
        # the shared fine-tune defaults for the loss and the collapse check (QAT keeps its own lr, optimizer and
        # BN freeze points); no BN adaptation: QAT's output is the trained fake-quant model itself, not fit's file
        loss = values["loss"] or (FINETUNE_LOSS if option.get("weights") is not None else TrainConfig.loss)
        extra = {k: v for k, v in finetune_defaults(loss).items() if k == "collapse_ratio"}
        return dataclasses.replace(qat, loss=loss, bn_adapt=0, **extra)

    def quant_config(self) -> QuantConfig:
        return make_config(self.method, self.bits, self.a_bits, bn_fold=self.bn_fold, pow2=self.pow2,
                           per_channel=not self.per_tensor, first_last_bits=self.first_last_bits,
                           act_scheme=self.act_scheme, reduce_range=self.reduce_range, w_clip=self.weight_clip,
                           safe_range=self.safe_range)

    def settings(self) -> QuantSettings:
        return QuantSettings(calib_batches=self.calib_batches, calib_images=self.calib_images,
                             calib_seed=self.calib_seed, batch_size=self.batch_size, img_size=self.img_size,
                             letterbox=self.letterbox, evaluate=not self.no_eval, verify=not self.no_verify,
                             bias_correction=self.bias_correction, sync_bn=self.sync_bn, act_drop=self.act_drop,
                             act_drop_after=self.act_drop_after,
                             rounding=self.rounding, rounding_iters=self.rounding_iters,
                             avg_bits=self.avg_bits if self.mixed_precision else None,
                             freeze_observers_after=self.freeze_observers_after, freeze_bn_after=self.freeze_bn_after)

    def files(self) -> QuantOutputs:
        return QuantOutputs.in_dir(self.out, f"{Path(self.cfg).stem}-q{self.bits}")

    def inputs(self) -> tuple[Path, ...]:
        return paths(self.cfg, self.weights, data_path(self.data), self.val)

    def data_files(self) -> tuple[Path, ...]:
        return dataset_files(self.data, self.val)

    def outputs(self) -> tuple[Output, ...]:
        return out_folder(self.out, *self.files().to_dict().values())

    def out_dir(self) -> Path:
        return Path(self.out)

    def resumes(self) -> bool:
        return self.train is not None and self.train.resume

    def checkpoints(self) -> tuple[Path, ...]:
        return () if self.train is None else (self.files().qat / "last.pt",)   # QAT's; PTQ has none

    def resumed(self) -> "QuantizeJob":
        if self.train is None:
            return super().resumed()
        return dataclasses.replace(self, train=dataclasses.replace(self.train, resume=True))

    def train_argv_values(self) -> dict[str, Any]:
        if self.train is None:
            return {}
        values = {"epochs": self.train.epochs, "lr0": self.train.lr0, "resume": self.train.resume,
                  "seed": self.train.seed}
        out = {k: v for k, v in values.items() if v != self.train_defaults[k]}
        plain = type(self).make_train(self._options(), {"epochs": self.train.epochs}, set())
        return {**out, "loss": self.train.loss} if self.train.loss != plain.loss else out

    def _options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "train"}

    def max_drop_bound(self) -> float | None:
        return self.max_drop if self.max_drop is not None else default_max_drop(self.bits, self.a_bits)

    def run(self, dist: DistConfig | None = None) -> Report:
        device = process_device(self.device, dist)
        figures = quantize(self.cfg, self.weights, self.data, self.quant_config(), self.files(), self.settings(),
                           self.train, device, dist, val=self.val)
        if "verify" in figures:  # rank 0 (the others return no figures)
            figures = apply_fp32_check(figures, self.max_drop_bound())
        if self.train is not None:
            figures = {**figures, "train_config": self.train.to_dict()}
        return self.report(figures)

    def check(self, report: Report, written: Path | None) -> None:
        check_verified(fakequant_verdict(report.to_dict()), written)  # a broken artifact: its own message first
        check_fp32(report.to_dict(), written)
