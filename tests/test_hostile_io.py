"""Hostile files and folders (issue #27, groups 1, 2, 4, 5, 6, 7, 8 (file kinds), 12): special files, dataset
files as outputs, shared output paths, a full disk, two processes on one folder, folders of an earlier run,
recipes reusing what changed.

One table per command: rows of (argv, exit code, a substring of the one `Error:` line). `argv` names paths
through `{placeholders}` filled from the `world` fixture; every row also checks that no input changed (the
dataset, the model pair). The next round adds rows here, not files."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from compress.base.errors import GuardError, WriteError
from compress.base.fileio import atomic_files
from compress.base.guard import JobPaths, Output, check_job_paths
from compress.base.lock import LOCK_NAME
from compress.cli import main
from compress.darknet.cfg import read_cfg
from compress.darknet.model import build_model
from compress.darknet.persist import load, save
from compress.data.synth import synthesize
from compress.jobs import JOBS, Job, Report
from compress.jobs.base import PathLike
from compress.jobs.training import dataset_files
from compress.recipe import run_recipe

from conftest import DEMO_CFG, ROOT, randomize_bn

ALARM_S = 60  # a FIFO read would block forever: a row that hangs fails instead


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A demo pair (3 classes), a synthetic dataset, special files and a 2-class .data on the same images."""
    root = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    save(randomize_bn(build_model(read_cfg(DEMO_CFG))), root / "demo.cfg", root / "demo.weights")
    data = Path(synthesize(root / "ds", n_train=4, n_valid=2, img_size=64, seed=0))
    fifo = root / "fifo"
    os.mkfifo(fifo)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock"))  # stays bound for the module (the file is what matters)
    (root / "two.names").write_text("a\nb\n")
    two = root / "two.data"
    two.write_text(f"classes = 2\ntrain = {data.parent / 'train.txt'}\nvalid = {data.parent / 'valid.txt'}\n"
                   f"names = {root / 'two.names'}\n")
    (root / "fifo-valid.txt").write_text(f"{fifo}\n")
    piped = root / "piped.data"
    piped.write_text(f"classes = 3\ntrain = {root / 'fifo-valid.txt'}\nvalid = {root / 'fifo-valid.txt'}\n"
                     f"names = {data.parent / 'synth.names'}\n")
    busy = root / "busy"
    (busy / "x").mkdir(parents=True)
    (busy / "x" / "model.xml").write_text("<earlier/>")
    paths = {"cfg": root / "demo.cfg", "weights": root / "demo.weights", "data": data, "ds": data.parent,
             "fifo": fifo, "sock": root / "sock", "two": two, "piped": piped, "busy": busy,
             "label": sorted((data.parent / "labels" / "valid").glob("*.txt"))[0],
             "image": sorted((data.parent / "images" / "train").glob("*.png"))[0],
             "train_images": data.parent / "images" / "train"}
    yield paths
    sock.close()


def digests(world: dict[str, Path]) -> dict[str, str]:
    files = [world["cfg"], world["weights"], *sorted(p for p in world["ds"].rglob("*") if p.is_file())]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _alarm(signum, frame):
    raise TimeoutError(f"the command blocked for {ALARM_S} s (a FIFO read?)")


def cli(capsys, args: list[str]) -> tuple[int, str]:
    """The real entry point, bounded in time; (exit code, stderr)."""
    capsys.readouterr()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(ALARM_S)
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, capsys.readouterr().err


def fill(argv: str, world: dict[str, Path], out: Path) -> list[str]:
    return [part.format(**{k: str(v) for k, v in world.items()}, out=out) for part in argv.split()]


def check_row(capsys, world, tmp_path, argv: str, code: int, says: str) -> None:
    before = digests(world)
    got, err = cli(capsys, fill(argv, world, tmp_path / "o"))
    lines = [line for line in err.splitlines() if line.strip()]
    assert got == code, err
    if code:
        assert len(lines) == 1 and lines[0].startswith("Error: ") and says in lines[0], err
    assert digests(world) == before  # no input changed
    assert not world["fifo"].is_file() and world["fifo"].exists()  # the FIFO is still a FIFO


MODEL = "--cfg {cfg} --weights {weights}"

