"""DistillHook: the training hook that adds the knowledge-distillation loss to `fit()`."""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from compress.base.errors import DistillError
from compress.base.fileio import write_bytes_atomic, write_text_atomic
from compress.base.jsonio import read_json, require
from compress.detection.losses import LossConfig, YoloLoss, build_targets
from compress.darknet.model import DarknetModel
from compress.train.distributed import group_size
from compress.train.hooks import Hook
from compress.distill.calibrate import Calibrator
from compress.distill.config import TERMS, DistillConfig
from compress.distill.features import (FeatureTap, check_compatible, pair_by_stride, pair_every_conv, pair_heads,
                                       validate_pairs)
from compress.distill.imitate import LstsqAdapter
from compress.distill.losses import STRATEGIES, HeadPositives, KDInputs

__all__ = ["DistillHook", "METRIC_KEYS", "STATE_FILE"]

log = logging.getLogger(__name__)
METRIC_KEYS = frozenset({"kd_bounded_frac"})  # reported by strategies but not loss terms
STATE_FILE = "kd_state.json"  # calibration + share history in fit's out_dir, so --resume continues exactly
ADAPTER_FILE = "kd_adapters.pt"  # feature="fitnet": the adapters' moving moments (at the last epoch end)


class DistillHook(Hook):
    """Adds `STRATEGIES[config.strategy]`, weighted (fixed or calibrated weights, see `calibrate.py`), to the
    student's loss. The teacher runs in eval mode under `torch.no_grad()` with frozen parameters, so gradients
    reach only the student. `shares` holds, per epoch, each term's share of the total loss (detection + KD).

    Example:
        >>> fit(student, data, TrainConfig(epochs=30), hooks=[DistillHook(teacher, DistillConfig(strategy=3))])
    """

    def __init__(self, teacher: DarknetModel, config: DistillConfig = DistillConfig()) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.config = config
        self.calibrator = Calibrator(config)
        self.pairs: tuple[tuple[int, int], ...] = ()
        self.head_map: list[int] = []
        self.stats: dict[str, float] = {}
        self.shares: list[dict[str, float]] = []
        self._taps: tuple[FeatureTap, FeatureTap] | None = None
        self._student: DarknetModel | None = None
        self._sums: dict[str, float] = {}
        self._n = 0
        self._det_fn: YoloLoss | None = None
        self.adapters: list[LstsqAdapter] = []  # feature="fitnet": one per pair, kept across setup() calls

    @property
    def weights(self) -> dict[str, float]:
        """The weights in effect (calibrated ones once the first batch was seen)."""
        return self.calibrator.weights()

    def setup(self, student: DarknetModel, img_hw: tuple[int, int] | None = None) -> None:
        """Pair heads and features (at the student cfg's input size unless given) and attach the feature taps."""
        check_compatible(student, self.teacher)
        img_hw = img_hw or (student.cfg.height, student.cfg.width)
        self.head_map = pair_heads(student, self.teacher, img_hw)
        if self.config.uses_features:
            self.pairs = self._pair_features(student, img_hw)
            if self.config.feature == "fitnet" and len(self.adapters) != len(self.pairs):
                self.adapters = [LstsqAdapter() for _ in self.pairs]
            self._taps = (FeatureTap(student, [s for s, _ in self.pairs]),
                          FeatureTap(self.teacher, [t for _, t in self.pairs]))
        self._student = student

    def _pair_features(self, student: DarknetModel, img_hw: tuple[int, int]) -> tuple[tuple[int, int], ...]:
        if self.config.pairs:
            return validate_pairs(student, self.teacher, self.config.pairs, img_hw)
        if self.config.feature_layers == "every_conv":
            return pair_every_conv(student, self.teacher, img_hw)
        return pair_by_stride(student, self.teacher, img_hw, heads_only=self.config.feature == "fitnet")

    def teardown(self) -> None:
        if self._taps:
            for tap in self._taps:
                tap.remove()
        self._taps, self._student = None, None

    # ------------------------------------------------------------------ Hook interface of compress.train.fit
    def on_fit_start(self, state: Any) -> None:
        self.teacher.to(state.device)
        self.setup(state.model)
        config = getattr(state, "config", None)
        if getattr(config, "resume", False) and state.out_dir is not None:
            self._load_state(Path(state.out_dir) / STATE_FILE)

    def extra_loss(self, state: Any, imgs: Tensor, targets: Tensor, heads: list[Tensor]) -> dict[str, Tensor]:
        if self._student is not state.model:
            self.teardown()
            self.setup(state.model)
        det = self._det_loss(state, imgs, targets, heads)
        parts = self.loss(imgs, targets, heads, det)
        self._accumulate(parts, det)
        if self.calibrator.frozen is not None and self.calibrator.n == self.config.calib_batches:
            self._save_state(state)  # once, right after calibration
        return {k: v for k, v in parts.items() if k not in METRIC_KEYS}

    def on_epoch_end(self, state: Any, metrics: dict) -> None:
        n = max(self._n, 1)
        self.stats = {k: v / n for k, v in self._sums.items()}
        total = sum(v for k, v in self.stats.items() if k == "det" or k in TERMS)
        self.shares.append({"epoch": getattr(state, "epoch", len(self.shares)) + 1,
                            **{k: self.stats[k] / total if total > 0 else 0.0
                               for k in ("det", *TERMS) if k in self.stats}})
        log.info("epoch %s distillation: %s; share of the loss: %s", getattr(state, "epoch", 0) + 1,
                 ", ".join(f"{k}={v:.4g}" for k, v in self.stats.items()),
                 ", ".join(f"{k} {v:.1%}" for k, v in self.shares[-1].items() if k != "epoch"))
        self._sums, self._n = {}, 0
        self._save_state(state)

    def on_fit_end(self, state: Any) -> None:
        self.teardown()

    # ------------------------------------------------------------------ the loss itself
    def loss(self, imgs: Tensor, targets: Tensor, heads: list[Tensor], det: Tensor | float | None = None
             ) -> dict[str, Tensor]:
        """Weighted KD terms for a batch whose student forward (raw `heads`) already ran with the taps attached.
        `det` (per-image detection loss of the batch) feeds the calibration while it runs."""
        raw = self.raw_terms(imgs, targets, heads)
        if det is not None and self.calibrator.watching:
            values = {k: v.detach() for k, v in raw.items() if k in TERMS}
            values["det"] = torch.as_tensor(det, dtype=torch.float32).detach()
            names = list(values)
            stacked = torch.stack([values[k].to(torch.float32).reshape(()) for k in names])
            if group_size() > 1:  # every process must use the same weights
                dist.all_reduce(stacked)
                stacked /= group_size()
            values = dict(zip(names, stacked.tolist()))
            self.calibrator.observe(values.pop("det"), values)
        w = self.calibrator.weights()
        return {k: (w[k] * v if k in TERMS else v) for k, v in raw.items()}

    def raw_terms(self, imgs: Tensor, targets: Tensor, heads: list[Tensor]) -> dict[str, Tensor]:
        """The strategy's unweighted terms."""
        if self._student is None:
            raise DistillError("DistillHook.loss called before setup(student); pass the hook to fit()")
        img_hw = (int(imgs.shape[-2]), int(imgs.shape[-1]))
        self.teacher.eval()
        with torch.no_grad():
            t_all = self.teacher(imgs, raw=True)
        t_heads = [t_all[k] for k in self.head_map]
        for s, t in zip(heads, t_heads):
            if s.shape != t.shape:
                raise DistillError(f"student head {tuple(s.shape)} and teacher head {tuple(t.shape)} differ at input "
                                   f"{img_hw[1]}x{img_hw[0]}; use an input size both models divide")
        inputs = KDInputs(heads, t_heads, self._positives(heads, targets, img_hw), self._features(), img_hw,
                          self._scales(), self._new_coords(), tuple(self.adapters))
        return STRATEGIES[self.config.strategy](inputs, self.config)

    def _det_loss(self, state: Any, imgs: Tensor, targets: Tensor, heads: list[Tensor]) -> Tensor:
        """fit() publishes the batch's per-image detection loss in state.extra; other loops get it recomputed."""
        det = getattr(state, "extra", {}).get("det_loss")
        if det is not None:
            return det
        if self._det_fn is None:
            c = getattr(state, "config", None)
            hyp = LossConfig(box=c.box, obj=c.obj, cls=c.cls) if c is not None else LossConfig()
            self._det_fn = YoloLoss(state.model, hyp)
        with torch.no_grad():
            loss, _ = self._det_fn(heads, targets, (int(imgs.shape[-2]), int(imgs.shape[-1])))
        return loss / imgs.shape[0]

    def _positives(self, heads: list[Tensor], targets: Tensor, img_hw: tuple[int, int]) -> list[HeadPositives] | None:
        if self.config.strategy < 2:
            return None
        out = []
        for tg, k, p in zip(build_targets(heads, targets, self._student, img_hw), self.head_map, heads):
            stride = torch.tensor([img_hw[1] / p.shape[3], img_hw[0] / p.shape[2]], device=p.device)
            anchors_t = self.teacher.heads[k].anchors.to(p.device, torch.float32)[tg.a] / stride
            out.append(HeadPositives(tg.b, tg.a, tg.gy, tg.gx, tg.tbox, tg.anchors, anchors_t))
        return out

    def _features(self) -> list[tuple[Tensor, Tensor]]:
        if not self._taps:
            return []
        fs, ft = self._taps[0].features, self._taps[1].features
        return [(fs[s], ft[t]) for s, t in self.pairs]

    def _scales(self) -> tuple[tuple[float, float], ...]:
        return tuple((s.scale_x_y, self.teacher.heads[k].scale_x_y) for s, k in zip(self._student.heads, self.head_map))

    def _new_coords(self) -> tuple[tuple[bool, bool], ...]:
        return tuple((bool(s.new_coords), bool(self.teacher.heads[k].new_coords))
                     for s, k in zip(self._student.heads, self.head_map))

    def _accumulate(self, parts: dict[str, Tensor], det: Tensor | float) -> None:
        for k, v in {**parts, "det": torch.as_tensor(det)}.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v.detach())
        self._n += 1

    # ------------------------------------------------------------------ resumable state (rank 0 writes)
    def state_dict(self) -> dict:
        return {"calibration": self.calibrator.state_dict(), "shares": self.shares,
                "config": {"strategy": self.config.strategy, "ratios": list(self.config.ratios)}}

    def _save_state(self, state: Any) -> None:
        if state.out_dir is None or getattr(state, "rank", 0) != 0:
            return
        Path(state.out_dir).mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(state.out_dir) / STATE_FILE, json.dumps(self.state_dict(), indent=1) + "\n")
        if self.adapters:
            buf = io.BytesIO()
            torch.save([a.state_dict() for a in self.adapters], buf)
            write_bytes_atomic(Path(state.out_dir) / ADAPTER_FILE, buf.getvalue())

    def _load_state(self, path: Path) -> None:
        if not path.is_file():
            log.warning("%s missing: the distillation weights are calibrated again on the resumed run", path)
            return
        fix = "resume from an intact run, or start again without --resume"
        saved = require(read_json(path, DistillError, fix), {"calibration": dict}, path,
                        DistillError, fix)
        try:
            self.calibrator.load_state_dict(saved["calibration"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DistillError(f"{path}: 'calibration' is not a calibration state ({exc.__class__.__name__}: "
                               f"{exc}); {fix}") from None
        shares = saved.get("shares", [])
        self.shares = list(shares) if isinstance(shares, list) else []
        adapters = path.parent / ADAPTER_FILE
        if self.adapters and adapters.is_file():
            self._load_adapters(adapters, fix)

    def _load_adapters(self, path: Path, fix: str) -> None:
        """The adapters' moments; a file holding code (refused by weights_only) or other tensors is one error."""
        try:
            states = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(states, list) or len(states) != len(self.adapters):
                raise ValueError(f"expected a list of {len(self.adapters)} adapter states")
            for a, st in zip(self.adapters, states):
                a.load_state_dict(st)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for a hostile or corrupt file
            first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:160]
            raise DistillError(f"{path}: refused: not the adapter state this run wrote ({first}); {fix}") from None
