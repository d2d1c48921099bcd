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
    from compress.darknet.cfg import read_cfg
    from compress.darknet.model import build_model
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


def test_prune_latency_is_opt_in(tmp_path: Path) -> None:
    args = ["prune", "--cfg", TINY, "--method", "slim", "--percent", "0.3", "--img-size", "64"]
    plain = json.loads(_report_of(args + ["--out", str(tmp_path / "a")], tmp_path / "a"))
    timed = json.loads(_report_of(args + ["--out", str(tmp_path / "b"), "--latency"], tmp_path / "b"))
    assert plain["latency_ms_before"] is None and plain["latency_ms_after"] is None and plain["latency_ms"] is None
    assert timed["latency_ms_before"] > 0 and timed["latency_ms_after"] > 0


def _report_of(args: list[str], out: Path) -> str:
    res = _run(args)
    assert res.exit_code == 0, res.output
    return (out / "report.json").read_text()


_SPARSE = ["sparse-train", "--cfg", str(DEMO_CFG), "--prune", "1", "--batch-size", "4", "--img-size", "64",
           "--workers", "0", "--optimizer", "adam", "--lr0", "0.01", "--warmup-epochs", "0"]


def test_sparse_train_end_to_end(tmp_path: Path) -> None:
    from compress.data.synth import synthesize
    data = synthesize(tmp_path / "data", n_train=4, n_valid=2, img_size=64)
    out = tmp_path / "sparse"
    res = _run(["sparse-train", "-sr", "--cfg", str(DEMO_CFG), "--data", str(data), "--out", str(out),
                "--sr", "0.01", "--prune", "1", "--epochs", "1", "--batch-size", "4", "--img-size", "64"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["s"] == 0.01 and report["prune"] == 1 and 0 < report["safe_percent"] < 1
    assert report["l1_update"] == "subgradient"  # SGD, the default optimizer
    assert (out / "gamma_epoch000.png").is_file() and Path(report["weights"]).is_file()
    saved = compress.load(report["cfg"], report["weights"])
    from compress.darknet.summary import bn_gammas, gamma_stats
    from compress.prune.sparsity import sparsity_layers
    assert report["gamma"] == pytest.approx(gamma_stats(bn_gammas(saved, sparsity_layers(saved, 1))))


def test_sparse_train_target_sparsity_reaches_it_and_slim_keeps_the_model(tmp_path: Path) -> None:
    """Adam + proximal + target 0.5 on a tiny run: the share of |gamma| < 1e-2 of the SAVED model reaches it."""
    from compress.data.synth import synthesize
    data = synthesize(tmp_path / "data", n_train=8, n_valid=2, img_size=64)
    out = tmp_path / "sparse"
    res = _run(_SPARSE + ["--data", str(data), "--out", str(out), "--epochs", "6", "--s", "0.01",
                          "--target-sparsity", "0.5", "--s-growth", "10"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["l1_update"] == "proximal" and report["s_final"] != 0.01  # the controller acted
    assert report["gamma"]["share_below_1e-2"] >= 0.5 and report["target_reached_epoch"] is not None
    assert "target reached" in res.output


def test_sparse_train_resume_continues_exactly(tmp_path: Path, monkeypatch) -> None:
    """A run killed right after epoch 1's checkpoint, resumed with --resume, ends bit-identical to the
    uninterrupted run (weights, s, gamma history)."""
    import shutil
    from compress.data.synth import synthesize
    from compress.train import loop
    data = synthesize(tmp_path / "data", n_train=8, n_valid=2, img_size=64)
    full, killed = tmp_path / "full", tmp_path / "killed"
    save = loop._Trainer._save_epoch  # the epoch's pairs and last.pt, written as one set

    def save_and_snapshot(self, done: int, row: dict) -> None:
        save(self, done, row)
        if done == 1:  # what a SIGKILL during epoch 2 leaves behind
            shutil.copytree(self.out, killed)
    monkeypatch.setattr(loop._Trainer, "_save_epoch", save_and_snapshot)
    args = _SPARSE + ["--data", str(data), "--epochs", "3", "--s", "0.05", "--target-sparsity", "0.3"]
    assert _run(args + ["--out", str(full)]).exit_code == 0
    monkeypatch.setattr(loop._Trainer, "_save_epoch", save)
    res = _run(args + ["--out", str(killed), "--resume"])
    assert res.exit_code == 0, res.output
    a, b = (json.loads((d / "report.json").read_text()) for d in (full, killed))
    assert a["s_final"] == b["s_final"] and a["gamma_history"] == b["gamma_history"]
    wa = (full / "demo-sparse.weights").read_bytes()
    assert wa == (killed / "demo-sparse.weights").read_bytes()