# --- info ------------------------------------------------------------------------------------------------------
INFO = [
    (f"info {MODEL} --report {{fifo}}", 1, "is a FIFO"),                 # group 1: never replace a special file
    (f"info {MODEL} --report {{sock}}", 1, "is a socket"),
    (f"info {MODEL} --gamma-plot {{fifo}}", 1, "outputs are regular files or new paths"),
    ("info --cfg {fifo}", 1, "FIFO"),                                     # group 8: a FIFO input is no hang
    ("info --cfg /dev/zero", 1, "character device"),                      # ... nor /dev/zero a memory eater
    (f"info {MODEL} --report {{out}}.json --gamma-plot {{out}}.json", 1, "is also"),  # group 2: one path each
]

# --- eval ------------------------------------------------------------------------------------------------------
EVAL = [
    (f"eval {MODEL} --data {{data}} --report {{label}}", 1, "is an input"),   # group 2: a label file
    (f"eval {MODEL} --data {{data}} --json {{image}}", 1, "is an input"),      # an image
    (f"eval {MODEL} --data {{data}} --json {{out}}.json --report {{out}}.json", 1, "is also --json"),
    (f"eval {MODEL} --data {{piped}}", 1, "FIFO"),                            # group 8: a FIFO in valid.txt
]

# --- train -----------------------------------------------------------------------------------------------------
TRAIN = [
    (f"train {MODEL} --data {{data}} --out {{out}} --report {{label}}", 1, "is an input"),
    (f"train {MODEL} --data {{data}} --out {{out}} --report {{image}}", 1, "is an input"),
    (f"train {MODEL} --data {{data}} --out {{out}} --cache disk --cache-dir {{train_images}} --exist-ok", 1,
     "holds the input"),                                                   # group 2: --cache-dir = image folder
    (f"train {MODEL} --data {{data}} --out {{out}} --cache disk --cache-dir {{train_images}}/c", 1,
     "lies in the image folder"),                                          # ... or inside it
    (f"train {MODEL} --data {{data}} --out {{train_images}}/run", 1, "lies in the image folder"),
    (f"train {MODEL} --data {{data}} --out {{out}} --report {{out}}/last.pt", 1, "is also --out"),
    (f"train {MODEL} --data {{data}} --out {{out}} --hyp {{fifo}}", 1, "FIFO"),   # read while the job is built
    (f"train --cfg {{fifo}} --data {{data}} --out {{out}}", 1, "FIFO"),
]

# --- quantize / prune ------------------------------------------------------------------------------------------
QUANTIZE = [
    (f"quantize {MODEL} --data {{data}} --out {{out}} --report {{label}}", 1, "is an input"),
    (f"quantize {MODEL} --data {{data}} --out {{out}} --report {{image}}", 1, "is an input"),
    (f"quantize {MODEL} --data {{two}} --out {{out}} --img-size 64", 1, "model predicts 3 classes but the data"),
]
PRUNE = [
    (f"prune {MODEL} --out {{out}} --data {{data}} --report {{label}}", 1, "is an input"),
    (f"prune {MODEL} --out {{out}} --data {{two}} --img-size 64", 1, "model predicts 3 classes but the data"),
    (f"prune {MODEL} --out {{out}} --report {{fifo}}", 1, "is a FIFO"),
]

# --- export: group 7 -------------------------------------------------------------------------------------------
EXPORT = [
    (f"export {MODEL} --format openvino --out {{busy}}", 1, "already holds an earlier run"),
    (f"export {MODEL} --format ncnn --out {{busy}}", 1, "already holds an earlier run"),
    (f"export {MODEL} --out {{fifo}}", 1, "is a FIFO"),
]

# --- detect ----------------------------------------------------------------------------------------------------
DETECT = [
    (f"detect {MODEL} --source {{train_images}} --out {{train_images}}/o", 1, "lies in the image folder"),
    (f"detect {MODEL} --source {{train_images}} --out {{out}} --names {{fifo}}", 1, "FIFO"),
]

TABLE = [pytest.param(*row, id=f"{name}-{i}") for name, rows in
         (("info", INFO), ("eval", EVAL), ("train", TRAIN), ("quantize", QUANTIZE), ("prune", PRUNE),
          ("export", EXPORT), ("detect", DETECT)) for i, row in enumerate(rows)]


@pytest.mark.parametrize("argv, code, says", TABLE)
def test_hostile_row(capsys, world, tmp_path, argv, code, says):
    check_row(capsys, world, tmp_path, argv, code, says)


def test_class_mismatch_writes_nothing(capsys, world, tmp_path):
    """Group 12: the mismatch is found before prune/quantize write, so the folder does not block a retry."""
    for command in ("prune", "quantize"):
        out = tmp_path / command
        code, err = cli(capsys, [command, "--cfg", str(world["cfg"]), "--weights", str(world["weights"]), "--out",
                                 str(out), "--data", str(world["two"]), "--img-size", "64"])
        assert code == 1 and "classes" in err
        assert not out.exists() or [p.name for p in out.iterdir()] == [], list(out.iterdir())


