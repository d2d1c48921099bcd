"""Weights for the KD terms, calibrated against the detection loss at the start of training.

The reference's absolute weights were tuned for a detection loss 50-100x larger than ours, and any change of the
detection loss (its gains, `--loss darknet|v5`) would shift the balance again. So by default each term's weight
is set from the first `calib_batches` batches: `w_k = ratio_k * mean(detection loss) / mean(raw term k)`, i.e.
the weighted term starts at `ratio_k` times the detection loss, whatever either scale is. The weights are then
fixed, so the terms keep their natural decay during training (KD fades as the student approaches the teacher).

Two guards keep a calibrated weight from running away:
* a cap, `w_k <= weight_cap * ratio_k`: a student that starts almost equal to its teacher has a tiny raw term,
  and dividing by it would give a huge weight that dominates the loss as soon as the student moves;
* a drift check: after calibration, every `calib_batches` batches the term's weighted mean is compared with the
  detection loss over that window; above `drift * ratio_k` the weight is recalibrated on the window (capped
  again). Only upward: a share that falls is the intended decay, and chasing it would amplify a vanishing term.
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
    after `config.calib_batches` observations they are frozen, then watched for drift (see the module docstring).
    A term that is 0 at the start (student = teacher) cannot be calibrated and keeps the reference weight.
    """

    def __init__(self, config: DistillConfig) -> None:
        self.config = config
        self.fixed = dict(zip(TERMS, config.fixed_weights))
        self.ratios = dict(zip(TERMS, config.ratios))
        self.n = 0
        self.det_sum = 0.0
        self.raw_sums = {k: 0.0 for k in TERMS}
        self.frozen: dict[str, float] | None = None
        self.window = {"n": 0, "det": 0.0, **{k: 0.0 for k in TERMS}}
        self.seen = 0  # batches observed in all
        self.recalibrations: list[dict] = []

    @property
    def calibrated_terms(self) -> tuple[str, ...]:
        return tuple(k for k, w in self.fixed.items() if w is None)

    @property
    def needed(self) -> bool:
        """Still calibrating (the first `calib_batches` batches)."""
        return self.frozen is None and bool(self.calibrated_terms)

    @property
    def watching(self) -> bool:
        """Wants every batch's values: calibrating, or checking the calibrated weights for drift."""
        return self.needed or (self.frozen is not None and self.config.drift is not None
                               and bool(self.calibrated_terms))

    def observe(self, det: float, raw: dict[str, float]) -> None:
        """One batch's per-image detection loss and unweighted KD terms (already averaged over processes)."""
        if not self.watching:
            return
        self.seen += 1
        if not self.needed:
            self._watch(det, raw)
            return
        self.n += 1
        self.det_sum += det
        for k in TERMS:
            self.raw_sums[k] += raw.get(k, 0.0)
        if self.n >= self.config.calib_batches:
            self.frozen = self.weights()
            log.info("distillation weights calibrated over %d batches: %s", self.n,
                     ", ".join(f"{k}={v:.4g}" for k, v in self.frozen.items()))

    def _watch(self, det: float, raw: dict[str, float]) -> None:
        win = self.window
        win["n"] += 1
        win["det"] += det
        for k in TERMS:
            win[k] += raw.get(k, 0.0)
        if win["n"] < self.config.calib_batches:
            return
        for k in self.calibrated_terms:
            raw_mean, det_mean = win[k] / win["n"], win["det"] / win["n"]
            share = self.frozen[k] * raw_mean / det_mean if det_mean > 0 else 0.0
            if share > self.config.drift * self.ratios[k]:
                new = self._weight(k, raw_mean, det_mean)
                self.recalibrations.append({"batch": self.seen, "term": k, "ratio_was": share,
                                            "weight_was": self.frozen[k], "weight": new})
                log.info("distillation: %s had drifted to %.3g x the detection loss (target %.3g); weight %.4g -> "
                         "%.4g", k, share, self.ratios[k], self.frozen[k], new)
                self.frozen[k] = new
        self.window = {"n": 0, "det": 0.0, **{k: 0.0 for k in TERMS}}

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
        return self._weight(k, self.raw_sums[k] / self.n, self.det_sum / self.n)

    def _weight(self, k: str, raw: float, det: float) -> float:
        """ratio * det / raw, capped at weight_cap * ratio; the reference weight when raw is (about) zero."""
        if not (math.isfinite(raw) and raw > _TINY * max(det, 1.0)):
            return DEFAULT_WEIGHTS[self.config.strategy][TERMS.index(k)]
        return min(self.ratios[k] * det / raw, self.config.weight_cap * self.ratios[k])

    def start_values(self) -> dict[str, float]:
        """Mean detection loss and raw terms over the calibration batches (for the report)."""
        n = max(self.n, 1)
        return {"det": self.det_sum / n, **{k: v / n for k, v in self.raw_sums.items()}, "batches": self.n}

    def state_dict(self) -> dict:
        return {"n": self.n, "det_sum": self.det_sum, "raw_sums": dict(self.raw_sums), "frozen": self.frozen,
                "window": dict(self.window), "seen": self.seen, "recalibrations": list(self.recalibrations)}

    def load_state_dict(self, state: dict) -> None:
        self.n, self.det_sum = int(state["n"]), float(state["det_sum"])
        self.raw_sums = {k: float(v) for k, v in state["raw_sums"].items()}
        self.frozen = dict(state["frozen"]) if state.get("frozen") is not None else None
        self.window = dict(state.get("window") or {"n": 0, "det": 0.0, **{k: 0.0 for k in TERMS}})
        self.seen = int(state.get("seen", self.n))
        self.recalibrations = list(state.get("recalibrations", []))
