"""`quantize --epochs N --resume` continues an interrupted QAT run exactly; `quantize --epochs N` under torchrun
trains data-parallel with one output and observer ranges that agree with a single process on the whole batch."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner

from compress.darknet.cfg import read_cfg
from compress.cli import cli
from compress.base.errors import QuantError
from compress.darknet.model import build_model
from compress.darknet.persist import load, read_checkpoint, save
from compress.jobs import QuantizeJob
from compress.quant.qat import QATHook
from compress.data.synth import synthesize
from conftest import DEMO_CFG, free_port, randomize_bn


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qatr")
    data = synthesize(tmp / "synth", n_train=8, n_valid=4, img_size=64, seed=0)
    torch.manual_seed(0)
    save(randomize_bn(build_model(read_cfg(DEMO_CFG))), tmp / "m.cfg", tmp / "m.weights")
    return tmp, str(data)


def _job(tmp, data, out, **kw) -> QuantizeJob:
    base = dict(epochs=2, calib_batches=1, batch_size=4, img_size=64, lr0=1e-3, freeze_observers_after=1,
                freeze_bn_after=1, no_eval=True, bits=4)
    return QuantizeJob.from_dict({"cfg": str(tmp / "m.cfg"), "weights": str(tmp / "m.weights"), "data": data,
                                  "out": str(tmp / out), **base, **kw})


def quantize(job: QuantizeJob):
    return job.run()  # the library run, no report.json


def _history(out) -> list[list[str]]:
    rows = (out / "qat" / "results.csv").read_text().splitlines()
    keep = [i for i, k in enumerate(rows[0].split(",")) if k not in ("time_s", "data_wait")]  # timings
    return [[r.split(",")[i] for i in keep] for r in rows]


def test_interrupted_qat_resumes_to_the_same_steps_weights_and_ranges(setup, monkeypatch):
    """Interrupted in epoch 2, where QDrop (off in epoch 1: --act-drop-after 1) is on: the resumed run drops
    from the same epoch with the same random masks."""
    tmp, data = setup
    drop = {"act_drop": 0.5, "act_drop_after": 1}
    quantize(_job(tmp, data, "a", **drop))
    seen = []

    def interrupt(self, state, *args):  # mid-epoch 2 (2 batches per epoch), after the freeze points
        seen.append(state.step)
        if state.epoch == 1 and state.step == 3:
            raise KeyboardInterrupt
        return {}

    monkeypatch.setattr(QATHook, "extra_loss", interrupt, raising=False)
    with pytest.raises(KeyboardInterrupt):
        quantize(_job(tmp, data, "b", **drop))
    monkeypatch.undo()
    assert seen == [0, 1, 2, 3]
    assert read_checkpoint(tmp / "b" / "qat" / "last.pt")["step"] == 3
    report = quantize(_job(tmp, data, "b", resume=True, **drop))
    assert report["qat_resumed"] and report["calib_images"] == 0  # ranges came from the checkpoint
    rows = _history(tmp / "b")
    assert [r[rows[0].index("act_drop")] for r in rows[1:]] == ["0", "0.5"]  # the share each epoch trained with
    a, b = tmp / "a", tmp / "b"
    assert read_checkpoint(a / "qat" / "last.pt")["step"] == read_checkpoint(b / "qat" / "last.pt")["step"] == 4
    assert _history(a) == _history(b)  # same per-epoch losses (CSV text: equal to the printed digits)
    qa, qb = (json.loads((d / "quant.json").read_text()) for d in (a, b))
    assert qa == qb  # observer ranges, scales and zero points: frozen flags restored, nothing re-calibrated
    ma, mb = (load(d / "m-q4.cfg", d / "m-q4.weights") for d in (a, b))
    for (name, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=name)


def test_resume_needs_a_run_with_the_same_options(setup):
    tmp, data = setup
    with pytest.raises(QuantError, match="does not exist"):
        quantize(_job(tmp, data, "none", resume=True))
    quantize(_job(tmp, data, "c", epochs=1))
    job = _job(tmp, data, "c", epochs=1, resume=True)
    with pytest.raises(QuantError, match=r"bits: 4 -> 8"):
        quantize(dataclasses.replace(job, bits=8))
    with pytest.raises(QuantError, match="--epochs N"):
        _job(tmp, data, "c", epochs=0, resume=True)



def _cli_args(tmp: str, data: str, out: str) -> list[str]:
    return ["quantize", "--cfg", f"{tmp}/m.cfg", "--weights", f"{tmp}/m.weights", "--data", data, "--out",
            f"{tmp}/{out}", "--bits", "4", "--epochs", "1", "--img-size", "64", "--batch-size", "4",
            "--calib-batches", "1", "--lr0", "1e-9", "--freeze-bn-after", "0", "--freeze-observers-after", "1",
            "--no-eval"]


def _worker(rank: int, world: int, port: int, tmp: str, data: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    res = CliRunner().invoke(cli, _cli_args(tmp, data, "ddp"), catch_exceptions=False)
    assert res.exit_code == 0, res.output


def _ranges(out) -> dict[str, torch.Tensor]:
    state = read_checkpoint(out / "qat" / "last.pt")["model"]
    return {k: v for k, v in state.items() if k.endswith(("min_val", "max_val"))}


def test_qat_under_torchrun_writes_one_output_with_global_batch_ranges(setup):
    """Observers see each global batch's min/max (all-reduced), so their ranges after an epoch equal those
    of one process training on the whole batch. BN frozen and a negligible lr keep every image's activations
    independent of the split; without the all-reduce each process would track its own half batch."""
    tmp, data = setup
    mp.spawn(_worker, args=(2, free_port(), str(tmp), data), nprocs=2, join=True)
    res = CliRunner().invoke(cli, _cli_args(str(tmp), data, "one"), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    ddp, one = tmp / "ddp", tmp / "one"
    rep = json.loads((ddp / "report.json").read_text())
    assert rep["world_size"] == 2 and json.loads((one / "report.json").read_text())["world_size"] == 1
    assert rep["qat_epochs"] == 1
    assert len((ddp / "qat" / "results.csv").read_text().splitlines()) == 2  # rank 0 logged once
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in one.iterdir())
    rd, ro = _ranges(ddp), _ranges(one)
    assert rd.keys() == ro.keys() and len(rd) > 20
    calib = _calibrated(tmp, data)
    assert sum(not torch.allclose(ro[k], calib[k], atol=1e-4) for k in ro) > 10  # QAT batches moved them
    for name, v in ro.items():
        torch.testing.assert_close(rd[name], v, rtol=1e-5, atol=1e-6, msg=name)


def _calibrated(tmp, data) -> dict[str, torch.Tensor]:
    from compress.data.dataset import load_data_spec
    from compress.quant import calibrate, prepare_qat
    from compress.quant.pipeline import _calibration_batches
    job = _job(tmp, data, "unused")
    q = prepare_qat(load(tmp / "m.cfg", tmp / "m.weights"), job.quant_config())
    calibrate(q, _calibration_batches(load_data_spec(data), 64, job.settings()))
    return {k: v for k, v in q.state_dict().items() if k.endswith(("min_val", "max_val"))}
