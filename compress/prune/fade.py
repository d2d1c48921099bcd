"""Targeted sparse training ("fade"): drive to zero exactly the channels the prune step will cut, and only those.

Global L1 on BN gammas (sparsity.py) asks a pretrained model to find its own sparsity: on yolov4-tiny it drove
no gamma near zero in 4 epochs, or, pushed harder, destroyed the model (issue 23). Fading instead fixes the cut
first, with the prune step's own planner (`prune.api.plan_mask`: --percent, a FLOPs/params target, rounding,
couplings, floors), and then, while the model trains (with distillation from the original when a teacher is
given), caps the BN gamma AND beta of every planned channel at `alpha(t) * |their starting value|`, alpha going
linearly from 1 to 0 at `end` of the optimizer steps. For leaky/ReLU/linear activations scaling both is scaling
the channel's output, so the network sees its channels dim gradually and re-learns around them; after `end` the
remaining epochs train the pruned structure itself. The saved model has those channels at exactly gamma = beta = 0,
so `prune --method slim --threshold 0` cuts exactly them (whichever method planned them) and the pruned model
computes what the sparse one did (`FadeHook.check_prune` measures that on the saved model).

The EMA copy is capped too: a convex mix of two capped tensors stays inside the cap, and at alpha = 0 it is 0.
The plan and the starting magnitudes are kept in OUT/fade_plan.json, so `--resume` continues the same fade
(and OUT/fade_history.json its per-epoch rows).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import torch

from compress.base.errors import PruneError
from compress.base.fileio import write_text_atomic
from compress.darknet.model import DarknetModel
from compress.darknet.summary import bn_gammas, gamma_stats, summarize
from compress.prune.api import plan_mask, prune
from compress.prune.coupling import build_coupling, prunable_layers
from compress.prune.importance import taylor_bn_scores
from compress.prune.mask import ChannelMask
from compress.prune.registry import METHODS, PruneConfig
from compress.train import Hook, TrainState

__all__ = ["FadeConfig", "FadeHook", "PLAN_FILE", "HISTORY_FILE"]

log = logging.getLogger(__name__)
PLAN_FILE = "fade_plan.json"
HISTORY_FILE = "fade_history.json"  # the per-epoch rows, each with its optimizer step (a resume keeps those <= its own)


@dataclass(frozen=True)
class FadeConfig:
    """plan: the prune the fade prepares (a channel method with --percent or a FLOPs/params target). end: share
    of the optimizer steps after which the planned channels are exactly zero (the rest trains the pruned
    structure). importance: what ranks the channels: `method` (the plan method's own scores) or `taylor`
    (`importance.taylor_bn_scores` of the training loss on the training images, before training)."""
    plan: PruneConfig = PruneConfig(method="slim", percent=0.5)
    end: float = 0.6
    importance: str = "method"
    name: ClassVar[str] = "fade"

    def __post_init__(self) -> None:
        if METHODS[self.plan.method].kind != "channel":
            channel = ", ".join(sorted(n for n, p in METHODS.items() if p.kind == "channel"))
            raise PruneError(f"--sparsity fade prepares a channel prune; --method {self.plan.method} removes "
                             f"layers: use one of {channel}")
        if self.plan.target is not None and self.plan.target.metric == "latency":
            raise PruneError(f"--sparsity fade plans with FLOPs or parameters ({self.plan.target.option} needs a "
                             "latency table): use --target-flops / --target-params or --percent")
        if self.plan.threshold is not None:
            raise PruneError("--sparsity fade plans with --percent or a target, not --threshold")
        if self.importance not in IMPORTANCE:
            raise PruneError(f"--importance {self.importance!r} is unknown; use one of {', '.join(IMPORTANCE)}")
        if not 0.0 < self.end <= 1.0:
            raise PruneError(f"--fade-end {self.end} must be in (0, 1]: the share of training after which the "
                             "planned channels are zero")

    def hook(self, model: DarknetModel, steps_per_epoch: int, images: Sequence[str | os.PathLike] = (),
             train_config=None, device: str | torch.device = "cpu") -> "FadeHook":
        """The hook, its plan made now on `model` (ranked on `images` with the training loss for `taylor`)."""
        scores = IMPORTANCE[self.importance](model, images, train_config, device)
        return FadeHook(self, model, steps_per_epoch, scores)

    def prune_config(self) -> PruneConfig:
        """What cuts the faded model: slim (whichever method planned: a faded channel's score is its gamma, 0)
        with the plan's rounding, every channel at |gamma| = 0."""
        p = self.plan
        return PruneConfig(method="slim", round_to=p.round_to, layer_keep=p.keep_floor, min_keep=p.min_keep,
                           compensate=p.compensate, img_size=p.img_size, threshold=0.0)

    def to_dict(self) -> dict:
        p = self.plan
        return {"fade": {"method": p.method, "importance": self.importance,
                         "percent": None if p.target else p.percent,
                         "target": p.target.to_dict() if p.target else None, "round_to": p.rounding,
                         "layer_keep": p.keep_floor, "end": self.end}}


def _taylor(model: DarknetModel, images: Sequence[str | os.PathLike], train_config, device) -> dict[int, torch.Tensor]:
    if not images or train_config is None:
        raise PruneError("--importance taylor needs training images and the training options")
    return taylor_bn_scores(model, prunable_layers(build_coupling(model.graph), 1), images, train_config, device)


# --importance NAME -> per-channel scores for the plan (None: the plan method's own)
IMPORTANCE: dict[str, Callable[..., dict[int, torch.Tensor] | None]] = {
    "method": lambda model, images, train_config, device: None, "taylor": _taylor}


class FadeHook(Hook):
    """Caps the BN gamma/beta of the planned channels at alpha(step) x their start values after every optimizer
    step (training model and EMA copy); per-epoch alpha and share of the planned channels at zero."""

    def __init__(self, config: FadeConfig, model: DarknetModel, steps_per_epoch: int = 100,
                 scores: dict[int, torch.Tensor] | None = None) -> None:
        self.config, self.steps_per_epoch = config, max(1, steps_per_epoch)
        self.mask: ChannelMask = {}
        self.info: dict = {}
        self.start: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # conv -> (|gamma0|, |beta0|) of cut channels
        self.cut: dict[int, torch.Tensor] = {}                          # conv -> indices of its planned channels
        self.history: list[dict] = []
        self.total_steps = 1
        self._plan(model, scores)

    def _plan(self, model: DarknetModel, scores: dict[int, torch.Tensor] | None) -> None:
        self.mask, info = plan_mask(model, self.config.plan, scores=scores)
        self.info = {k: v for k, v in info.items() if not isinstance(v, torch.Tensor)}
        self._set_cut(model)

    def _set_cut(self, model: DarknetModel) -> None:
        self.cut, self.start = {}, {}
        for i, keep in self.mask.items():
            bn = getattr(model.layers[i], "bn", None)
            idx = torch.nonzero(~keep).flatten()
            if bn is None or not len(idx):
                continue
            self.cut[i] = idx
            self.start[i] = (bn.weight.detach()[idx].abs().cpu().clone(), bn.bias.detach()[idx].abs().cpu().clone())

    @property
    def planned(self) -> int:
        return sum(len(v) for v in self.cut.values())

    def alpha(self, step: int) -> float:
        end = self.config.end * self.total_steps
        return max(0.0, 1.0 - step / end)

    def on_fit_start(self, state: TrainState) -> None:
        self.total_steps = max(1, state.epochs * self.steps_per_epoch)
        path = Path(state.out_dir) / PLAN_FILE if state.out_dir is not None else None
        if getattr(state.config, "resume", False) and path is not None and path.is_file():
            self._load(path, state.model)
            self.history = [r for r in self._rows(path.with_name(HISTORY_FILE)) if r.get("step", 0) <= state.step]
        elif path is not None and state.rank == 0:
            self._save(path)
        log.info("fade: %d planned channels in %d convs reach zero at step %d of %d", self.planned, len(self.cut),
                 round(self.config.end * self.total_steps), self.total_steps)

    @torch.no_grad()
    def after_step(self, state: TrainState) -> None:
        a = self.alpha(state.step + 1)
        models = [state.model] + ([state.ema.module] if state.ema is not None else [])
        for model in models:
            for i, idx in self.cut.items():
                bn, (g0, b0) = model.layers[i].bn, self.start[i]
                for p, m in ((bn.weight, g0), (bn.bias, b0)):
                    cap = (m * a).to(p.device, p.dtype)
                    p.data[idx.to(p.device)] = torch.maximum(torch.minimum(p.data[idx.to(p.device)], cap), -cap)

    def on_epoch_end(self, state: TrainState, metrics: dict) -> None:
        saved = state.ema.module if getattr(state, "ema", None) is not None else state.model
        zero = sum(int((saved.layers[i].bn.weight.detach()[idx] == 0).sum()) for i, idx in self.cut.items())
        row = {"epoch": state.epoch, "step": state.step, "alpha": self.alpha(state.step),
               "planned_at_zero": zero / max(1, self.planned),
               "map50": metrics.get("map50"), "map50_95": metrics.get("map50_95"),
               **gamma_stats(bn_gammas(saved, list(self.mask)))}
        self.history.append(row)
        metrics.update({"fade_alpha": row["alpha"], "planned_at_zero": row["planned_at_zero"],
                        "gamma_below_1e-2": row.get("share_below_1e-2")})
        log.info("epoch %d fade: alpha %.3f, %.1f%% of the %d planned channels at zero", state.epoch + 1,
                 row["alpha"], 100 * row["planned_at_zero"], self.planned)
        if state.out_dir is not None and state.rank == 0:
            write_text_atomic(Path(state.out_dir) / HISTORY_FILE, json.dumps(self.history, default=float) + "\n")

    @staticmethod
    def _rows(path: Path) -> list[dict]:
        try:
            rows = json.loads(path.read_text())
            return rows if isinstance(rows, list) else []
        except (OSError, ValueError):
            return []

    def _save(self, path: Path) -> None:
        data = {"config": self.config.to_dict()["fade"], "info": self.info,
                "mask": {str(i): [int(j) for j in torch.nonzero(~m).flatten()] for i, m in self.mask.items()},
                "widths": {str(i): len(m) for i, m in self.mask.items()},
                "start": {str(i): [g.tolist(), b.tolist()] for i, (g, b) in self.start.items()}}
        write_text_atomic(path, json.dumps(data) + "\n")

    def _load(self, path: Path, model: DarknetModel) -> None:
        """The plan and start magnitudes of the interrupted run (the model it resumes is partly faded)."""
        try:
            data = json.loads(path.read_text())
            self.mask = {}
            for key, cut in data["mask"].items():
                keep = torch.ones(int(data["widths"][key]), dtype=torch.bool)
                keep[torch.tensor(cut, dtype=torch.long)] = False
                self.mask[int(key)] = keep
            self.cut = {int(k): torch.tensor(v, dtype=torch.long) for k, v in data["mask"].items() if v}
            self.start = {int(k): (torch.tensor(g), torch.tensor(b)) for k, (g, b) in data["start"].items()}
            self.info = data.get("info", {})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PruneError(f"{path}: cannot read the fade plan of the interrupted run ({e}); start again "
                             "without --resume in a new --out") from e

    def check_prune(self, model: DarknetModel, img_size: int) -> dict:
        """Prune the saved model with `prune_config()` and compare: the cut must be the plan, and the pruned
        model's head outputs those of `model` (max |difference| on a random image; channels at gamma = beta = 0
        leave nothing but constants the surgery folds)."""
        result = prune(model, self.config.prune_config())
        same_plan = set(result.mask) == set(self.mask) and all(torch.equal(result.mask[i], self.mask[i])
                                                                for i in self.mask)
        x = torch.rand(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
        device = next(model.parameters()).device
        with torch.no_grad():
            a, b = model.eval()(x.to(device)), result.model.to(device).eval()(x.to(device))
        diff = float((a - b).abs().max())  # eval mode: the decoded heads, one tensor
        size = (img_size, img_size)
        before, after = summarize(model, size), summarize(result.model, size)
        return {"prune_matches_plan": same_plan, "prune_max_abs_diff": diff,
                "gflops_ratio_after_prune": round(after.gflops / before.gflops, 4),
                "params_ratio_after_prune": round(after.params / before.params, 4)}

    def summary(self, model: DarknetModel, img_size: int) -> dict:
        p = self.config.prune_config()
        command = f"prune --method {p.method} --threshold 0" + (f" --round-to {p.round_to}" if p.round_to else "")
        out = {"fade": {**self.config.to_dict()["fade"], "planned_channels": self.planned, "convs": len(self.cut),
                        "plan_info": {k: v for k, v in self.info.items() if not isinstance(v, (list, dict))}},
               "gamma": gamma_stats(bn_gammas(model, list(self.mask))), "prune_with": command,
               **self.check_prune(model, img_size)}
        if not out["prune_matches_plan"] or out["prune_max_abs_diff"] > 1e-3:
            log.warning("fade: `%s` on the saved model does not cut exactly the plan (matches %s, max |diff| %.3g)",
                        command, out["prune_matches_plan"], out["prune_max_abs_diff"])
        return out
