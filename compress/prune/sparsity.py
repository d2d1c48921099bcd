"""Sparse training (network slimming): L1 pressure on BN gammas, as a `fit()` hook.

How the pressure is applied (`UPDATES` registry, `SparsityConfig.update`):
* `subgradient` (the reference): `grad(gamma) += s * sign(gamma)` in `after_backward`, once per optimizer step
  on UNSCALED gradients (fit's contract), so it is neither ~65536x too weak under AMP nor multiplied by
  gradient accumulation (reference bugs). Right for SGD; under Adam the adaptive normalisation divides it
  away (every step moves gamma by ~lr whatever s is), so Adam never sparsifies this way.
* `proximal`: after `optimizer.step()`, the L1 proximal step (soft threshold) `gamma <- sign(gamma) *
  max(|gamma| - t, 0)`. For Adam/AdamW `t = lr * s / (sqrt(v_hat) + eps)`, the proximal operator in Adam's own
  diagonal metric (ProxGen, Yun et al. 2021): s keeps the meaning it has under SGD (loss units), and a gamma
  whose loss gradient is small relative to s reaches exactly 0. For SGD `t = lr * s`.
* `auto` (default): proximal for adaptive optimizers (Adam/AdamW), subgradient for SGD.

Schedules (`SCHEDULES` registry; `decay_at` = fraction of epochs):
* `constant`: s for every epoch;
* `step`: s * 0.01 from `decay_at` on (tanluren "global decay");
* `relax`: from `decay_at` on, the top 15% gammas (above the 85th percentile) get 99% less penalty.

Target sparsity (`target`): after every optimizer step, s is multiplied by `growth ** (1 / steps_per_epoch)`
while fewer than `target` of the set's |gamma| are below 1e-2 (divided by it while more than target + 0.05
are), so s grows by `growth` per epoch until the share is reached. Statistics, the suggested prune percent
and the epoch the target is reached are measured on the EMA copy when training keeps one (what is saved).
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import torch

from compress.base.errors import PruneError
from compress.base.fileio import write_text_atomic
from compress.darknet.model import DarknetModel
from compress.darknet.persist import load, save
from compress.darknet.summary import bn_gammas, gamma_stats, plot_gamma_histogram, stage_figures
from compress.prune.coupling import build_coupling, prunable_layers
from compress.prune.mask import safe_percent
from compress.prune.fade import FadeConfig, FadeHook
from compress.train import Hook, TrainState, fit
from compress.train.checkpoint import seed_all

__all__ = ["SparsityConfig", "BNL1Hook", "SCHEDULES", "UPDATES", "ZERO", "sparsity_layers", "sparse_train",
           "run_sparse_train"]

log = logging.getLogger(__name__)
ZERO = 1e-2            # a gamma below this counts as pruned-to-be (the `share_below_1e-2` statistic)
_BAND = 0.05           # target controller: hold s while target <= share <= target + _BAND
_SCALE_RANGE = (1e-3, 1e6)
STATE_FILE = "sparsity_state.json"


@dataclass(frozen=True)
class SparsityConfig:
    """s: L1 strength (start value with `target`). mode: prune set 0/1/2. schedule: a SCHEDULES key (decay_at,
    keep_top, relief tune step/relax). update: auto | an UPDATES key. target: share of |gamma| < 1e-2 to reach
    (None: s as given). growth: factor on s per epoch while below the target."""
    s: float = 1e-3
    mode: int = 0
    schedule: str = "constant"
    decay_at: float = 0.5
    keep_top: float = 0.15
    relief: float = 0.99
    update: str = "auto"
    target: float | None = None
    growth: float = 2.0
    name: ClassVar[str] = "l1"

    def hook(self, model: DarknetModel, steps_per_epoch: int, images=(), train_config=None, device="cpu"
             ) -> "BNL1Hook":
        layers = sparsity_layers(model, self.mode)
        if not layers:
            raise PruneError(f"--prune {self.mode}: this cfg has no BN conv in that prune set; try --prune 1")
        return BNL1Hook(self, layers, steps_per_epoch)

    def to_dict(self) -> dict:
        return {"s": self.s, "prune": self.mode, "s_schedule": self.schedule}

    def __post_init__(self) -> None:
        if self.s < 0 or not math.isfinite(self.s):
            raise PruneError(f"--s {self.s} must be >= 0 (reference default 0.001)")
        if self.mode not in (0, 1, 2):
            raise PruneError(f"--prune {self.mode} must be 0 (normal/regular), 1 (shortcut/slim) or 2 (layer)")
        if self.schedule not in SCHEDULES:
            raise PruneError(f"--s-schedule {self.schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
        if self.update not in ("auto", *UPDATES):
            raise PruneError(f"--l1-update {self.update!r} is unknown; use auto, {', '.join(UPDATES)}")
        if not 0 <= self.decay_at <= 1 or not 0 < self.keep_top < 1 or not 0 <= self.relief <= 1:
            raise PruneError("decay_at/relief must be in [0, 1] and keep_top in (0, 1)")
        if self.target is not None and not 0 < self.target < 1:
            raise PruneError(f"--target-sparsity {self.target} must be a share in (0, 1), e.g. 0.5")
        if self.target is not None and self.s == 0:
            raise PruneError("--target-sparsity needs --s > 0 to start from (e.g. --s 0.001)")
        if not 1 < self.growth <= 100:
            raise PruneError(f"--s-growth {self.growth} must be in (1, 100] (factor on s per epoch)")


def _constant(g: torch.Tensor, flat: torch.Tensor, s: float, cfg: SparsityConfig, late: bool) -> torch.Tensor:
    return torch.full_like(g, s)


def _step(g: torch.Tensor, flat: torch.Tensor, s: float, cfg: SparsityConfig, late: bool) -> torch.Tensor:
    return torch.full_like(g, s * (0.01 if late else 1.0))


def _relax(g: torch.Tensor, flat: torch.Tensor, s: float, cfg: SparsityConfig, late: bool) -> torch.Tensor:
    out = torch.full_like(g, s)
    if late:
        thr = torch.quantile(flat, 1.0 - cfg.keep_top)
        out[g.abs() > thr] *= 1.0 - cfg.relief
    return out


# name -> per-channel strength(gamma, all |gammas| of the set, s now, config, past decay_at)
SCHEDULES: dict[str, Callable[[torch.Tensor, torch.Tensor, float, SparsityConfig, bool], torch.Tensor]] = {
    "constant": _constant, "step": _step, "relax": _relax}


def _subgradient(p: torch.nn.Parameter, strength: torch.Tensor, optimizer: torch.optim.Optimizer,
                 group: dict) -> None:
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    p.grad.add_(strength * torch.sign(p.detach()))


def _proximal(p: torch.nn.Parameter, strength: torch.Tensor, optimizer: torch.optim.Optimizer,
              group: dict) -> None:
    threshold = group["lr"] * strength
    state = optimizer.state.get(p, {})
    if "exp_avg_sq" in state:  # Adam/AdamW: the prox in the optimizer's diagonal metric
        step = float(state["step"])
        v_hat = state["exp_avg_sq"] / (1 - group["betas"][1] ** step)
        threshold = threshold / (v_hat.sqrt() + group["eps"])
    p.data.copy_(torch.sign(p.data) * (p.data.abs() - threshold).clamp_(min=0))


# name -> (apply(param, strength, optimizer, param group), hook point "after_backward" | "after_step")
UPDATES: dict[str, tuple[Callable, str]] = {"subgradient": (_subgradient, "after_backward"),
                                            "proximal": (_proximal, "after_step")}


def resolve_update(name: str, optimizer: torch.optim.Optimizer) -> str:
    """`auto`: proximal for adaptive optimizers (those with betas: Adam, AdamW), subgradient otherwise."""
    if name != "auto":
        return name
    return "proximal" if "betas" in optimizer.defaults else "subgradient"


def sparsity_layers(model: DarknetModel, mode: int) -> list[int]:
    """The BN convs penalised for `--prune mode` (the reference's prune set of that mode)."""
    return prunable_layers(build_coupling(model.graph), mode)


class BNL1Hook(Hook):
    """L1 pressure on the BN gammas of `layers`, once per optimizer step; per-epoch statistics (on the EMA copy
    when there is one), histograms, the target controller and its resumable state (OUT/sparsity_state.json)."""

    def __init__(self, config: SparsityConfig, layers: list[int], steps_per_epoch: int = 100) -> None:
        self.config, self.layers = config, list(layers)
        self.history: list[dict] = []
        self.scale = 1.0                       # the target controller's factor on s
        self.steps_per_epoch = max(1, steps_per_epoch)  # estimate until the first epoch has been counted
        self.reached: dict[str, int | None] = {"target": None, "near_zero_percent": None}
        self.update = "subgradient" if config.update == "auto" else config.update  # resolved at fit start
        self._groups: dict[int, dict] = {}
        self._epoch_steps = 0

    @property
    def s(self) -> float:
        return self.config.s * self.scale

    def _bns(self, model: torch.nn.Module) -> list[torch.nn.BatchNorm2d]:
        return [model.layers[i].bn for i in self.layers]

    def on_fit_start(self, state: TrainState) -> None:
        self.update = resolve_update(self.config.update, state.optimizer)
        self._groups = {id(p): g for g in state.optimizer.param_groups for p in g["params"]}
        config = getattr(state, "config", None)
        if getattr(config, "resume", False) and state.out_dir is not None:
            self._restore(Path(state.out_dir) / STATE_FILE, state.step)

    @torch.no_grad()
    def _apply(self, state: TrainState, point: str) -> None:
        fn, at = UPDATES[self.update]
        bns = self._bns(state.model)
        if at != point or not bns or self.s == 0:
            return
        late = state.epoch >= self.config.decay_at * state.epochs
        flat = torch.cat([bn.weight.detach().abs().flatten() for bn in bns])
        strength = SCHEDULES[self.config.schedule]
        for bn in bns:
            g = bn.weight.detach()
            group = self._groups.get(id(bn.weight), {"lr": 0.0})
            fn(bn.weight, strength(g, flat, self.s, self.config, late), state.optimizer, group)

    def after_backward(self, state: TrainState) -> None:
        self._apply(state, "after_backward")

    def after_step(self, state: TrainState) -> None:
        self._apply(state, "after_step")
        self._epoch_steps += 1
        if self.config.target is not None:
            self._control(state.model)

    @torch.no_grad()
    def _control(self, model: torch.nn.Module) -> None:
        """Multiplicative controller on s: grow while below the target share, shrink while well above."""
        flat = torch.cat([bn.weight.detach().abs().flatten() for bn in self._bns(model)])
        share, k = float((flat < ZERO).float().mean()), self.config.growth ** (1.0 / self.steps_per_epoch)
        if share < self.config.target:
            self.scale *= k
        elif share > self.config.target + _BAND:
            self.scale /= k
        self.scale = min(max(self.scale, _SCALE_RANGE[0]), _SCALE_RANGE[1])

    def on_epoch_end(self, state: TrainState, metrics: dict) -> None:
        saved = state.ema.module if getattr(state, "ema", None) is not None else state.model
        gammas = bn_gammas(saved, self.layers)
        row = {"epoch": state.epoch, "s": self.s, **self._figures(gammas)}
        self.history.append(row)
        if self._epoch_steps:
            self.steps_per_epoch, self._epoch_steps = self._epoch_steps, 0
        self._check_reached(state.epoch, row)
        metrics.update({"gamma_p50": row.get("p50"), "gamma_below_1e-2": row.get("share_below_1e-2"),
                        "safe_percent": row.get("safe_percent"), "near_zero_percent": row.get("near_zero_percent"),
                        "l1_s": self.s})
        log.info("epoch %d BN |gamma|: p5=%.4g p50=%.4g p95=%.4g, share < 1e-2 = %.3f, safe --percent %.4g "
                 "(near-zero only %.4g), s = %.4g", state.epoch, row.get("p5", 0), row.get("p50", 0),
                 row.get("p95", 0), row.get("share_below_1e-2", 0), row.get("safe_percent") or 0,
                 row.get("near_zero_percent") or 0, self.s)
        if state.out_dir is not None and state.rank == 0 and gammas:
            out = Path(state.out_dir)
            plot_gamma_histogram(gammas, out / f"gamma_epoch{state.epoch:03d}.png",
                                 f"BN |gamma| after epoch {state.epoch}")
            self._save_state(out / STATE_FILE, state.step)

    @staticmethod
    def _figures(gammas: dict[int, torch.Tensor]) -> dict:
        """gamma statistics; `safe_percent`: `prune.mask.safe_percent` over the --prune set, the one definition
        (what `prune` reports for the methods of that set: normal/regular for 0, slim for 1);
        `near_zero_percent`: the largest safe --percent that also cuts only |gamma| < 1e-2 (what a prune without
        fine-tuning can afford)."""
        out = gamma_stats(gammas)
        if gammas:
            out["safe_percent"], out["limiting_layer"] = safe_percent(gammas)
            near_zero = math.floor(out["share_below_1e-2"] * 1e4) / 1e4
            out["near_zero_percent"] = min(out["safe_percent"], near_zero)
        return out

    def _check_reached(self, epoch: int, row: dict) -> None:
        target = self.config.target
        if target is None:
            return
        for key, value in (("target", row.get("share_below_1e-2")),
                           ("near_zero_percent", row.get("near_zero_percent"))):
            if self.reached[key] is None and value is not None and value >= target:
                self.reached[key] = epoch
                what = "share of |gamma| < 1e-2" if key == "target" else \
                    "near-zero prune --percent (cuts only |gamma| < 1e-2, empties no layer)"
                log.info("epoch %d: %s %.4g reached --target-sparsity %.4g (s = %.4g)", epoch, what, value,
                         target, self.s)

    def _save_state(self, path: Path, step: int) -> None:
        entry = {"step": step, "scale": self.scale, "steps_per_epoch": self.steps_per_epoch,
                 "reached": self.reached, "history": self.history}
        write_text_atomic(path, json.dumps({"entries": self._entries(path)[-1:] + [entry]}, default=float) + "\n")

    @staticmethod
    def _entries(path: Path) -> list[dict]:
        try:
            return json.loads(path.read_text())["entries"]
        except (OSError, ValueError, KeyError, TypeError):
            return []

    def _restore(self, path: Path, step: int) -> None:
        """Continue the controller and the history from the entry saved with the checkpoint's step."""
        entries = [e for e in self._entries(path) if e.get("step", -1) <= step]
        if not entries:
            if step:
                log.warning("%s: no sparsity state at step %d; s restarts from --s %g", path, step, self.config.s)
            return
        entry = entries[-1]
        if entry["step"] != step:
            log.warning("%s: sparsity state is from step %d, the checkpoint from step %d", path, entry["step"], step)
        self.scale, self.steps_per_epoch = float(entry["scale"]), int(entry["steps_per_epoch"])
        reached = dict(entry["reached"])
        reached.setdefault("near_zero_percent", reached.pop("safe_percent", None))  # a state file of before #26
        self.reached, self.history = reached, list(entry["history"])

    def summary(self, model: DarknetModel, img_size: int | None = None) -> dict:
        """Final statistics of `model` (pass the saved model), the largest --percent that empties no layer
        (suggestion), the final s and when the target was reached (`img_size`: unused, FadeHook's signature)."""
        figures = self._figures(bn_gammas(model, self.layers))
        extra = ("safe_percent", "near_zero_percent", "limiting_layer")
        out = {"gamma": {k: v for k, v in figures.items() if k not in extra},
               "sparsity_layers": len(self.layers), "history": self.history, "l1_update": self.update,
               "s_final": self.s}
        if "safe_percent" in figures:
            out.update({k: figures[k] for k in extra})
        if self.config.target is not None:
            out.update({"target_sparsity": self.config.target, "target_reached_epoch": self.reached["target"],
                        "near_zero_percent_reached_epoch": self.reached["near_zero_percent"]})
        return out


def _steps_per_epoch(n_images: int, train_config, distributed=None) -> int:
    world = getattr(distributed, "world_size", 1) or 1
    batches = math.ceil(math.ceil(n_images / world) / max(1, train_config.batch_size // world))
    return max(1, math.ceil(batches / train_config.accumulate))


def sparse_train(model: DarknetModel, data_spec, config: SparsityConfig | FadeConfig, train_config, device="cpu",
                 out_dir: str | Path | None = None, distributed=None, hooks: Sequence[Hook] = ()
                 ) -> tuple[object, BNL1Hook | FadeHook]:
    """`fit()` plus the sparsity hook of `config` (L1 on BN gammas: `SparsityConfig`; fading a prune plan:
    `FadeConfig`) and `hooks` (e.g. a DistillHook from the original model). Returns (TrainResult, hook); call
    `hook.summary(saved_model, img_size)` for the figures of what was saved."""
    steps = _steps_per_epoch(len(data_spec.train), train_config, distributed)
    hook = config.hook(model, steps, data_spec.train, train_config, device)
    result = fit(model, data_spec, train_config, hooks=[hook, *hooks], device=device, out_dir=out_dir,
                 distributed=distributed)
    return result, hook


def run_sparse_train(cfg: str | os.PathLike, weights: str | os.PathLike | None, data_spec,
                     sparsity: SparsityConfig | FadeConfig, train_config, outputs: tuple[Path, Path],
                     out_dir: str | os.PathLike, device="cpu", distributed=None,
                     hooks: Sequence[Hook] = ()) -> dict:
    """Load cfg/weights, `sparse_train` in `out_dir` (with `train_config.resume`: continue its last.pt; `hooks`
    train along, e.g. a DistillHook from the original model), save the final (EMA) model as
    `outputs` (cfg, weights) and return the report figures ({} on torchrun ranks > 0: rank 0 writes).
    `compress.jobs.run_job(SparseTrainJob(...))` guards the outputs first and writes report.json."""
    seed_all(train_config.seed)  # without --weights: --seed's initialisation
    model = load(cfg, weights, device=device)
    result, hook = sparse_train(model, data_spec, sparsity, train_config, device, Path(out_dir), distributed, hooks)
    if distributed is not None and distributed.rank != 0:
        return {}  # rank 0 writes the pair and the report
    final = load(result.last_cfg, result.last_weights) if result.last_weights else model
    summary = hook.summary(final, train_config.img_size)
    save(final, *outputs)
    size = (train_config.img_size, train_config.img_size)
    return {**stage_figures(final, *outputs, result.metrics, size),
            **sparsity.to_dict(), **{k: v for k, v in summary.items() if k != "history"},
            "sparsity": type(sparsity).name, "epochs": train_config.epochs,
            "world_size": getattr(distributed, "world_size", 1) or 1,
            **result.health(),
            "gamma_history": hook.history}
