"""`yolo-compress distill` end to end on a few synthetic images (1 epoch): outputs, report keys, baseline."""
from __future__ import annotations

import hashlib
import json

import pytest
from click.testing import CliRunner

from compress.darknet.cfg import read_cfg, write_cfg
from compress.cli import cli
from compress.darknet.model import build_model
from compress.darknet.persist import load, save
from compress.data.synth import synthesize
from tests.conftest import DEMO_CFG
from tests.test_distill_hook import narrow_cfg


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kd")
    data = synthesize(tmp / "synth", n_train=8, n_valid=4, img_size=64, seed=0)
    save(build_model(read_cfg(DEMO_CFG)), tmp / "t.cfg", tmp / "t.weights")
    save(build_model(narrow_cfg()), tmp / "s.cfg", tmp / "s.weights")
    return tmp, data


def _run(tmp, data, out, *extra):
    args = ["distill", "--cfg", str(tmp / "s.cfg"), "--weights", str(tmp / "s.weights"), "--t_cfg", str(tmp / "t.cfg"),
            "--t_weights", str(tmp / "t.weights"), "--data", str(data), "--out", str(tmp / out),
            "--epochs", "1", "--img-size", "64", "--batch-size", "4", *extra]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads((tmp / out / "report.json").read_text())


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_distill_cli_writes_the_output_convention(setup):
    tmp, data = setup
    teacher_before = _digest(tmp / "t.weights")
    rep = _run(tmp, data, "kd5", "--KDstr", "5", "--baseline", "--report", str(tmp / "kd5.json"))
    assert json.loads((tmp / "kd5.json").read_text()) == rep
    assert rep["cfg"] == str(tmp / "kd5" / "distilled.cfg") and rep["weights"] == str(tmp / "kd5" / "distilled.weights")
    for key in ("map50_kd", "map50_baseline", "map50_95_kd", "map50_95_baseline", "map50", "map50_95"):
        assert 0.0 <= rep[key] <= 1.0, key
    assert rep["strategy"] == 5 and rep["map50"] == rep["map50_kd"]
    assert rep["pairs"] and all(len(p) == 2 for p in rep["pairs"])  # chosen by stride and recorded
    student = load(rep["cfg"], rep["weights"])
    assert [(b.type, b.options) for b in student.cfg.blocks] == [
        (b.type, b.options) for b in read_cfg(tmp / "s.cfg").blocks]
    assert _digest(tmp / "t.weights") == teacher_before


def test_zero_weight_kd_reproduces_the_baseline_exactly(setup):
    """Same seed, same epochs: with every KD weight 0 the distilled run IS the baseline, bit for bit."""
    tmp, data = setup
    rep = _run(tmp, data, "kd0", "--kd", "4", "--w-soft", "0", "--w-box", "0", "--w-feat", "0", "--baseline")
    assert rep["map50_kd"] == rep["map50_baseline"] and rep["map50_95_kd"] == rep["map50_95_baseline"]
    assert _digest(tmp / "kd0" / "kd" / "last.weights") == _digest(tmp / "kd0" / "baseline" / "last.weights")


def test_distill_cli_rejects_class_mismatch(setup, tmp_path):
    tmp, data = setup
    cfg = read_cfg(DEMO_CFG)
    blocks = [b.replace(classes=4) if b.type == "yolo" else b for b in cfg.blocks]
    blocks = [b.replace(filters=27) if i + 1 < len(blocks) and blocks[i + 1].type == "yolo" else b
              for i, b in enumerate(blocks)]
    write_cfg(cfg.with_blocks(blocks), tmp_path / "t4.cfg")
    res = CliRunner().invoke(cli, ["distill", "--cfg", str(tmp / "s.cfg"), "--t-cfg", str(tmp_path / "t4.cfg"),
                                   "--t-weights", str(tmp / "t.weights"), "--data", str(data),
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code != 0
    assert "t4.cfg" in str(res.exception) or "t4.cfg" in res.output
