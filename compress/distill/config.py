"""DistillConfig: which knowledge-distillation strategy, how its terms are formed and how they are weighted."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from compress.base.errors import DistillError

__all__ = ["DistillConfig", "DEFAULT_WEIGHTS", "DEFAULT_RATIOS", "TERMS", "LOGIT_MODES", "FEATURE_MODES",
           "DEFAULT_STRATEGY", "DEFAULT_WEIGHT_CAP", "DEFAULT_DRIFT", "parse_pairs"]

TERMS = ("kd_soft", "kd_box", "kd_feat")  # loss names, in the order of the (soft, box, feat) weight triples
# Reference weights per strategy (the reference project; ../shared/docs/reference-algorithms.md §6):
# (soft logits, box, feature). They were tuned
# against a detection loss ~50-100x larger than ours, so they are only used with `calibrate=False`.
DEFAULT_WEIGHTS: dict[int, tuple[float, float, float]] = {
    1: (1e-3, 0.0, 0.0),
    2: (1e-4, 1e-3, 0.0),
    3: (1e-4, 1e-3, 0.0),
    4: (1e-3, 1e-3, 1e-3),
    5: (1e-3, 1e-3, 1e-3),
}
# Calibrated mode: each term's size relative to the detection loss over the first `calib_batches` batches
# (soft, box, feat). The weights that give these ratios are then fixed for the run. Chosen with benchmarks/kd.py
# (50-epoch demo teacher, l1-0.6 student, 8 epochs, 3 seeds). Re-measured after issue #22: every strategy's mean
# is above plain fine-tuning (+0.13..+1.24 points mAP@.5:.95); strategy 4 (logits + box mimic + feature imitation
# through a least-squares adapter) has the best mAP@.5:.95 mean (+1.24, +0.50 mAP@.5) but a paired std of 1.44
# (one seed of three below no-KD); strategy 1 is the most consistent (+0.97, and +1.07 mAP@.5 on every seed).
DEFAULT_RATIOS: tuple[float, float, float] = (1.0, 0.05, 1.0)
# Guards on calibrated weights (calibrate.py): at most DEFAULT_WEIGHT_CAP x the ratio (the raw term is taken as at
# least 1% of the detection loss), recalibrated when a term's share exceeds DEFAULT_DRIFT x its ratio.
DEFAULT_WEIGHT_CAP = 100.0
DEFAULT_DRIFT = 2.0
DEFAULT_STRATEGY = 4  # the best of benchmarks/kd.py on mAP@.5 and mAP@.5:.95 together
LOGIT_MODES = ("sigmoid", "softmax")
FEATURE_MODES = ("at", "softmax", "fitnet")
ATTENTION_MODES = ("mean", "sum")
FEATURE_LAYERS = ("stride", "every_conv")
_USED = {1: (True, False, False), 2: (True, True, False), 3: (True, True, False), 4: (True, True, True),
         5: (True, True, True)}


@dataclass(frozen=True)
class DistillConfig:
    """How the student learns from the teacher.

    Args:
        strategy: 1 logit KD (obj+class), 2 + teacher-bounded box L2, 3 + student-to-teacher box L2,
            4 = 3 + feature KD on the neck (see `feature`), 5 = 4 masked to the ground-truth cells (default).
        temperature: temperature T of the logit (and softmax-attention) terms, scaled by T^2.
        calibrate: weigh each term so that, over the first `calib_batches` batches, it equals `ratios` times
            the detection loss (weights then fixed). False: absolute weights (the reference's by default).
        ratios: (soft, box, feat) target ratios to the detection loss; None entries take DEFAULT_RATIOS.
        w_soft, w_box, w_feat: absolute weights; a given value fixes that term's weight (no calibration).
            Unset with `calibrate=False`: the strategy's reference weight.
        logits: "sigmoid" = per-element binary KL on objectness and each class (YOLO's outputs are independent
            sigmoids); "softmax" = the reference's softmax over [obj, classes].
        confidence: with "sigmoid", weigh each cell's class term by the teacher's objectness probability
            (classes are only trained where objects are, so background class scores carry no knowledge).
        feature: "fitnet" (default) = imitate the teacher's neck features (those its heads predict from)
            through a 1x1 adapter fitted by least squares (`imitate.py`); with strategy 5 only at the objects'
            cells (fine-grained imitation). "at" = L2-normalised spatial attention maps (mean_c F^2) at every
            stride, squared distance (Zagoruyko & Komodakis); "softmax" = the reference's KL between
            softmax(mean_c |F| / T) maps.
        pairs: explicit (student layer, teacher layer) feature pairs; None pairs them by `feature_layers`.
        attention: channel reduction of the "softmax" attention map: "mean" of |F| (ours: independent of the
            channel count) or "sum" (the reference's).
        feature_layers: without `pairs`, "stride" = one feature per stride both models have; "every_conv" = the
            reference's set, every conv block not feeding a [yolo] directly, k-th with k-th (same count and
            sizes in both models, i.e. a channel-pruned student).
        baseline: also train the student without KD (same epochs, same seed) and report both.
        reference_kd1: strategy 1 softmaxes the whole 5+C vector (box logits included) like the reference.
        box_margin: margin m of the teacher-bounded regression (strategy 2).
        calib_batches: batches whose mean loss values set the calibrated weights (and the drift window).
        weight_cap: a calibrated weight is at most weight_cap x its ratio, i.e. calibration treats a raw term below
            1/weight_cap of the detection loss (a student that starts almost equal to its teacher) as that large.
        drift: after calibration, a term whose weighted mean over a window of calib_batches batches exceeds
            drift x its ratio of the detection loss is recalibrated on that window; None: weights stay fixed.
    """

    strategy: int = DEFAULT_STRATEGY
    temperature: float = 1.0
    calibrate: bool = True
    ratios: tuple[float | None, float | None, float | None] = (None, None, None)
    w_soft: float | None = None
    w_box: float | None = None
    w_feat: float | None = None
    logits: Literal["sigmoid", "softmax"] = "sigmoid"
    confidence: bool = True
    feature: Literal["at", "softmax", "fitnet"] = "fitnet"
    attention: Literal["mean", "sum"] = "mean"
    feature_layers: Literal["stride", "every_conv"] = "stride"
    pairs: tuple[tuple[int, int], ...] | None = None
    baseline: bool = False
    reference_kd1: bool = False
    box_margin: float = 0.0
    calib_batches: int = 4
    weight_cap: float = DEFAULT_WEIGHT_CAP
    drift: float | None = DEFAULT_DRIFT
    _weights: tuple[float | None, float | None, float | None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.strategy not in DEFAULT_WEIGHTS:
            raise DistillError(f"--kd {self.strategy}: unknown strategy; choose one of 1, 2, 3, 4, 5")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise DistillError(f"--temperature {self.temperature}: must be a positive number, e.g. 1 or 3")
        for name in ("w_soft", "w_box", "w_feat"):
            _nonneg(name, getattr(self, name))
        ratios = tuple(self.ratios)
        if len(ratios) != 3:
            raise DistillError(f"ratios={self.ratios}: give three values (soft, box, feat)")
        for name, v in zip(("--ratio-soft", "--ratio-box", "--ratio-feat"), ratios):
            _nonneg(name, v)
        object.__setattr__(self, "ratios", tuple(d if v is None else float(v) for v, d in zip(ratios, DEFAULT_RATIOS)))
        _choice("logits", self.logits, LOGIT_MODES)
        _choice("feature", self.feature, FEATURE_MODES)
        _choice("attention", self.attention, ATTENTION_MODES)
        _choice("feature_layers", self.feature_layers, FEATURE_LAYERS)
        if self.box_margin < 0 or not math.isfinite(self.box_margin):
            raise DistillError(f"box_margin={self.box_margin}: must be finite and >= 0")
        if self.calib_batches < 1:
            raise DistillError(f"calib_batches={self.calib_batches}: must be >= 1")
        if not (math.isfinite(self.weight_cap) and self.weight_cap > 0):
            raise DistillError(f"weight_cap={self.weight_cap}: must be a positive number, e.g. {DEFAULT_WEIGHT_CAP:g}")
        if self.drift is not None and not (math.isfinite(self.drift) and self.drift > 1):
            raise DistillError(f"drift={self.drift}: must be > 1 (e.g. {DEFAULT_DRIFT:g}) or None to keep the "
                               "calibrated weights fixed")
        if self.pairs is not None:
            pairs = tuple((int(s), int(t)) for s, t in self.pairs)
            if not pairs or any(s < 0 or t < 0 for s, t in pairs):
                raise DistillError(f"--pairs {self.pairs}: give non-empty 'student:teacher' layer indices >= 0")
            object.__setattr__(self, "pairs", pairs)
        ref = DEFAULT_WEIGHTS[self.strategy]
        explicit = (self.w_soft, self.w_box, self.w_feat)
        fixed = tuple(float(v) if v is not None else (None if self.calibrate else r) for v, r in zip(explicit, ref))
        object.__setattr__(self, "_weights", tuple(w if used else 0.0 for w, used in zip(fixed, _USED[self.strategy])))

    @classmethod
    def reference(cls, strategy: int = DEFAULT_STRATEGY, **kw) -> "DistillConfig":
        """The reference project's formulation: softmax logits and attention at T=3, its absolute weights, its
        attention map (channel sum of |F|) on every conv block not feeding a [yolo]."""
        return cls(strategy=strategy, **{"temperature": 3.0, "calibrate": False, "logits": "softmax",
                                         "feature": "softmax", "attention": "sum", "feature_layers": "every_conv",
                                         **kw})

    @property
    def fixed_weights(self) -> tuple[float | None, float | None, float | None]:
        """(soft, box, feat): a number where the weight is fixed (explicit, reference or unused = 0), None where
        it is calibrated at the start of training."""
        return self._weights

    @property
    def uses_features(self) -> bool:
        return self.strategy >= 4


def _nonneg(name: str, v: float | None) -> None:
    if v is not None and not (math.isfinite(v) and v >= 0):
        raise DistillError(f"{name}={v}: loss weights and ratios must be finite and >= 0")


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise DistillError(f"{name}={value!r}: choose one of {', '.join(options)}")


def parse_pairs(text: str | None) -> tuple[tuple[int, int], ...] | None:
    """Parse "s:t,s:t" (student layer : teacher layer) into pairs; None/empty -> None (pair by stride)."""
    if not text:
        return None
    pairs = []
    for item in text.split(","):
        s, sep, t = item.strip().partition(":")
        if not sep or not s.strip().lstrip("-").isdigit() or not t.strip().lstrip("-").isdigit():
            raise DistillError(f"--pairs {text!r}: expected 'student:teacher' layer indices, e.g. '11:11,19:19'")
        pairs.append((int(s), int(t)))
    return tuple(pairs)
