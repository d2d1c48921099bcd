"""Scale past one machine: each trainer (train, sparse-train, distill, quantize's QAT) runs as a 2-node torchrun
job on localhost (`torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d`, launched twice, gloo, CPU) and
ends with the weights and logged losses of one process training on the whole batch; every report carries
`world_size`. BN statistics are frozen (fine-tuning's default; QAT folds them) and the loss is Darknet's (a sum
over images; fine-tuning's default): per-process BN batch statistics and v5's mean over each process's own
targets are what must differ between 2 half batches and the whole batch."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from compress.darknet.cfg import read_cfg
from compress.darknet.model import build_model
from compress.darknet.persist import load, save
from compress.data.synth import synthesize
from compress.jobs import JOBS, run_job

from conftest import DEMO_CFG, free_port, randomize_bn

ROOT = Path(__file__).resolve().parents[1]
# The job as `yolo-compress CMD ...` builds it (from_dict = the recipe/CLI option values), run under torchrun
# with the environment the CLI reads (torchrun_config); `train` overrides TrainConfig fields no option reaches.
LAUNCHED = textwrap.dedent('''
    import dataclasses, json, sys
    import torch
    from compress.cli.common import torchrun_config
    from compress.jobs import JOBS, run_job
    torch.set_num_threads(1)
    spec = json.loads(sys.argv[1])
    job = JOBS[spec["command"]].from_dict(spec["options"])
    if spec["train"]:
        job = dataclasses.replace(job, train=dataclasses.replace(job.train, **spec["train"]))
    run_job(job, dist=torchrun_config())
''')


FROZEN = {"freeze_bn_stats": True, "loss": "darknet"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mn")
    data = Path(synthesize(root / "s", n_train=8, n_valid=2, img_size=64, seed=0))
    torch.manual_seed(0)
    save(randomize_bn(build_model(read_cfg(DEMO_CFG))), root / "m.cfg", root / "m.weights")
    (root / "launched.py").write_text(LAUNCHED)
    return {"root": root, "data": data, "cfg": root / "m.cfg", "weights": root / "m.weights"}


def _two_nodes(setup: dict[str, Path], spec: dict) -> None:
    """Two torchrun agents (one per "node") meeting at one c10d rendezvous on localhost."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}", "--rdzv_id", f"yc{port}",
           str(setup["root"] / "launched.py"), json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, out in zip(nodes, outputs):
        assert node.returncode == 0, out[-4000:]


def _one_process(spec: dict) -> dict:
    job = JOBS[spec["command"]].from_dict(spec["options"])
    if spec["train"]:
        job = dataclasses.replace(job, train=dataclasses.replace(job.train, **spec["train"]))
    return run_job(job).to_dict()


def _same_result(ddp: dict, one: dict, loss_keys: tuple[str, ...]) -> None:
    assert ddp["world_size"] == 2 and one["world_size"] == 1
    a, b = load(ddp["cfg"], ddp["weights"]).state_dict(), load(one["cfg"], one["weights"]).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    for key in loss_keys:
        assert ddp[key] == pytest.approx(one[key], rel=1e-5), key


def _spec(setup: dict[str, Path], command: str, out: str, train: dict | None = None, **options) -> dict:
    base = {"cfg": str(setup["cfg"]), "weights": str(setup["weights"]), "data": str(setup["data"]),
            "out": str(setup["root"] / command / out), "epochs": 1, "batch_size": 4, "img_size": 64}
    if command != "quantize":
        base["workers"] = 0
    return {"command": command, "options": {**base, **options}, "train": train or {}}


def _run_both(setup: dict[str, Path], command: str, train: dict | None = None, **options) -> tuple[dict, dict]:
    _two_nodes(setup, _spec(setup, command, "ddp", train, **options))
    one = _one_process(_spec(setup, command, "one", train, **options))
    ddp = json.loads((setup["root"] / command / "ddp" / "report.json").read_text())
    return ddp, one


def _history_losses(report: dict) -> list[float]:
    return [row[k] for row in report["history"] for k in ("total", "box", "obj", "cls")]


def test_train_two_nodes_equal_one_process(setup):
    ddp, one = _run_both(setup, "train")   # --weights: fine-tuning defaults (BN statistics frozen)
    _same_result(ddp, one, ("final_loss",))
    assert _history_losses(ddp) == pytest.approx(_history_losses(one), rel=1e-5)


def test_sparse_train_two_nodes_equal_one_process(setup):
    ddp, one = _run_both(setup, "sparse-train", FROZEN, s=0.01)
    _same_result(ddp, one, ())
    assert ddp["gamma"] == pytest.approx(one["gamma"], rel=1e-4, abs=1e-7)


def test_distill_two_nodes_equal_one_process(setup):
    ddp, one = _run_both(setup, "distill", FROZEN, t_cfg=str(setup["cfg"]),
                         t_weights=str(setup["weights"]), kd=1)
    _same_result(ddp, one, ())


def test_quantize_qat_two_nodes_equal_one_process(setup):
    ddp, one = _run_both(setup, "quantize", {"loss": "darknet"}, calib_batches=1, freeze_bn_after=0, no_eval=True)
    _same_result(ddp, one, ())
