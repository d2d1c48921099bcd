"""--sync-bn: BatchNorm <-> SyncBatchNorm round trip (exact), option plumbing to TrainConfig, and the refusal on
CPU/gloo processes (SyncBatchNorm runs on CUDA only; the conversion itself is checked here on CPU)."""
from __future__ import annotations

import logging

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from compress.darknet.cfg import read_cfg
from compress.cli import cli, main
from compress.darknet.model import build_model
from compress.darknet.persist import save
from compress.data.synth import synthesize
from compress.train import DistConfig, TrainConfig, TrainError, fit
from compress.train import distributed as D
from compress.data.dataset import load_data_spec

from conftest import DATA, DEMO_CFG, randomize_bn


def _bn_model() -> nn.Module:
    model = randomize_bn(build_model(read_cfg(DATA / "tiny-shortcut.cfg")), 3)
    with torch.no_grad():  # non-default running statistics, so a lost buffer would show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(7)
    return model


def test_round_trip_keeps_every_tensor(tmp_path) -> None:
    model = _bn_model().eval()
    x = torch.rand(1, 3, 64, 64)
    ref_out = model(x)
    ref_state = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    save(model, tmp_path / "a.cfg", tmp_path / "a.weights")
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())

    D.to_sync_bn(model)
    assert n_bn > 0 and sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == n_bn
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert all(a is b for a, b in zip(model.parameters(), params))  # the optimizer's tensors stay valid
    save(model, tmp_path / "b.cfg", tmp_path / "b.weights")  # writable while converted

    D.to_plain_bn(model)
    assert sum(type(m) is nn.BatchNorm2d for m in model.modules()) == n_bn
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert all(a is b for a, b in zip(model.parameters(), params))
    state = model.state_dict()
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], v) for k, v in ref_state.items())
    assert torch.equal(model(x), ref_out)
    save(model, tmp_path / "c.cfg", tmp_path / "c.weights")
    for name in ("b", "c"):
        assert (tmp_path / f"{name}.weights").read_bytes() == (tmp_path / "a.weights").read_bytes()
        assert (tmp_path / f"{name}.cfg").read_text() == (tmp_path / "a.cfg").read_text()


def test_shared_bn_stays_shared() -> None:
    model = _bn_model()
    layers = [m for m in model.layers if getattr(m, "bn", None) is not None]
    layers[1].bn = layers[0].bn
    D.to_sync_bn(model)
    assert layers[1].bn is layers[0].bn and isinstance(layers[0].bn, nn.SyncBatchNorm)
    D.to_plain_bn(model)
    assert layers[1].bn is layers[0].bn and type(layers[0].bn) is nn.BatchNorm2d


def _no_setup(*args, **kwargs):
    raise AssertionError("the process group was set up before --sync-bn was checked")


def test_refused_for_cpu_processes_before_any_work(monkeypatch) -> None:
    monkeypatch.setattr(D, "setup", _no_setup)
    with pytest.raises(TrainError, match=r"sync_bn \(--sync-bn\) needs CUDA devices.*drop --sync-bn"):
        fit(_bn_model(), None, TrainConfig(sync_bn=True), device="cpu", distributed=DistConfig(rank=0, world_size=2))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("syncbn")
    return synthesize(tmp / "synth", n_train=4, n_valid=2, img_size=64, seed=0)


def test_single_process_warns_and_trains_plain(synth, caplog) -> None:
    model = build_model(read_cfg(DEMO_CFG))
    config = TrainConfig(epochs=1, batch_size=2, img_size=64, workers=0, progress=False, warmup_epochs=0,
                         eval_every=100, sync_bn=True)
    with caplog.at_level(logging.WARNING):
        fit(model, load_data_spec(synth), config)
    assert "--sync-bn: a single process has no statistics to synchronise" in caplog.text
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


def _commands(tmp, synth) -> dict[str, list[str]]:
    save(build_model(read_cfg(DEMO_CFG)), tmp / "m.cfg", tmp / "m.weights")
    model = ["--cfg", str(tmp / "m.cfg"), "--weights", str(tmp / "m.weights"), "--data", str(synth)]
    return {"train": ["train", *model], "sparse-train": ["sparse-train", *model],
            "distill": ["distill", *model, "--t-cfg", str(tmp / "m.cfg"), "--t-weights", str(tmp / "m.weights")]}


@pytest.mark.parametrize("command", ["train", "sparse-train", "distill"])
def test_cli_option_reaches_fit(tmp_path, synth, monkeypatch, capsys, command) -> None:
    """Each training command has --sync-bn, documented, and it reaches TrainConfig: under 2 (simulated)
    torchrun processes on CPU the command ends with one `Error:` line before any process group or epoch."""
    argv = _commands(tmp_path, synth)[command]
    help_text = CliRunner().invoke(cli, [command, "--help"]).output
    assert "--sync-bn" in help_text and "refused for CPU" in " ".join(help_text.split())
    monkeypatch.setattr(D, "setup", _no_setup)
    for key, value in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--out", str(tmp_path / "out"), "--device", "cpu", "--epochs", "1", "--img-size", "64",
              "--workers", "0", "--sync-bn"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("Error: train option sync_bn (--sync-bn) needs CUDA devices")
    assert not (tmp_path / "out" / "last.pt").exists()
