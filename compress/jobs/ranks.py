"""The one reader of torchrun's environment: which process this is, and its DistConfig.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Every rank runs the whole job (the
training is data-parallel); `run_job` lets rank 0 alone write report.json, and the libraries let it alone
write their files."""
from __future__ import annotations

import os

from compress.train.config import DistConfig

__all__ = ["process_rank", "torchrun"]


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_rank() -> int:
    """This process's rank under torchrun (0 when not under torchrun)."""
    return int(os.environ.get("RANK", "0")) if _world() > 1 else 0


def torchrun(device: str) -> tuple[DistConfig | None, str]:
    """(DistConfig of this process, its device) under torchrun; (None, device) otherwise. A bare "cuda" becomes
    this process's GPU."""
    world = _world()
    if world <= 1:
        return None, device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    init = f"tcp://{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ.get('MASTER_PORT', '29500')}"
    dist = DistConfig(rank=int(os.environ["RANK"]), world_size=world, local_rank=local, init_method=init)
    return dist, (f"cuda:{local}" if device == "cuda" else device)
