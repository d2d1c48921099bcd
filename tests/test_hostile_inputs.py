"""Hostile inputs (issue "Hardening"): each case ends in one `Error:` line and exit 1, before any work, with the
inputs untouched. Defect numbers refer to the issue's list."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from compress.cli import main
from compress.darknet.model import build_model
from compress.darknet.cfg import read_cfg
from compress.darknet.persist import save, save_checkpoint
from compress.data.synth import synthesize

from conftest import DEMO_CFG


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """t/: a demo cfg + weights pair (3 classes, like the synth data)."""
    t = tmp_path_factory.mktemp("t")
    torch.manual_seed(0)
    save(build_model(read_cfg(DEMO_CFG)), t / "demo.cfg", t / "demo.weights")
    return t / "demo.cfg", t / "demo.weights"


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return Path(synthesize(tmp_path_factory.mktemp("s"), n_train=4, n_valid=2, img_size=64, seed=0))


def cli(capsys, *args: object) -> tuple[int, str]:
    """Run the real entry point; returns (exit code, stderr)."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refused(capsys, *args: object, says: str, usage: bool = False) -> str:
    """One `Error:` line and exit 1 (a library error), or click's usage block and exit 2 (usage=True)."""
    code, err = cli(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    if usage:
        assert code == 2 and lines[0].startswith("Usage: ") and len(errors) == 1, err
    else:
        assert code == 1 and len(lines) == 1 and len(errors) == 1, err
    assert says in errors[0], errors[0]
    return errors[0]


# --- defect 1: outputs overwrite inputs ------------------------------------------------------------------------

@pytest.mark.parametrize("option", ["--report", "--gamma-plot"])
def test_info_output_onto_its_weights(capsys, pair, option):
    cfg, weights = pair
    before = digest(weights)
    refused(capsys, "info", "--cfg", cfg, "--weights", weights, option, weights, says="is an input")
    assert digest(weights) == before


def test_output_through_symlink_and_hard_link_is_an_input(capsys, pair, tmp_path):
    cfg, weights = pair
    (tmp_path / "soft.json").symlink_to(weights)
    os.link(cfg, tmp_path / "hard.json")
    for link in ("soft.json", "hard.json"):
        refused(capsys, "info", "--cfg", cfg, "--weights", weights, "--report", tmp_path / link, says="is an input")


def test_prune_and_train_report_onto_inputs(capsys, pair, synth, tmp_path):
    cfg, weights = pair
    refused(capsys, "prune", "--cfg", cfg, "--weights", weights, "--out", tmp_path / "p", "--report", weights,
            says="is an input")
    refused(capsys, "train", "--cfg", cfg, "--data", synth, "--out", tmp_path / "r", "--report", cfg,
            says="is an input")
    assert not (tmp_path / "r").exists()  # refused before the first epoch


def test_anchors_report_onto_data_file_and_its_lists(capsys, synth):
    refused(capsys, "anchors", "--data", synth, "--report", synth, says="is an input")
    train_list = next(p for p in synth.parent.glob("*.txt") if "train" in p.name)
    refused(capsys, "anchors", "--data", synth, "--report", train_list, says="is an input")


def test_detect_into_its_source_folder(capsys, pair, synth, tmp_path):
    cfg, weights = pair
    images = tmp_path / "img"
    shutil.copytree(synth.parent / "images" / "train", images)
    before = {p: digest(p) for p in images.rglob("*") if p.is_file()}
    source = images
    refused(capsys, "detect", "--cfg", cfg, "--weights", weights, "--source", source, "--out", source,
            says="input folder")
    assert {p: digest(p) for p in images.rglob("*") if p.is_file()} == before


def test_training_commands_into_the_folder_of_their_input(capsys, pair, synth, tmp_path):
    cfg, weights = pair
    run = tmp_path / "r"
    run.mkdir()
    save_checkpoint(build_model(read_cfg(cfg)), run / "last.pt")
    before = digest(run / "last.pt")
    refused(capsys, "train", "--cfg", cfg, "--weights", run / "last.pt", "--data", synth, "--out", run,
            says="holds the input")
    student = cfg.parent
    refused(capsys, "sparse-train", "--cfg", cfg, "--weights", weights, "--data", synth, "--out", student,
            says="holds the input")
    refused(capsys, "distill", "--cfg", cfg, "--weights", weights, "--t-cfg", cfg, "--t-weights", weights,
            "--data", synth, "--out", student, says="holds the input")
    assert digest(run / "last.pt") == before


# --- defect 2: unwritable, wrong-kind, too-long outputs --------------------------------------------------------

def test_unwritable_out_is_refused_before_training(capsys, pair, synth):
    cfg, _ = pair
    # /sys refuses new files even to root (permission bits alone would not stop root)
    refused(capsys, "train", "--cfg", cfg, "--data", synth, "--out", "/sys/yolo-compress-test", says="cannot write")


def test_output_kinds(capsys, pair, tmp_path):
    cfg, weights = pair
    refused(capsys, "info", "--cfg", cfg, "--report", tmp_path, says="is a directory", usage=True)  # click's check
    refused(capsys, "prune", "--cfg", cfg, "--out", tmp_path / "o", "--report", tmp_path / "o" / "", says="folder")
    (tmp_path / "afile").write_text("x")
    refused(capsys, "prune", "--cfg", cfg, "--out", tmp_path / "afile", says="is a file", usage=True)
    refused(capsys, "prune", "--cfg", cfg, "--out", tmp_path / "afile" / "sub", says="is a file")


def test_long_names(capsys, pair, tmp_path):
    cfg, _ = pair
    name = "r" * 245 + ".json"  # 250 characters: fits, and so must the temp file written beside it
    code, err = cli(capsys, "info", "--cfg", cfg, "--report", tmp_path / name)
    assert code == 0, err
    assert (tmp_path / name).is_file() and [p.name for p in tmp_path.iterdir()] == [name]
    refused(capsys, "info", "--cfg", cfg, "--report", tmp_path / ("r" * 300 + ".json"), says="allows 255")
    deep = tmp_path.joinpath(*["d" * 200] * 21, "report.json")  # over 4096 bytes
    refused(capsys, "info", "--cfg", cfg, "--report", deep, says="allows 4095")


# --- defects 3, 4: checkpoints ---------------------------------------------------------------------------------

class _Payload:
    """Unpickling this would create a folder: proof that code in the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def test_pickle_code_in_weights_is_never_run(capsys, pair, tmp_path):
    cfg, _ = pair
    marker = tmp_path / "pwned"
    torch.save({"model": _Payload(marker)}, tmp_path / "evil.pt")
    refused(capsys, "info", "--cfg", cfg, "--weights", tmp_path / "evil.pt", says="refused")
    assert not marker.exists()


def test_pt_holding_something_else(capsys, pair, tmp_path):
    cfg, _ = pair
    torch.save({"model": torch.zeros(3)}, tmp_path / "odd.pt")
    refused(capsys, "info", "--cfg", cfg, "--weights", tmp_path / "odd.pt", says="not a yolo-compress checkpoint")
    torch.save([1, 2], tmp_path / "list.pt")
    refused(capsys, "info", "--cfg", cfg, "--weights", tmp_path / "list.pt", says="a list")


# --- defect 5: devices -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["banana", f"cuda:{torch.cuda.device_count()}", "0,0", "-1"])
def test_missing_or_malformed_device(capsys, pair, synth, device):
    cfg, weights = pair
    refused(capsys, "eval", "--cfg", cfg, "--weights", weights, "--data", synth, "--device", device,
            says=f"--device {device}")


# --- defect 9: an earlier run is not replaced silently ---------------------------------------------------------

def test_train_into_an_earlier_run_needs_resume_or_exist_ok(capsys, pair, synth, tmp_path):
    cfg, weights = pair
    run = tmp_path / "r"
    run.mkdir()
    save_checkpoint(build_model(read_cfg(cfg)), run / "last.pt", epoch=3)
    before = digest(run / "last.pt")
    refused(capsys, "train", "--cfg", cfg, "--weights", weights, "--data", synth, "--out", run,
            says="already holds an earlier run (last.pt)")
    refused(capsys, "prune", "--cfg", cfg, "--out", run, says="--exist-ok")
    assert digest(run / "last.pt") == before


# --- defect 11 (third item): anchors without boxes -------------------------------------------------------------

def test_anchors_without_label_boxes_says_so(capsys, synth, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for png in sorted((synth.parent / "images" / "train").glob("*.png"))[:3]:
        shutil.copy(png, images)
    line = refused(capsys, "anchors", "--data", images, "--n", "2", says="no boxes to cluster")
    assert "label file" in line and "smaller --n" not in line


def test_training_checkpoint_state_loads_with_weights_only(tmp_path):
    """What train/checkpoint.py stores (RNG states with numpy arrays, numpy scalars) survives weights_only=True."""
    import random

    import numpy as np

    from compress.darknet.persist import read_checkpoint
    from compress.train.checkpoint import rng_state, set_rng_state

    np.random.seed(7)
    random.seed(7)
    save_checkpoint(build_model(read_cfg(DEMO_CFG)), tmp_path / "last.pt", rng=rng_state(),
                    progress={"best": np.float64(0.5), "history": [{"loss": np.float32(1.25)}]})
    expected = (np.random.rand(3), random.random())
    np.random.seed(0)
    random.seed(0)
    ckpt = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["progress"] == {"best": 0.5, "history": [{"loss": 1.25}]}
    set_rng_state(read_checkpoint(tmp_path / "last.pt")["rng"])
    assert np.array_equal(np.random.rand(3), expected[0]) and random.random() == expected[1]
