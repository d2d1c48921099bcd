"""distill --resume continues exactly (calibrated weights included); distill under torchrun: one output."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner

from compress.darknet.cfg import read_cfg
from compress.cli import cli
from compress.data.dataset import load_data_spec
from compress.distill import DistillConfig, DistillHook, distill
from compress.darknet.model import build_model
from compress.darknet.persist import load, save
from compress.data.synth import synthesize
from compress.train import TrainConfig
from tests.conftest import DEMO_CFG, free_port
from tests.test_distill_hook import narrow_cfg


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kdr")
    data = synthesize(tmp / "synth", n_train=8, n_valid=4, img_size=64, seed=0)
    torch.manual_seed(0)
    save(build_model(read_cfg(DEMO_CFG)), tmp / "t.cfg", tmp / "t.weights")
    save(build_model(narrow_cfg()), tmp / "s.cfg", tmp / "s.weights")
    return tmp, data


def _quick(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(epochs=2, batch_size=4, img_size=64, workers=0, progress=False, warmup_epochs=0,
                                 eval_every=100), **kw})


def _distill(tmp, data, out, config, **kw):
    return distill(load(tmp / "s.cfg", tmp / "s.weights"), load(tmp / "t.cfg", tmp / "t.weights"),
                   load_data_spec(data), config, _quick(**kw), "cpu", tmp / out)


def test_resume_continues_exactly(setup, monkeypatch):
    tmp, data = setup
    config = DistillConfig(strategy=4, calib_batches=2)
    straight = _distill(tmp, data, "a", config)
    original = DistillHook.extra_loss

    def interrupt(self, state, *args):
        if state.epoch == 1:
            raise KeyboardInterrupt
        return original(self, state, *args)

    monkeypatch.setattr(DistillHook, "extra_loss", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _distill(tmp, data, "b", config)
    monkeypatch.undo()
    resumed = _distill(tmp, data, "b", config, resume=True)
    assert [r["epoch"] for r in resumed.kd.history] == [1, 2]
    assert resumed.weights_used == straight.weights_used  # calibrated once, restored from kd_state.json
    for key in ("total", "box", "obj", "cls", "kd_soft", "kd_box", "kd_feat"):
        assert resumed.kd.history[1][key] == pytest.approx(straight.kd.history[1][key], abs=1e-5), key
    assert [s["epoch"] for s in resumed.shares] == [1, 2]
    a, b = load(tmp / "a" / "distilled.cfg", tmp / "a" / "distilled.weights"), load(tmp / "b" / "distilled.cfg",
                                                                                   tmp / "b" / "distilled.weights")
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-5), name



def _worker(rank: int, world: int, port: int, tmp: str, data: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    res = CliRunner().invoke(cli, ["distill", "--cfg", f"{tmp}/s.cfg", "--weights", f"{tmp}/s.weights", "--t_cfg",
                                   f"{tmp}/t.cfg", "--t_weights", f"{tmp}/t.weights", "--data", data, "--out",
                                   f"{tmp}/ddp", "--epochs", "1", "--img-size", "64", "--batch-size", "4",
                                   "--workers", "0", "--kd", "3", "--baseline"], catch_exceptions=False)
    assert res.exit_code == 0, res.output


def test_distill_under_torchrun_writes_one_output(setup):
    tmp, data = setup
    mp.spawn(_worker, args=(2, free_port(), str(tmp), str(data)), nprocs=2, join=True)
    rep = json.loads((tmp / "ddp" / "report.json").read_text())
    assert rep["world_size"] == 2 and rep["cfg"] == str(tmp / "ddp" / "distilled.cfg")
    assert rep["kd_shares"]["first_epoch"]["epoch"] == 1 and 0 <= rep["map50_baseline"] <= 1
    assert len((tmp / "ddp" / "kd" / "results.csv").read_text().splitlines()) == 2  # rank 0 logged once
    assert sorted(p.name for p in (tmp / "ddp").iterdir()) == ["baseline", "distilled.cfg", "distilled.weights",
                                                               "kd", "report.json"]
