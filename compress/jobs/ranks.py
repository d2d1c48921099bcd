"""Which process of a torchrun job runs a job: `run_job(job, dist=...)` is the one place that decides.

The CLI reads torchrun's environment (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, in
`compress.cli.common.torchrun_config`) and passes the DistConfig down; a Python user under torchrun builds one
(`compress.train.DistConfig`). Nothing below the CLI reads the environment. Every rank runs the whole job (the
training is data-parallel); `run_job` lets rank 0 alone write report.json, and the libraries let it alone write
their files."""
from __future__ import annotations

from compress.base.device import resolve_device
from compress.train.config import DistConfig

__all__ = ["rank_of", "process_device"]


def rank_of(dist: DistConfig | None) -> int:
    """This process's rank (0 when not distributed)."""
    return dist.rank if dist is not None else 0


def process_device(device: str, dist: DistConfig | None) -> str:
    """The device this process runs on: `auto` resolved (a GPU if one is visible), a bare "cuda" becomes this
    process's GPU under torchrun (as the CLI's --device resolves it; a resolved device stays as it is)."""
    return str(resolve_device(device, local_rank=dist.local_rank if dist is not None else None))