# --- library-level rows (no process may touch these paths even if the guard broke) -----------------------------

@pytest.mark.parametrize("path", ["/dev/null", "/dev/full"])
def test_device_nodes_are_never_outputs(path):
    with pytest.raises(GuardError, match="character device"):
        check_job_paths(JobPaths(outputs=(Output(Path(path), "file", "--report"),)))


def test_dataset_files_are_every_image_label_list_and_names(world):
    files = {p.name for p in dataset_files(world["data"])}
    assert {"train.txt", "valid.txt", "synth.names"} <= files
    assert world["label"].name in files and world["image"].name in files
    assert len([f for f in files if f.endswith(".png")]) == 6


# --- group 12: retry after a failure ---------------------------------------------------------------------------

def test_a_cache_only_folder_is_no_earlier_run(capsys, world, tmp_path):
    out = tmp_path / "o"
    (out / "cache").mkdir(parents=True)  # what a run that failed in its first epoch leaves
    (out / "cache" / "x.npy").write_bytes(b"\x93NUMPY")
    code, err = cli(capsys, ["train", "--cfg", str(world["cfg"]), "--data", str(world["data"]), "--out", str(out),
                             "--resume", "--epochs", "1", "--img-size", "64"])
    assert code == 1 and "nothing to resume" in err and "without --resume" in err
    code, err = cli(capsys, ["train", "--cfg", str(world["cfg"]), "--data", str(world["data"]), "--out", str(out),
                             "--epochs", "1", "--img-size", "64", "--batch-size", "2", "--workers", "0",
                             "--no-augment"])
    assert code == 0, err
    assert (out / "last.pt").is_file() and (out / "last.cfg").is_file() and not (out / LOCK_NAME).exists()


# --- group 4: a full disk --------------------------------------------------------------------------------------

def test_ulimit_f_ends_in_one_line_and_no_partial_pair(world, tmp_path):
    out = tmp_path / "o"
    command = (f"ulimit -f 200; exec {sys.executable} -m compress prune --cfg {world['cfg']} --weights "
               f"{world['weights']} --out {out} --percent 0.1")  # the cfg fits in 200 KiB, the weights do not
    res = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    lines = [line for line in res.stderr.splitlines() if line.startswith(("Error", "Traceback"))]
    assert res.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: cannot write"), res.stderr
    assert f"{out / 'demo-slim.weights'}: File too large" in lines[0] and "ulimit -f" in lines[0], lines[0]
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert not [n for n in left if n.endswith((".cfg", ".weights", ".tmp", ".part"))], left


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["weights", "checkpoint"])
def test_full_disk_in_training_leaves_no_last_cfg_without_last_pt(capsys, world, tmp_path, monkeypatch, where):
    if where == "weights":
        monkeypatch.setattr("compress.darknet.persist.write_weights", _enospc)
    else:
        monkeypatch.setattr("compress.train.checkpoint.save_checkpoint", _enospc)
    out = tmp_path / "o"
    code, err = cli(capsys, ["train", "--cfg", str(world["cfg"]), "--data", str(world["data"]), "--out", str(out),
                             "--epochs", "1", "--img-size", "64", "--batch-size", "2", "--workers", "0",
                             "--no-augment"])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "No space left on device" in lines[0], err
    left = sorted(p.name for p in out.iterdir())
    assert not {"last.cfg", "last.weights", "last.pt", "best.cfg", "best.weights"} & set(left), left
    assert not [n for n in left if n.endswith((".tmp", ".part"))], left


def test_full_disk_in_quantize_leaves_none_of_its_artifacts(capsys, world, tmp_path, monkeypatch):
    monkeypatch.setattr("compress.quant.pipeline.export_qdq_onnx", _enospc)  # after the pair and quant.json
    out = tmp_path / "o"
    code, err = cli(capsys, ["quantize", "--cfg", str(world["cfg"]), "--weights", str(world["weights"]), "--data",
                             str(world["data"]), "--out", str(out), "--img-size", "64", "--calib-batches", "1",
                             "--batch-size", "2", "--no-eval"])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "No space left on device" in lines[0], err
    assert "model-int8.onnx" in lines[0]  # the output's name, not its temp file's
    left = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    assert left == [], left


