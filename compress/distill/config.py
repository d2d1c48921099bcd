"""DistillConfig: which knowledge-distillation strategy, its temperature, weights and layer pairs."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ..errors import DistillError

__all__ = ["DistillConfig", "DEFAULT_WEIGHTS", "FEATURE_MODES", "parse_pairs"]

# Reference weights per strategy (reference-algorithms.md §6): (soft logits, box, feature).
DEFAULT_WEIGHTS: dict[int, tuple[float, float, float]] = {
    1: (1e-3, 0.0, 0.0),
    2: (1e-4, 1e-3, 0.0),
    3: (1e-4, 1e-3, 0.0),
    4: (1e-3, 1e-3, 1e-3),
    5: (1e-3, 1e-3, 1e-3),
}
FEATURE_MODES = ("attention",)


@dataclass(frozen=True)
class DistillConfig:
    """How the student learns from the teacher.

    Args:
        strategy: 1 logit KD (obj+class), 2 + teacher-bounded box L2, 3 + student-to-teacher box L2 (default),
            4 = 3 + attention-map feature KD, 5 = 4 with the attention maps masked to the ground-truth cells.
        temperature: softmax temperature T of every KL term (scaled by T^2).
        w_soft, w_box, w_feat: term weights; None takes the reference value of the strategy.
        pairs: explicit (student layer, teacher layer) feature pairs; None pairs them by stride.
        baseline: also train the student without KD (same epochs, same seed) and report both.
        reference_kd1: strategy 1 softmaxes the whole 5+C vector (box logits included) like the reference.
        box_margin: margin m of the teacher-bounded regression (strategy 2).
        feature: how paired features are compared; "attention" = channel-summed |F| maps (channel-count free).
    """

    strategy: int = 3
    temperature: float = 3.0
    w_soft: float | None = None
    w_box: float | None = None
    w_feat: float | None = None
    pairs: tuple[tuple[int, int], ...] | None = None
    baseline: bool = False
    reference_kd1: bool = False
    box_margin: float = 0.0
    feature: Literal["attention"] = "attention"
    _weights: tuple[float, float, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.strategy not in DEFAULT_WEIGHTS:
            raise DistillError(f"--kd {self.strategy}: unknown strategy; choose one of 1, 2, 3, 4, 5")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise DistillError(f"--temperature {self.temperature}: must be a positive number, e.g. 3")
        for name in ("w_soft", "w_box", "w_feat"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise DistillError(f"{name}={v}: loss weights must be finite and >= 0")
        if self.box_margin < 0 or not math.isfinite(self.box_margin):
            raise DistillError(f"box_margin={self.box_margin}: must be finite and >= 0")
        if self.feature not in FEATURE_MODES:
            raise DistillError(f"feature={self.feature!r}: choose one of {', '.join(FEATURE_MODES)}")
        if self.pairs is not None:
            pairs = tuple((int(s), int(t)) for s, t in self.pairs)
            if not pairs or any(s < 0 or t < 0 for s, t in pairs):
                raise DistillError(f"--pairs {self.pairs}: give non-empty 'student:teacher' layer indices >= 0")
            object.__setattr__(self, "pairs", pairs)
        ref = DEFAULT_WEIGHTS[self.strategy]
        object.__setattr__(self, "_weights", tuple(
            r if v is None else float(v) for v, r in zip((self.w_soft, self.w_box, self.w_feat), ref)))

    @property
    def weights(self) -> tuple[float, float, float]:
        """(soft, box, feature) weights in effect (explicit values or the strategy's reference values)."""
        return self._weights

    @property
    def uses_features(self) -> bool:
        return self.strategy >= 4


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
