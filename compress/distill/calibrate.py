"""Weights for the KD terms, calibrated against the detection loss at the start of training.

The reference's absolute weights were tuned for a detection loss 50-100x larger than ours, and any change of the
detection loss (its gains, `--loss darknet|v5`) would shift the balance again. So by default each term's weight
is set from the first `calib_batches` batches: `w_k = ratio_k * mean(detection loss) / mean(raw term k)`, i.e.
the weighted term starts at `ratio_k` times the detection loss, whatever either scale is. The weights are then
fixed, so the terms keep their natural decay during training (KD fades as the student approaches the teacher).
"""
from __future__ import annotations

import logging
import math

from compress.distill.config import DEFAULT_WEIGHTS, TERMS, DistillConfig

__all__ = ["Calibrator"]

log = logging.getLogger(__name__)
_TINY = 1e-12


class Calibrator:
    """Collects (detection loss, raw terms) for the first batches and yields the weights in effect.

    During calibration the weights follow the running means (so batch 1 already has the target ratios exactly);
    after `config.calib_batches` observations they are frozen. A term that is 0 at the start (student = teacher)
    cannot be calibrated and keeps the reference weight.
    """

    def __init__(self, config: DistillConfig) -> None:
        self.config = config
        self.fixed = dict(zip(TERMS, config.fixed_weights))
        self.ratios = dict(zip(TERMS, config.ratios))
        self.n = 0
        self.det_sum = 0.0
        self.raw_sums = {k: 0.0 for k in TERMS}
        self.frozen: dict[str, float] | None = None

    @property
    def needed(self) -> bool:
        return self.frozen is None and any(w is None for w in self.fixed.values())

    def observe(self, det: float, raw: dict[str, float]) -> None:
        """One batch's per-image detection loss and unweighted KD terms (already averaged over processes)."""
        if not self.needed:
            return
        self.n += 1
        self.det_sum += det
        for k in TERMS:
            self.raw_sums[k] += raw.get(k, 0.0)
        if self.n >= self.config.calib_batches:
            self.frozen = self.weights()
            log.info("distillation weights calibrated over %d batches: %s", self.n,
                     ", ".join(f"{k}={v:.4g}" for k, v in self.frozen.items()))

    def weights(self) -> dict[str, float]:
        if self.frozen is not None:
            return dict(self.frozen)
        out = {}
        for k, w in self.fixed.items():
            out[k] = w if w is not None else self._calibrated(k)
        return out

    def _calibrated(self, k: str) -> float:
        if self.n == 0:
            return 0.0  # not observed yet: weights are computed after the first observation
        raw = self.raw_sums[k] / self.n
        det = self.det_sum / self.n
        if not (math.isfinite(raw) and raw > _TINY * max(det, 1.0)):
            return DEFAULT_WEIGHTS[self.config.strategy][TERMS.index(k)]
        return self.ratios[k] * det / raw

    def start_values(self) -> dict[str, float]:
        """Mean detection loss and raw terms over the calibration batches (for the report)."""
        n = max(self.n, 1)
        return {"det": self.det_sum / n, **{k: v / n for k, v in self.raw_sums.items()}, "batches": self.n}

    def state_dict(self) -> dict:
        return {"n": self.n, "det_sum": self.det_sum, "raw_sums": dict(self.raw_sums), "frozen": self.frozen}

    def load_state_dict(self, state: dict) -> None:
        self.n, self.det_sum = int(state["n"]), float(state["det_sum"])
        self.raw_sums = {k: float(v) for k, v in state["raw_sums"].items()}
        self.frozen = dict(state["frozen"]) if state.get("frozen") is not None else None