def test_atomic_files_all_or_nothing(tmp_path):
    (tmp_path / "a.cfg").write_text("old")
    with pytest.raises(WriteError, match=r"cannot write .*b\.weights: No space left"):
        with atomic_files(tmp_path / "b.weights", tmp_path / "a.cfg") as (w, c):
            c.write_text("new")
            raise OSError(errno.ENOSPC, "No space left on device", str(w))
    assert [p.name for p in tmp_path.iterdir()] == ["a.cfg"] and (tmp_path / "a.cfg").read_text() == "old"
    with atomic_files(tmp_path / "b.weights", tmp_path / "a.cfg") as (w, c):
        w.write_text("w"), c.write_text("c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.cfg", "b.weights"]


# --- group 6: two processes on one --out -----------------------------------------------------------------------

HOLD = """
import sys, time
from compress.base.lock import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_second_process_on_one_out_is_refused_and_a_dead_holder_is_stale(capsys, world, tmp_path):
    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        args = ["prune", "--cfg", str(world["cfg"]), "--weights", str(world["weights"]), "--out", str(out)]
        for extra in ([], ["--exist-ok"]):
            code, err = cli(capsys, args + extra)
            assert code == 1 and f"(pid {holder.pid}" in err and "is writing into this folder" in err, err
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, stale
        holder.wait()
    assert (out / LOCK_NAME).exists()
    code, err = cli(capsys, args)
    assert code == 0, err
    assert not (out / LOCK_NAME).exists() and (out / "report.json").is_file()


# --- group 5: recipes verify everything they reuse -------------------------------------------------------------

@dataclass(frozen=True)
class FakeQuantize(Job):
    """Writes a pair plus the side files quantize writes (quant.json, an int8 ONNX), reading a dataset."""

    command: ClassVar[str] = "quantize"
    produces_model: ClassVar[bool] = True
    cfg: PathLike
    data: PathLike
    out: PathLike
    weights: PathLike | None = None
    runs: ClassVar[list[int]] = []

    def inputs(self) -> tuple[Path, ...]:
        return tuple(Path(p) for p in (self.cfg, self.weights, self.data) if p)

    def data_files(self) -> tuple[Path, ...]:
        return dataset_files(self.data)

    def outputs(self) -> tuple[Output, ...]:
        return (Output(Path(self.out), "dir", "--out"),)

    def out_dir(self) -> Path:
        return Path(self.out)

    def run(self, dist=None) -> Report:
        FakeQuantize.runs.append(1)
        out = Path(self.out)
        save(load(self.cfg, self.weights), out / "q.cfg", out / "q.weights")
        (out / "quant.json").write_text('{"layers": [1, 2, 3]}\n')
        (out / "model-int8.onnx").write_bytes(b"onnx" * 100)
        return self.report({"cfg": str(out / "q.cfg"), "weights": str(out / "q.weights")})


@pytest.mark.parametrize("damage", ["empty quant.json", "0-byte int8 onnx", "deleted training image",
                                    "edited label"])
def test_recipe_reruns_a_step_whose_side_output_or_data_changed(world, tmp_path, damage):
    ds = tmp_path / "ds"
    shutil.copytree(world["ds"], ds)
    shutil.copy(world["cfg"], tmp_path / "net.cfg")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{cfg: net.cfg}}\ndata: {ds / 'synth.data'}\nsteps:\n  - quantize: {{}}\n")
    jobs = {**JOBS, "quantize": FakeQuantize}
    out = tmp_path / "out"
    FakeQuantize.runs.clear()
    run_recipe(recipe, out=out, jobs=jobs)
    run_recipe(recipe, out=out, jobs=jobs)
    assert len(FakeQuantize.runs) == 1  # unchanged: reused
    step = next(p for p in out.iterdir() if p.is_dir())
    if damage == "empty quant.json":
        (step / "quant.json").write_text("")
    elif damage == "0-byte int8 onnx":
        (step / "model-int8.onnx").write_bytes(b"")
    elif damage == "deleted training image":
        sorted((ds / "images" / "train").glob("*.png"))[0].unlink()
    else:
        label = sorted((ds / "labels" / "train").glob("*.txt"))[0]
        label.write_text(label.read_text() + "0 0.5 0.5 0.1 0.1\n")
    run_recipe(recipe, out=out, jobs=jobs)
    assert len(FakeQuantize.runs) == 2, damage
    steps = json.loads((out / "manifest.json").read_text())["steps"]
    assert steps[-1]["status"] == "done" and str((step / "quant.json").resolve()) in steps[-1]["output_sha256"]
