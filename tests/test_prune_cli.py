"""`yolo-compress prune` / `sparse-train` end to end (thin CLI over run_prune / run_sparse_train)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import compress
from compress.cli import cli

from conftest import DATA, DEMO_CFG

TINY = str(DATA / "tiny-shortcut.cfg")


def _run(args: list[str]):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_prune_writes_pair_and_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = _run(["prune", "--cfg", TINY, "--out", str(out), "--method", "slim", "--global_percent", "0.5",
                "--img-size", "64", "--report", str(tmp_path / "copy.json")])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report == json.loads((tmp_path / "copy.json").read_text())
    assert report["cfg"] == str(out / "tiny-shortcut-slim.cfg") and report["weights"].endswith("-slim.weights")
    assert report["params_after"] < report["params_before"] and report["gflops_after"] < report["gflops_before"]
    assert report["params"] == report["params_after"]
    model = compress.load(report["cfg"], report["weights"])
    assert [c["after"] for c in report["channels"]] == [model.graph.channels[c["layer"]] for c in report["channels"]]
    assert "params" in res.output and "GFLOPs" in res.output


def test_prune_dry_run_writes_nothing(tmp_path: Path) -> None:
    res = _run(["prune", "--cfg", TINY, "--out", str(tmp_path / "o"), "--method", "layer", "--shortcuts", "1",
                "--img-size", "64", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "o").exists()


def test_prune_percent_too_high_is_one_line_error(tmp_path: Path, capsys) -> None:
    from compress.cli import main
    from compress.cfg import read_cfg
    from compress.model import build_model
    from conftest import randomize_bn
    weights = tmp_path / "in.weights"
    compress.save(randomize_bn(build_model(read_cfg(TINY))), tmp_path / "in.cfg", weights)
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--cfg", TINY, "--weights", str(weights), "--out", str(tmp_path / "o"), "--method", "normal",
              "--percent", "0.99"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: --percent 0.99 would remove every channel of layer") and "\n" not in err
    assert "largest safe --percent is" in err and not (tmp_path / "o").exists()


def test_sparse_train_end_to_end(tmp_path: Path) -> None:
    from compress.synth import synthesize
    data = synthesize(tmp_path / "data", n_train=4, n_valid=2, img_size=64)
    out = tmp_path / "sparse"
    res = _run(["sparse-train", "-sr", "--cfg", str(DEMO_CFG), "--data", str(data), "--out", str(out),
                "--sr", "0.01", "--prune", "1", "--epochs", "1", "--batch-size", "4", "--img-size", "64"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["s"] == 0.01 and report["prune"] == 1 and 0 < report["suggested_max_percent"] < 1
    assert (out / "gamma_epoch000.png").is_file() and Path(report["weights"]).is_file()
    compress.load(report["cfg"], report["weights"])
