"""`quantize --sync-bn`: the folded BN's batch moments over the global batch (2 gloo processes = 1 process with
the whole batch), gradients included, and the option reaches every folded conv."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from compress.quant.modules import batch_moments
from conftest import free_port


def _full_batch() -> torch.Tensor:
    return torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1


def _loss(mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return (mu * torch.tensor([1.0, -2.0, 0.5])).sum() + (var * torch.tensor([0.3, 1.0, -1.0])).sum()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        y = _full_batch()[2 * rank:2 * rank + 2].clone().requires_grad_(True)
        mu, var, n = batch_moments(y, sync=True)
        _loss(mu, var).backward()
        torch.save({"mu": mu.detach(), "var": var.detach(), "n": n, "grad": y.grad}, f"{out}/rank{rank}.pt")
        # both ranks' collectives (the backward's all_reduce too) are done before the group goes: destroying it
        # while gloo still runs one aborted a rank ("terminate called without an active exception") under load
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_synced_moments_equal_the_whole_batch_and_gradients_flow(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    y = _full_batch().requires_grad_(True)
    mu, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)  # textbook full-batch moments
    _loss(mu, var).backward()
    for rank in (0, 1):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["n"] == 100.0
        torch.testing.assert_close(r["mu"], mu.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["var"], var.detach(), rtol=1e-5, atol=1e-5)
        # every rank back-propagates the same loss, so its local gradient is world_size x the true one;
        # DDP's gradient averaging over ranks then gives exactly the one-process gradient
        torch.testing.assert_close(r["grad"], 2 * y.grad[2 * rank:2 * rank + 2], rtol=1e-4, atol=1e-5)


def test_without_a_process_group_the_moments_are_local():
    y = _full_batch()
    mu, var, n = batch_moments(y, sync=True)
    torch.testing.assert_close(mu, y.mean((0, 2, 3)))
    torch.testing.assert_close(var, y.var((0, 2, 3), unbiased=False))
    assert n == 100.0


def test_sync_bn_option_reaches_every_folded_conv(tmp_path):
    from compress import load
    from compress.quant import prepare_qat
    from compress.quant.config import make_config
    from compress.quant.modules import QConvBNAct
    from compress.quant.pipeline import _set_sync_bn
    from compress.train.config import DistConfig

    qmodel = prepare_qat(load("recipes/demo.cfg"), make_config("google", 4))
    _set_sync_bn(qmodel, True, DistConfig())
    convs = [m for m in qmodel.modules() if isinstance(m, QConvBNAct)]
    assert convs and all(m.sync_bn for m in convs)
    assert QConvBNAct.sync_bn is False  # the class default stays off for other models
