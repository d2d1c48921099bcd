"""Multi-process data parallel training (DDP): process group, model wrapping, the epoch sampler.

The CLI builds a `DistConfig` from torchrun's environment; nothing here reads the environment.
"""
from __future__ import annotations

import itertools
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .config import DistConfig, TrainError

__all__ = ["setup", "wrap", "make_train_loader", "broadcast_buffers", "barrier", "all_mean"]

log = logging.getLogger(__name__)


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


def wrap(model: nn.Module, cfg: DistConfig, device: torch.device) -> nn.Module:
    if not cfg.enabled:
        return model
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
    from ..data import EpochSampler  # (epoch, index) items: persistent workers follow the epoch
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
