"""`fit`: the training loop. Sparsity, distillation and QAT plug in through hooks; the loop has no
branches for them."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm import tqdm

from compress.base.errors import WeightsError
from compress.base.fileio import atomic_files
from compress.data.dataset import DataSpec, DetectionDataset, collate, to_input
from compress.detection.losses import build_loss
from compress.darknet.persist import pair_paths, save
from compress.train import distributed as D
from compress.train.bn_adapt import adapted_copy
from compress.train.checkpoint import restore_train_checkpoint, rng_state, save_train_checkpoint, seed_all, set_rng_state
from compress.train.config import DistConfig, TrainConfig, TrainError
from compress.train.ema import ModelEMA
from compress.train.hooks import Hook, HookList, TrainState
from compress.train.log import plot_results, write_results_csv
from compress.train.optim import build_optimizer, lr_factor, warmup_step
from compress.detection.evaluate import EvalConfig, evaluate, input_letterbox

__all__ = ["fit", "TrainResult", "TrainFiles", "NOMINAL_BATCH"]

log = logging.getLogger(__name__)
NOMINAL_BATCH = 64  # weight decay is scaled by batch_size * accumulate / NOMINAL_BATCH


@dataclass(frozen=True)
class TrainFiles:
    """The files `fit` writes into its out_dir: named here once, for the writer and for the output guard."""
    folder: Path

    @property
    def best(self) -> tuple[Path, Path]:
        return pair_paths(self.folder, "best")

    @property
    def last(self) -> tuple[Path, Path]:
        return pair_paths(self.folder, "last")

    @property
    def checkpoint(self) -> Path:
        return self.folder / "last.pt"

    @property
    def results(self) -> tuple[Path, Path]:
        return self.folder / "results.csv", self.folder / "results.png"

    @property
    def cache(self) -> Path:
        return self.folder / "cache"


@dataclass
class TrainResult:
    """Outcome of `fit`. Paths are None when `fit` ran without an out_dir."""
    epochs: int
    final_loss: float | None
    history: list[dict]
    best_map50: float | None = None
    metrics: dict = field(default_factory=dict)
    best_cfg: Path | None = None
    best_weights: Path | None = None
    last_cfg: Path | None = None
    last_weights: Path | None = None
    checkpoint: Path | None = None
    map50_start: float | None = None   # the starting model's (when `collapse_ratio` is set)
    collapsed: bool = False

    def health(self) -> dict:
        """The report keys saying whether the run kept its starting model (see `collapse_ratio`)."""
        evaluated = [r for r in self.history if r.get("map50") is not None]
        adapted = evaluated[-1].get("bn_adapted") if evaluated else None
        return {"map50_start": self.map50_start, "collapsed": self.collapsed,
                "bn_adapted": None if adapted is None else bool(adapted)}

    def to_dict(self) -> dict:
        return {"epochs": self.epochs, "final_loss": self.final_loss, "best_map50": self.best_map50,
                "history": self.history, "best_cfg": _s(self.best_cfg), "best_weights": _s(self.best_weights),
                "last_cfg": _s(self.last_cfg), "last_weights": _s(self.last_weights),
                "checkpoint": _s(self.checkpoint), **self.health()}


def _s(p: Path | None) -> str | None:
    return str(p) if p else None


def fit(model: nn.Module, data_spec: DataSpec, config: TrainConfig, hooks: Sequence[Hook] = (),
        device: str | torch.device = "cpu", out_dir: str | Path | None = None,
        distributed: DistConfig | None = None) -> TrainResult:
    """Train `model` in place on `data_spec.train`; evaluate on `data_spec.valid` every `eval_every` epochs.

    With `out_dir`: `last.pt` (resumable, every epoch and on Ctrl-C), `last.cfg/.weights`,
    `best.cfg/.weights` (best mAP@0.5, else the last model), `results.csv`, `results.png`.
    The saved/evaluated model is the EMA model when `config.ema`, with its BN statistics re-estimated on
    `config.bn_adapt` training batches (`train.bn_adapt`; the training model keeps its own) unless, at an
    evaluation, its own statistics score better on the validation split (row key `bn_adapted`). With
    `config.collapse_ratio` the starting model is evaluated first, and a final mAP@.5 below that share of it is
    a collapse: a warning and `TrainResult.collapsed`. `distributed` (from torchrun) turns on
    DistributedDataParallel; only rank 0 evaluates, logs and writes files.
    """
    device = torch.device(device)
    dist_cfg = distributed or DistConfig()
    D.check_sync_bn(config.sync_bn, dist_cfg, device)
    created = D.setup(dist_cfg, device)
    try:
        return _Trainer(model, data_spec, config, hooks, device, out_dir, dist_cfg).run()
    finally:
        D.to_plain_bn(model)  # --sync-bn: the caller gets (and saves) plain BatchNorm
        D.teardown(created)


def _timed(batches: Iterator, waited: list[float]) -> Iterator:
    """Yield from `batches`, adding the seconds spent blocked on each `next` to waited[0]: the loop's wait for
    data (the `data_wait` share of each epoch; on a GPU, the loss's .item() each step syncs, so the time is
    starvation, not queued kernels)."""
    while True:
        t = time.perf_counter()
        try:
            item = next(batches)
        except StopIteration:
            return
        waited[0] += time.perf_counter() - t
        yield item


def set_bn_momentum(model: nn.Module, momentum: float | None) -> None:
    """Darknet's own running averages use 0.01; the model's default is `layers.BN_MOMENTUM`."""
    if momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = momentum


def set_train_mode(model: nn.Module, freeze_bn_stats: bool) -> None:
    """Train mode; with `freeze_bn_stats` the BN layers stay in eval mode (running statistics, not updated),
    which keeps pretrained statistics intact when small batches would give noisy ones."""
    model.train()
    if freeze_bn_stats:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


class _Trainer:
    def __init__(self, model: nn.Module, spec: DataSpec, config: TrainConfig, hooks: Sequence[Hook],
                 device: torch.device, out_dir: str | Path | None, dist_cfg: DistConfig) -> None:
        seed_all(config.seed)
        self.cfg, self.spec, self.dist, self.main = config, spec, dist_cfg, dist_cfg.is_main
        self.out = Path(out_dir) if out_dir is not None else None
        self.files = TrainFiles(self.out) if self.out is not None else None
        model.to(device)
        set_bn_momentum(model, config.bn_momentum)
        set_train_mode(model, config.freeze_bn_stats)
        self.loss_fn = build_loss(config.loss, model, config)
        wd = config.weight_decay * config.batch_size * config.accumulate / NOMINAL_BATCH
        optimizer = build_optimizer(model, config.optimizer, config.lr0, config.momentum, wd)
        scaler = torch.amp.GradScaler(device.type, enabled=config.amp and device.type == "cuda")
        ema = ModelEMA(model) if config.ema else None
        self.state = TrainState(model, optimizer, config.epochs, device, self.out, rank=dist_cfg.rank,
                                world_size=dist_cfg.world_size, config=config, ema=ema, scaler=scaler)
        self.hooks = HookList(hooks)
        self._data_wait_s = 0.0  # seconds the last epoch's loop waited for batches
        self.letterbox = input_letterbox(model, config.letterbox)
        self.dataset = DetectionDataset(spec.train, config.img_size, config.augment, spec.nc,
                                        aug=config.augment_config() if config.augment else None, seed=config.seed,
                                        source=f"{spec.source or 'data'} [train]",
                                        letterbox=self.letterbox, cache=config.cache,
                                        cache_dir=config.cache_dir or (self.files.cache if self.files else None))
        self.loader, self.sampler = D.make_train_loader(self.dataset, config.batch_size, config.workers,
                                                        config.seed, dist_cfg, collate)
        self.net = D.wrap(model, dist_cfg, device, config.sync_bn)
        self.start_epoch, self.history, self.best = 0, [], None
        self.completed = 0
        # the last optimizer-step boundary of the running epoch: what a Ctrl-C checkpoint resumes from
        self._mark: dict = {}
        self._partial: dict = {}
        self._valid: DetectionDataset | None = None
        self._snapshot_model: nn.Module | None = None  # the last saved model (BN-adapted)
        self.map50_start: float | None = None
        if config.resume:
            self._resume()

    def _resume(self) -> None:
        if self.out is None:
            raise TrainError("train option resume needs an out_dir holding last.pt")
        done, progress = restore_train_checkpoint(self.files.checkpoint, self.state)
        self.start_epoch, self.history, self.best = done, progress.get("history", []), progress.get("best")
        self.map50_start = progress.get("map50_start")
        self.completed = done
        self._partial = progress.get("partial") or {}
        if self._partial:
            self._partial["rng"] = rng_state()  # the checkpoint's, restored above
        if done >= self.cfg.epochs:
            log.warning("%s: already trained %d of %d epochs; nothing to do", self.out, done, self.cfg.epochs)

    def run(self) -> TrainResult:
        if self.cfg.collapse_ratio is not None and self.main and self.spec.valid and self.map50_start is None:
            self.map50_start = self._evaluate(self.eval_model)["map50"]  # the model as given
        self.state.epoch = self.start_epoch  # hooks see the first epoch left to train (not 0 on resume)
        self.hooks.on_fit_start(self.state)
        try:
            for epoch in range(self.start_epoch, self.cfg.epochs):
                self.state.epoch = epoch
                t0 = time.perf_counter()
                losses = self._train_epoch(epoch)
                self._end_epoch(epoch, losses, time.perf_counter() - t0)
        except KeyboardInterrupt:
            if self.main and self.out is not None:
                self._save_interrupted()
                log.warning("interrupted: checkpoint saved to %s; continue with resume", self.files.checkpoint)
            raise
        self._finish()
        self.hooks.on_fit_end(self.state)
        return self._result()

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, state = self.cfg, self.state
        partial, self._partial = self._partial, {}
        start, sums = partial.get("batch", 0), dict(partial.get("sums", {}))
        seed_all(cfg.seed + epoch)
        set_train_mode(state.model, cfg.freeze_bn_stats)
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        self.sampler.skip = 0
        nb = len(self.loader)
        self.sampler.skip = start * self.loader.batch_size
        n_warmup = round(cfg.warmup_epochs * nb)
        target_lr = cfg.lr0 * lr_factor(cfg.scheduler, epoch, cfg.epochs, cfg.lrf)
        show = cfg.progress and self.main
        waited = [0.0]
        batches = _timed(iter(self.loader), waited)  # iter() draws the loader's base seed from the global RNG
        if partial:  # resuming mid-epoch: continue with the RNG states of the interrupted run at that step
            set_rng_state(partial["rng"])
        self._set_mark(epoch, start, sums)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=None if show else True,  # None: TTY only
                   leave=False, initial=start, total=nb)
        for i, (imgs, targets, _, _) in enumerate(bar, start):
            it = epoch * nb + i
            warmup_step(state.optimizer, min(it, n_warmup), n_warmup, target_lr, cfg.momentum,
                        cfg.warmup_momentum)
            parts = self._micro_step(to_input(imgs, state.device), targets.to(state.device))
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            if (i + 1) % cfg.accumulate == 0 or i == nb - 1:
                self._optimizer_step()
                self._set_mark(epoch, i + 1, sums)
            bar.set_postfix({k: f"{v / (i + 1):.4f}" for k, v in sums.items()})
        self.sampler.skip = 0
        means = {k: v / max(nb, 1) for k, v in sums.items()}
        if self.dist.enabled:  # every process's per-image means, averaged: the whole batch's, as one process logs
            means = {k: float(D.all_mean(torch.tensor(v, dtype=torch.float64, device=self.state.device), self.dist))
                     for k, v in means.items()}
        means["lr"] = target_lr
        self._data_wait_s = waited[0]
        return means

    def _micro_step(self, imgs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Forward + backward of one batch; returns the detached loss parts (per-image means)."""
        state = self.state
        with torch.autocast(state.device.type, enabled=state.scaler.is_enabled()):
            heads = self.net(imgs)
            loss, parts = self.loss_fn(heads, targets, (imgs.shape[-2], imgs.shape[-1]))
            state.extra["det_loss"] = loss.detach() / imgs.shape[0]  # per image; KD calibrates against it
            extra = self.hooks.extra_loss(state, imgs, targets, heads)
            if extra:
                loss = loss + sum(extra.values()) * imgs.shape[0]
        if not torch.isfinite(loss):
            raise TrainError(f"loss became {loss.item()} at epoch {state.epoch + 1}; lower --lr0 or use --amp "
                             "off / a smaller --accumulate")
        state.scaler.scale(loss * self.dist.world_size).backward()
        parts = {**parts, **{k: v.detach() for k, v in extra.items()}}
        out = {k: float(v) for k, v in parts.items()}
        out["total"] = sum(out.values())
        return out

    def _optimizer_step(self) -> None:
        state = self.state
        state.scaler.unscale_(state.optimizer)
        if self.cfg.clip_grad:
            nn.utils.clip_grad_norm_(state.model.parameters(), self.cfg.clip_grad)
        self.hooks.after_backward(state)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        self.hooks.after_step(state)
        state.optimizer.zero_grad(set_to_none=True)
        if state.ema is not None:
            state.ema.update(state.model)
        state.step += 1

    @property
    def eval_model(self) -> nn.Module:
        return self.state.ema.module if self.state.ema is not None else self.state.model

    def _end_epoch(self, epoch: int, losses: dict[str, float], seconds: float) -> None:
        D.broadcast_buffers(self.state.model, self.dist)
        row: dict = {"epoch": epoch + 1, **losses, "map50": None, "map50_95": None}
        last = epoch + 1 == self.cfg.epochs
        evaluate_now = self.main and self.spec.valid and ((epoch + 1) % self.cfg.eval_every == 0 or last)
        if evaluate_now:
            metrics, self._snapshot_model = self._evaluate_choice()
            row.update(metrics)
        elif self.main and self.out is not None:
            self._snapshot_model = self._snapshot()
        self.hooks.on_epoch_end(self.state, row)
        row["data_wait"] = round(self._data_wait_s / seconds, 4) if seconds > 0 else None
        row["time_s"] = round(seconds, 2)
        self.history.append(row)
        self.completed = epoch + 1
        log.info("epoch %d/%d: %s", epoch + 1, self.cfg.epochs,
                 ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
        if self.main and self.out is not None:
            self._save_epoch(epoch + 1, row)
        D.barrier(self.dist)

    def _snapshot(self) -> nn.Module:
        """The model to evaluate and save: the EMA (or trained) model, its BN statistics re-estimated on
        training images when `bn_adapt` (a copy: training goes on with its own statistics)."""
        if not self.cfg.bn_adapt:
            return self.eval_model
        copy = adapted_copy(self.eval_model, self.spec.train, self.cfg.img_size, self.cfg.batch_size,
                            self.cfg.bn_adapt, self.letterbox, self.state.device)
        return D.to_plain_bn(copy)  # --sync-bn: rank 0 alone runs it

    def _evaluate_choice(self) -> tuple[dict, nn.Module]:
        """Evaluate the model to save; with `bn_adapt`, both the adapted copy and the trained statistics, and
        keep the better on the validation split (as `best` is chosen). Measured: re-estimating yolov4-tiny's
        COCO statistics on COCO128's 96 training images, no training, cost 4.2 points mAP@.5 on the 32 held-out
        ones (0.624 -> 0.582), while on the collapsed models of issue 23 it was the whole fix (0.000 -> 0.336)."""
        plain = self.eval_model
        if not self.cfg.bn_adapt:
            return self._evaluate(plain), plain
        adapted = self._snapshot()
        theirs = self._evaluate(plain)
        try:
            mine = self._evaluate(adapted)
        except WeightsError as e:  # statistics re-estimated on a few images can make the net overflow: not kept
            log.warning("BN adaptation made the model's output non-finite (%s); keeping the trained statistics", e)
            mine = {"map50": -1.0}
        keep = mine["map50"] > theirs["map50"]  # a tie keeps the trained statistics (re-estimates on a few
        # images can blow up an untrained net: yolov3 from scratch, 2 images at 64 px, exported inf boxes)
        chosen = mine if keep else theirs
        return {**chosen, "bn_adapted": int(keep), "map50_unadapted": theirs["map50"]}, adapted if keep else plain

    def _evaluate(self, model: nn.Module) -> dict:
        if self._valid is None:
            self._valid = DetectionDataset(self.spec.valid, self.cfg.img_size, num_classes=self.spec.nc,
                                           source=f"{self.spec.source or 'data'} [valid]")
        config = EvalConfig(img_size=self.cfg.img_size, workers=self.cfg.workers, progress=False,
                            letterbox=self.cfg.letterbox)
        result = evaluate(model, self._valid, config, self.state.device)
        return {"map50": float(result.map50), "map50_95": float(result.map50_95)}

    def _save_epoch(self, done: int, row: dict) -> None:
        """The epoch's files as one set (a full disk leaves the previous epoch's set, never last.cfg without
        last.pt); the training checkpoint is renamed last, so last.pt always has its pairs beside it."""
        files = self.files
        improved = row.get("map50") is not None and (self.best is None or row["map50"] > self.best)
        best = row["map50"] if improved else self.best
        pairs = [*files.last, *(files.best if improved else ())]
        with atomic_files(*pairs, files.checkpoint) as temps:
            save(self._snapshot_model, *temps[:2])   # BN-adapted when that scored better
            if improved:
                save(self._snapshot_model, *temps[2:4])
            save_train_checkpoint(temps[-1], self.state, done, {**self._progress(), "best": best})
        self.best = best
        write_results_csv(files.results[0], self.history)
        plot_results(files.results[1], self.history)

    def _set_mark(self, epoch: int, batch: int, sums: dict[str, float]) -> None:
        """Remember the state after an optimizer step; BN buffers too (a forward pass after the step, cut
        short by Ctrl-C, moves the running statistics)."""
        buffers = {k: v.detach().clone() for k, v in self.state.model.named_buffers()}
        self._mark = {"epoch": epoch, "batch": batch, "sums": dict(sums), "rng": rng_state(), "buffers": buffers}

    def _save_interrupted(self) -> None:
        """Ctrl-C: save the state at the last optimizer step, with the batches of the running epoch trained
        so far, so that resume continues with the next batch (the same steps as an uninterrupted run)."""
        mark = self._mark
        if not mark or mark["epoch"] < self.completed:  # stopped outside an epoch's batches
            self._save_checkpoint(self.completed)
            return
        partial = {"epoch": mark["epoch"], "batch": mark["batch"], "sums": mark["sums"]}
        with torch.no_grad():
            for name, buf in self.state.model.named_buffers():
                buf.copy_(mark["buffers"][name])
        save_train_checkpoint(self.files.checkpoint, self.state, self.completed,
                              {**self._progress(), "partial": partial}, rng=mark["rng"])

    def _save_checkpoint(self, done: int) -> None:
        save_train_checkpoint(self.files.checkpoint, self.state, done, self._progress())

    def _progress(self) -> dict:
        return {"history": self.history, "best": self.best, "map50_start": self.map50_start}

    def _finish(self) -> None:
        """Without any evaluation, best = last."""
        if self.main and self.out is not None and self.best is None:
            save(self._snapshot_model or self._snapshot(), *self.files.best)

    def _result(self) -> TrainResult:
        last = self.history[-1] if self.history else {}
        evaluated = [r for r in self.history if r.get("map50") is not None]
        metrics = {k: evaluated[-1][k] for k in ("map50", "map50_95")} if evaluated else {}
        files = self.files
        paths = {} if files is None or not self.main else {
            "best_cfg": files.best[0], "best_weights": files.best[1], "last_cfg": files.last[0],
            "last_weights": files.last[1], "checkpoint": files.checkpoint}
        final = last.get("total")
        return TrainResult(len(self.history), None if final is None or math.isnan(final) else final,
                           self.history, self.best, metrics, **paths, map50_start=self.map50_start,
                           collapsed=self._collapsed(metrics.get("map50")))

    def _collapsed(self, final: float | None) -> bool:
        """Issue 23: a pretrained model saved at mAP 0.000 while its loss fell, and nothing said so. The final
        (saved) model's mAP@.5 below `collapse_ratio` of the starting model's is reported, never passed over."""
        start, ratio = self.map50_start, self.cfg.collapse_ratio
        if ratio is None or start is None or final is None or start < 0.01 or final >= ratio * start:
            return False
        losses = [r.get("total") for r in self.history if r.get("total") is not None]
        if len(losses) < 2:
            why = "after one epoch (no loss trend yet)"
        elif losses[-1] < losses[0]:
            why = (f"while the training loss fell ({losses[0]:.4g} -> {losses[-1]:.4g}): the loss or the BN "
                   "statistics do not fit this model (fine-tune with --loss darknet, keep --bn-adapt on, lower "
                   "--lr0)")
        else:
            why = "and the training loss did not fall: training diverged (lower --lr0)"
        log.warning("COLLAPSED: mAP@0.5 %.4f is below %.0f%% of the starting model's %.4f %s; the model is saved "
                    "for inspection but is no improvement", final, 100 * ratio, start, why)
        return True
