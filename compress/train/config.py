"""Training configuration: frozen, validated dataclasses built by the CLI (or by Python callers)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from compress.data.augment import AugmentConfig
from compress.data.imcache import CACHE_MODES
from compress.base.checks import SEED, check_choice
from compress.base.errors import CompressError
from compress.detection.losses import LOSSES
from compress.train.bn_adapt import DEFAULT_BN_ADAPT
from compress.train.optim import OPTIMIZERS, SCHEDULERS

__all__ = ["TrainConfig", "DistConfig", "TrainError"]


class TrainError(CompressError):
    """A training run cannot start or continue (bad config, nothing to resume, untrainable model)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything `fit` needs besides the model, the data and the device.

    batch_size is the total batch per optimizer micro-step (split across processes under DDP);
    `accumulate` micro-batches make one optimizer step. Weight decay applies to conv/linear weights only
    (BN and biases are never decayed) and is scaled by batch_size * accumulate / 64 (nominal batch 64).
    `optimizer`/`scheduler` name entries of `compress.train.optim.OPTIMIZERS` / `SCHEDULERS`, `loss` one of
    `compress.detection.losses.LOSSES` ("darknet": the cfg's [yolo] keys; "v5": box/obj/cls/anchor_t/iou_kind below).
    BatchNorm: `freeze_bn_stats` keeps the running mean/var fixed (BN layers normalise with them while
    training, as at inference); `bn_momentum` (None = the model's) sets how fast they follow the batches;
    `sync_bn` uses SyncBatchNorm under DDP on CUDA (refused for CPU processes; see train.distributed).
    `bn_adapt` batches re-estimate the saved model's BN statistics (train.bn_adapt); `collapse_ratio`: see fit.
    hsv_h ... mosaic: the augmentation (`compress.data.augment.AugmentConfig`), used when `augment`.
    """
    epochs: int = 100
    batch_size: int = 16
    img_size: int = 416
    lr0: float = 0.01
    lrf: float = 0.05
    momentum: float = 0.937
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    scheduler: str = "cosine"
    warmup_epochs: float = 3.0
    warmup_momentum: float = 0.8
    ema: bool = True
    amp: bool = False
    accumulate: int = 1
    clip_grad: float | None = 10.0
    workers: int = 2
    eval_every: int = 1
    seed: int = 0
    resume: bool = False
    progress: bool = True
    augment: bool = True
    box: float = 0.05
    obj: float = 1.0
    cls: float = 0.5
    anchor_t: float = 4.0
    iou_kind: str = "ciou"
    loss: str = "v5"
    freeze_bn_stats: bool = False
    bn_momentum: float | None = None
    sync_bn: bool = False
    # BN adaptation (train.bn_adapt): before each evaluation and save, the saved model's BN statistics are
    # re-estimated on this many un-augmented training batches (0: off, the trained statistics are kept)
    bn_adapt: int = DEFAULT_BN_ADAPT
    # a final mAP@.5 below this share of the starting model's is a collapse: warned and reported (None: the
    # starting model is not evaluated; the fine-tune defaults set 0.3)
    collapse_ratio: float | None = None
    # augmentation: flat (hyp-file keys), defaults and validation from AugmentConfig (one place)
    hsv_h: float = AugmentConfig.hsv_h
    hsv_s: float = AugmentConfig.hsv_s
    hsv_v: float = AugmentConfig.hsv_v
    fliplr: float = AugmentConfig.fliplr
    translate: float = AugmentConfig.translate
    scale: float = AugmentConfig.scale
    mosaic: float = AugmentConfig.mosaic
    letterbox: bool | None = None   # input geometry; None: the model cfg's [net] letter_box
    cache: str | None = None        # 'ram' | 'disk' decoded training images
    cache_dir: str | None = None    # disk cache folder (None: OUT/cache)

    def __post_init__(self) -> None:
        try:  # the augmentation keys are validated where they are defined
            self.augment_config()
        except CompressError as exc:
            raise TrainError(str(exc).replace("augmentation ", "train option ", 1)) from None

        positive = ("epochs", "batch_size", "img_size", "accumulate", "eval_every", "lr0", "lrf")
        for name in positive:
            _check(name, getattr(self, name) > 0, "must be > 0", getattr(self, name))
        for name in ("weight_decay", "warmup_epochs", "workers", "box", "obj", "cls", "bn_adapt"):
            _check(name, getattr(self, name) >= 0, "must be >= 0", getattr(self, name))
        _check("momentum", 0 <= self.momentum < 1, "must be in [0, 1)", self.momentum)
        _check("img_size", self.img_size % 32 == 0, "must be a multiple of 32", self.img_size)
        _check("optimizer", self.optimizer in OPTIMIZERS, f"must be one of {sorted(OPTIMIZERS)}", self.optimizer)
        _check("scheduler", self.scheduler in SCHEDULERS, f"must be one of {sorted(SCHEDULERS)}", self.scheduler)
        _check("iou_kind", self.iou_kind in ("ciou", "giou"), "must be 'ciou' or 'giou'", self.iou_kind)
        _check("anchor_t", self.anchor_t > 1, "must be > 1", self.anchor_t)
        _check("clip_grad", self.clip_grad is None or self.clip_grad > 0, "must be > 0 or None", self.clip_grad)
        _check("loss", self.loss in LOSSES, f"must be one of {sorted(LOSSES)}", self.loss)
        _check("bn_momentum", self.bn_momentum is None or 0 <= self.bn_momentum <= 1, "must be in [0, 1] or None",
               self.bn_momentum)
        _check("collapse_ratio", self.collapse_ratio is None or 0 < self.collapse_ratio < 1, "must be in (0, 1) "
               "or None", self.collapse_ratio)
        for name in ("hsv_h", "hsv_s", "hsv_v", "fliplr", "translate", "mosaic"):
            _check(name, 0 <= getattr(self, name) <= 1, "must be in [0, 1]", getattr(self, name))
        _check("scale", 0 <= self.scale < 1, "must be in [0, 1)", self.scale)
        _check("seed", SEED[0] <= self.seed <= SEED[1], f"must be in [{SEED[0]}, {SEED[1]}]", self.seed)
        check_choice("--cache", self.cache, CACHE_MODES, error=TrainError)

    def augment_config(self) -> AugmentConfig:
        return AugmentConfig(hsv_h=self.hsv_h, hsv_s=self.hsv_s, hsv_v=self.hsv_v, fliplr=self.fliplr,
                             translate=self.translate, scale=self.scale, mosaic=self.mosaic)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass(frozen=True)
class DistConfig:
    """One process of a multi-process (DDP) run; the CLI builds it from torchrun's environment.

    `init_method` e.g. "tcp://127.0.0.1:29500"; `backend` None = nccl on CUDA, gloo otherwise.
    """
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    init_method: str = "tcp://127.0.0.1:29500"
    backend: str | None = None

    def __post_init__(self) -> None:
        _check("world_size", self.world_size >= 1, "must be >= 1", self.world_size)
        _check("rank", 0 <= self.rank < self.world_size, f"must be in [0, {self.world_size})", self.rank)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _check(name: str, ok: bool, rule: str, value: object) -> None:
    if not ok:
        raise TrainError(f"train option {name} {rule}, got {value!r}")
