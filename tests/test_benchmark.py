"""`benchmark`: per-format rows with mAP from eval's code and latency from the one measurement (keys, table,
report); an exported model runs as itself; `base.latency.measure` pins threads and reports an ordered spread.
No timing assertions: speed goals are measured by benchmarks/ scripts."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from compress.base.errors import ExportError
from compress.base.latency import DEFAULT_THREADS, measure
from compress.cli import cli
from compress.darknet import summary
from compress.darknet.cfg import read_cfg
from compress.darknet.model import build_model
from compress.darknet.persist import load, save
from compress.data.synth import synthesize
from compress.deploy.export import ExportConfig, export
from compress.jobs import BenchmarkJob, EvalJob, run_job

from conftest import DEMO_CFG

ROW_KEYS = {"format", "size_mb", "map50", "map50_95", "latency_ms", "latency_iqr_ms", "latency_min_ms",
            "latency_max_ms", "error"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    save(build_model(read_cfg(DEMO_CFG)), root / "demo.cfg", root / "demo.weights")
    data = Path(synthesize(root / "s", n_train=4, n_valid=2, img_size=64, seed=0))
    return {"root": root, "cfg": root / "demo.cfg", "weights": root / "demo.weights", "data": data}


def test_measure_pins_threads_and_orders_the_spread():
    calls, seen = [], []
    before = torch.get_num_threads()
    lat = measure(lambda: (calls.append(1), seen.append(torch.get_num_threads())), runs=7, warmup=2, threads=1)
    assert len(calls) == 9 and set(seen) == {1} and torch.get_num_threads() == before
    assert lat.min_ms <= lat.p25_ms <= lat.median_ms <= lat.p75_ms <= lat.max_ms
    assert lat.runs == 7 and lat.warmup == 2 and lat.to_dict()["iqr_ms"] == round(lat.p75_ms - lat.p25_ms, 3)


def test_cli_table_and_report_per_format(setup, tmp_path):
    report = tmp_path / "bench.json"
    res = CliRunner().invoke(cli, ["benchmark", "--cfg", str(setup["cfg"]), "--weights", str(setup["weights"]),
                                   "--data", str(setup["data"]), "--formats", "pytorch,onnx,int8", "--img-size",
                                   "64", "--runs", "2", "--warmup", "1", "--report", str(report)])
    assert res.exit_code == 0, res.output
    r = json.loads(report.read_text())
    assert r["formats"] == ["pytorch", "onnx", "int8"] and r["img_size"] == 64 and r["threads"] == 1
    assert r["runs"] == 2 and r["warmup"] == 1 and r["batch"] == 1 and "avx2" in r["cpu"]
    for row in r["rows"]:
        assert set(row) == ROW_KEYS and row["error"] is None, row
        assert row["latency_min_ms"] <= row["latency_ms"] <= row["latency_max_ms"] and row["size_mb"] > 0
        assert 0 <= row["map50_95"] <= row["map50"] <= 1
    # the pytorch row's mAP is eval's on the same data and size
    ev = run_job(EvalJob(setup["cfg"], setup["weights"], setup["data"], img_size=64, workers=0, no_progress=True))
    assert r["rows"][0]["map50"] == round(ev["map50"], 5)
    header = next(line for line in res.output.splitlines() if line.startswith("| format"))
    assert "mAP@0.5" in header and "ms median" in header and "ms IQR" in header
    rows = [line for line in res.output.splitlines() if line.startswith(("| pytorch", "| onnx", "| int8"))]
    assert len(rows) == 3


def test_exported_model_runs_as_itself_and_a_failing_format_gets_its_row(setup, monkeypatch):
    onnx = export(load(setup["cfg"], setup["weights"]), setup["root"] / "m.onnx", ExportConfig(img_size=64)).path
    r = run_job(BenchmarkJob(None, onnx, runs=1, warmup=0))   # no --data: latency only, its fixed size
    assert r["formats"] == ["onnx"] and r["img_size"] == 64 and r["rows"][0]["map50"] is None
    with pytest.raises(ExportError, match="runs in its own format only"):
        BenchmarkJob(None, onnx, formats="pytorch")
    with pytest.raises(ExportError, match="needs --cfg"):
        BenchmarkJob(None, setup["weights"])   # a Darknet .weights without its cfg
    with pytest.raises(ExportError, match="unknown format"):
        BenchmarkJob(setup["cfg"], formats="pytorch,tflite")
    # a runtime that is missing fails its own row only
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` fails as when it is not installed
    r = run_job(BenchmarkJob(setup["cfg"], setup["weights"], formats="openvino,pytorch", img_size=64, runs=1,
                             warmup=0))
    bad, good = r["rows"]
    assert bad["error"] == "openvino is not installed; pip install openvino" and bad["latency_ms"] is None and good["error"] is None


def test_stage_figures_time_through_the_one_measurement(setup, monkeypatch):
    """Every model-producing command's latency_ms (so the recipe's stage table) is base.latency.measure's median,
    torch pinned to the benchmark's default thread count."""
    calls = []

    def spy(fn, runs, warmup, threads, sync=None):
        calls.append((runs, warmup, threads))
        return measure(fn, runs, warmup, threads, sync)
    monkeypatch.setattr(summary, "measure", spy)
    figures = summary.stage_figures(load(setup["cfg"], setup["weights"]), img_size=(64, 64), latency_runs=3)
    assert calls == [(3, 2, DEFAULT_THREADS)] and figures["latency_ms"] > 0
