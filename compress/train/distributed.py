"""Multi-process data parallel training (DDP): process group, model wrapping, the epoch sampler.

The CLI builds a `DistConfig` from torchrun's environment; nothing here reads the environment.
"""
from __future__ import annotations

import itertools
import logging
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from compress.data.dataset import EpochSampler
from compress.train.config import DistConfig, TrainError

__all__ = ["setup", "wrap", "make_train_loader", "broadcast_buffers", "barrier", "all_mean", "check_sync_bn",
           "to_sync_bn", "to_plain_bn", "SYNC_BN_HELP"]

SYNC_BN_HELP = ("Synchronise BatchNorm batch statistics across the torchrun processes (SyncBatchNorm; the saved "
                "model has plain BatchNorm). CUDA only: refused for CPU (gloo) processes; no effect in a single "
                "process (a warning).")

log = logging.getLogger(__name__)


def group_size() -> int:
    """Processes in the running process group (1 without one): code below the trainer that all-reduces
    statistics itself (QAT observers, folded BN moments) asks this, not the job's DistConfig."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def setup(cfg: DistConfig, device: torch.device) -> bool:
    """Join the process group (nccl on CUDA, gloo on CPU) if needed; returns True if this call created it."""
    if not cfg.enabled or dist.is_initialized():
        return False
    backend = cfg.backend or ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=cfg.init_method, rank=cfg.rank, world_size=cfg.world_size)
    log.info("DDP rank %d/%d on %s (%s)", cfg.rank, cfg.world_size, device, backend)
    return True


def check_sync_bn(sync_bn: bool, cfg: DistConfig, device: torch.device) -> None:
    """Refuse SyncBatchNorm where it cannot run (before any work): DDP processes on a non-CUDA device."""
    if sync_bn and cfg.enabled and device.type != "cuda":
        raise TrainError(f"train option sync_bn (--sync-bn) needs CUDA devices: SyncBatchNorm does not run on "
                         f"{device.type} ({cfg.world_size} gloo processes); drop --sync-bn (each process then "
                         "normalises with its own batch statistics) or train on GPUs")


def _swap_bn(model: nn.Module, make: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """Replace every child for which `make` returns a module; a module shared by several parents (Darknet
    share_index) stays one module."""
    done: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = done[id(child)] if id(child) in done else make(child)
            if new is not None:
                done[id(child)] = new
                parent._modules[name] = new
    return model


def to_sync_bn(model: nn.Module) -> nn.Module:
    """BatchNorm -> SyncBatchNorm in place (torch's converter; same Parameter and buffer tensors, so the
    optimizer, EMA and checkpoints are unaffected)."""
    return _swap_bn(model, lambda m: nn.SyncBatchNorm.convert_sync_batchnorm(m)
                    if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
                    else None)


def _plain(bn: nn.SyncBatchNorm) -> nn.BatchNorm2d:
    plain = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                           device="meta")
    for name, p in bn.named_parameters(recurse=False):
        setattr(plain, name, p)
    for name, b in bn.named_buffers(recurse=False):
        plain.register_buffer(name, b)
    return plain.train(bn.training)


def to_plain_bn(model: nn.Module) -> nn.Module:
    """SyncBatchNorm -> BatchNorm2d in place (the only BN type of Darknet models), sharing the tensors:
    what is saved, exported or pruned after training is a plain model."""
    return _swap_bn(model, lambda m: _plain(m) if isinstance(m, nn.SyncBatchNorm) else None)


def wrap(model: nn.Module, cfg: DistConfig, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """DDP around `model` (unchanged in a single process); `sync_bn` converts its BatchNorm layers first
    (undo with `to_plain_bn`)."""
    if sync_bn and not cfg.enabled:
        log.warning("--sync-bn: a single process has no statistics to synchronise; plain BatchNorm is used")
    if not cfg.enabled:
        return model
    if sync_bn:
        check_sync_bn(sync_bn, cfg, device)
        to_sync_bn(model)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)


class SkipSampler(DistributedSampler):
    """DistributedSampler that can leave out the first `skip` samples of the epoch's order (resuming an
    interrupted epoch without loading the batches already trained)."""
    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return max(0, super().__len__() - self.skip)


def make_train_loader(dataset: Dataset, batch_size: int, workers: int, seed: int, cfg: DistConfig,
                      collate_fn: Any) -> tuple[DataLoader, SkipSampler]:
    """Loader whose order depends only on (seed, epoch): call `sampler.set_epoch(e)` before each epoch.
    Each of the world_size processes gets batch_size // world_size images per batch."""
    if batch_size % cfg.world_size:
        raise TrainError(f"train option batch_size {batch_size} must be a multiple of the process count "
                         f"{cfg.world_size}")
    sampler = SkipSampler(dataset, num_replicas=cfg.world_size, rank=cfg.rank, shuffle=True, seed=seed)
    # EpochSampler yields (epoch, index) items, so persistent workers follow the epoch
    loader = DataLoader(dataset, batch_size=batch_size // cfg.world_size, sampler=EpochSampler(sampler),
                        num_workers=workers, collate_fn=collate_fn, pin_memory=False, drop_last=False,
                        persistent_workers=workers > 0)
    return loader, sampler


def broadcast_buffers(model: nn.Module, cfg: DistConfig) -> None:
    """Make BN running statistics identical on every rank (rank 0's), before evaluating or saving."""
    if cfg.enabled:
        for b in model.buffers():
            dist.broadcast(b, 0)


def barrier(cfg: DistConfig) -> None:
    if cfg.enabled:
        dist.barrier()


def all_mean(value: torch.Tensor, cfg: DistConfig) -> torch.Tensor:
    if cfg.enabled:
        value = value.clone()
        dist.all_reduce(value)
        value /= cfg.world_size
    return value


def teardown(created: bool) -> None:
    if created and dist.is_initialized():
        dist.destroy_process_group()
