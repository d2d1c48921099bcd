"""Two CPU processes (gloo) train with DistributedDataParallel and end with identical weights."""
from __future__ import annotations


import torch
import torch.multiprocessing as mp

from compress import build_model, parse_cfg
from compress.data.dataset import load_data_spec
from compress.data.synth import synthesize
from compress.train import DistConfig, TrainConfig, fit
from conftest import TINY3_CFG_TEXT
from conftest import free_port

CFG_TEXT = TINY3_CFG_TEXT



def _worker(rank: int, world: int, port: int, data: str, tmp: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(100 + rank)  # different initial weights: DDP must broadcast rank 0's
    model = build_model(parse_cfg(CFG_TEXT, "tiny-3cls.cfg"))
    if rank == 0:
        torch.save(model.state_dict(), f"{tmp}/init.pt")
    config = TrainConfig(epochs=2, batch_size=8, img_size=64, workers=0, progress=False, warmup_epochs=0,
                         eval_every=100)
    dist = DistConfig(rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    result = fit(model, load_data_spec(data), config, device="cpu", out_dir=f"{tmp}/out", distributed=dist)
    torch.save({"state": model.state_dict(), "history": result.history}, f"{tmp}/rank{rank}.pt")


def test_two_process_gloo_training_keeps_ranks_identical(tmp_path):
    data = synthesize(tmp_path / "synth", n_train=16, n_valid=4, img_size=64, seed=2)
    mp.spawn(_worker, args=(2, free_port(), str(data), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    init = torch.load(tmp_path / "init.pt")
    changed = 0
    for key, v0 in r0["state"].items():
        assert torch.equal(v0, r1["state"][key]), key
        changed += v0.dtype.is_floating_point and not torch.allclose(v0, init[key])
    assert changed > 10  # training moved the weights
    assert (tmp_path / "out" / "last.pt").is_file() and (tmp_path / "out" / "best.weights").is_file()
    assert len((tmp_path / "out" / "results.csv").read_text().splitlines()) == 3  # rank 0 logged each epoch once
