"""The job contract (compress/jobs): every command is a registered job; `run_job` guards before any work (for
Python callers too, not only the CLI), writes OUT/report.json and --report itself, and keeps torchrun rank 0
the only writer."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import click
import pytest
import torch

from compress.darknet.cfg import read_cfg
from compress.cli import cli
from compress.data.convert import ConvertConfig
from compress.distill import DistillConfig
from compress.base.errors import CompressError, GuardError
from compress.deploy.export import ExportConfig
from compress.jobs import (JOBS, AnchorsJob, DetectJob, DistillJob, EvalJob, ExportJob, InfoJob, JobKind, PruneJob,
                           QuantizeJob, RecipeJob, SparseTrainJob, SynthJob, TrainJob, job_paths, register_job,
                           run_job)
from compress.darknet.model import build_model
from compress.darknet.persist import load, save
from compress.prune import PruneConfig
from compress.quant.config import make_config
from compress.recipe import RunConfig
from compress.data.synth import synthesize
from compress.train import DistConfig, TrainConfig

from conftest import DEMO_CFG


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """m/: a demo cfg + weights pair (3 classes); s/: a tiny synthetic dataset; img/: a copy of its images."""
    root = tmp_path_factory.mktemp("jobs")
    (root / "m").mkdir()
    torch.manual_seed(0)
    save(build_model(read_cfg(DEMO_CFG)), root / "m" / "demo.cfg", root / "m" / "demo.weights")
    data = Path(synthesize(root / "s", n_train=4, n_valid=2, img_size=64, seed=0))
    shutil.copytree(root / "s" / "images" / "valid", root / "img")
    recipe = root / "m" / "r.yaml"
    recipe.write_text("model: {cfg: demo.cfg}\nsteps:\n  - info: {}\n")
    return {"cfg": root / "m" / "demo.cfg", "weights": root / "m" / "demo.weights", "data": data,
            "img": root / "img", "recipe": recipe, "root": root}


def _lookup(name: str) -> click.Command | None:
    from compress.cli.run import lookup_command
    return lookup_command(name)


# job type -> a job whose declared output is (or would replace) one of its inputs, and the message
HOSTILE = {
    "train": lambda f: (TrainJob(f["cfg"], f["weights"], f["data"], f["cfg"].parent, TrainConfig(epochs=1)),
                        "holds the input"),
    "sparse-train": lambda f: (SparseTrainJob(str(f["cfg"]), str(f["weights"]), str(f["data"]), str(f["cfg"].parent)),
                               "holds the input"),
    "prune": lambda f: (PruneJob(str(f["cfg"]), str(f["weights"]), str(f["cfg"].parent)), "holds the input"),
    "quantize": lambda f: (QuantizeJob(str(f["cfg"]), str(f["weights"]), str(f["data"]), str(f["cfg"].parent),
                                       make_config("google", 8)), "holds the input"),
    "distill": lambda f: (DistillJob(f["cfg"], f["weights"], f["cfg"], f["weights"], f["data"], f["cfg"].parent,
                                     DistillConfig(strategy=1)), "holds the input"),
    "info": lambda f: (InfoJob(f["cfg"], f["weights"], gamma_plot=f["weights"]), "is an input"),
    "eval": lambda f: (EvalJob(f["cfg"], f["weights"], f["data"], json_path=f["cfg"]), "is an input"),
    "detect": lambda f: (DetectJob(f["cfg"], f["weights"], f["img"], f["img"]), "input folder"),
    "export": lambda f: (ExportJob(f["cfg"], f["weights"], f["weights"], ExportConfig()), "is an input"),
    "anchors": lambda f: (AnchorsJob(f["data"]), "is an input"),          # its one output: the report
    "data synth": lambda f: (SynthJob(f["root"] / "s"), "already holds an earlier run"),  # no inputs to hit
    "data convert": lambda f: (ConvertConfig("voc", f["img"], f["img"]), "is an input folder"),
    "run": lambda f: (RecipeJob(RunConfig(f["recipe"], f["cfg"].parent), _lookup), "holds the input"),
}


def _leaf_commands(group: click.Group, prefix: str = "") -> list[str]:
    names = []
    for name, command in group.commands.items():
        full = f"{prefix}{name}"
        names += _leaf_commands(command, full + " ") if isinstance(command, click.Group) else [full]
    return names


def test_every_cli_command_is_one_registered_job():
    registered = sorted(kind.command for kind in JOBS.values())
    assert registered == sorted(_leaf_commands(cli)) == sorted(HOSTILE)


def _digests(folder: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("command", sorted(HOSTILE))
def test_run_job_refuses_an_output_onto_an_input_before_any_work(command, files, monkeypatch):
    job, says = HOSTILE[command](files)
    kind = JOBS[type(job)]
    assert kind.command == command
    report = files["data"] if command == "anchors" else None
    declared = job_paths(job, report)
    assert declared.outputs, f"{command}: no declared outputs"
    # the run function must never be reached: the guard comes first
    monkeypatch.setitem(JOBS, type(job), dataclasses.replace(kind, run=lambda j: pytest.fail("ran")))
    before = _digests(files["root"])
    with pytest.raises(GuardError, match=says):
        run_job(job, report)
    assert _digests(files["root"]) == before


def test_run_job_refuses_a_report_onto_an_input(files):
    with pytest.raises(GuardError, match="--report .*is an input"):
        run_job(InfoJob(files["cfg"]), files["cfg"])


def test_the_library_writes_report_json(files, tmp_path):
    """Python API, no CLI: OUT/report.json and report_path hold the returned report; cfg/weights name the output."""
    out = tmp_path / "p"
    job = PruneJob(str(files["cfg"]), str(files["weights"]), str(out), PruneConfig(method="slim", percent=0.3))
    report = run_job(job, tmp_path / "copy.json")
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads((tmp_path / "copy.json").read_text()) == json.loads(json.dumps(report))
    model = load(on_disk["cfg"], on_disk["weights"])  # the pruned pair, as the recipes read it
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in load(files["cfg"]).parameters())
    with pytest.raises(GuardError, match="already holds an earlier run"):
        run_job(job)                      # a second run into the same folder needs exist_ok
    run_job(job, exist_ok=True)
    dry = dataclasses.replace(job, out=str(tmp_path / "dry"), dry_run=True)
    assert run_job(dry)["dry_run"] and not (tmp_path / "dry").exists()  # dry run: nothing written


def test_synth_and_eval_reports(files, tmp_path):
    synth = run_job(SynthJob(tmp_path / "d", n_train=2, n_valid=2, img_size=64))
    assert json.loads((tmp_path / "d" / "report.json").read_text())["data"] == synth["data"]
    ev = run_job(EvalJob(files["cfg"], files["weights"], synth["data"], img_size=64, progress=False, workers=0),
                 tmp_path / "eval.json")
    assert ev["images"] == 2 and json.loads((tmp_path / "eval.json").read_text())["map50"] == ev["map50"]


@dataclasses.dataclass(frozen=True)
class _Fake:
    out: Path
    distributed: DistConfig | None = None


class _Refused(CompressError):
    pass


def _refuse(job, report, written):
    raise _Refused(f"figures in {written}")


def test_post_report_check_runs_after_writing_and_later_ranks_write_nothing(tmp_path):
    register_job(_Fake, JobKind("fake", lambda j: {"cfg": "x"}, inputs=lambda j: (),
                                outputs=lambda j: (), out_dir=lambda j: j.out, check=_refuse))
    try:
        with pytest.raises(_Refused, match="report.json") as info:  # e.g. quantize's verification
            run_job(_Fake(tmp_path / "a"))
        assert info.value.report == {"cfg": "x"} and (tmp_path / "a" / "report.json").is_file()
        assert run_job(_Fake(tmp_path / "b", DistConfig(rank=1, world_size=2))) == {"cfg": "x"}
        assert not (tmp_path / "b").exists()  # rank 0 writes
    finally:
        del JOBS[_Fake]


def test_unregistered_job_type_is_named(tmp_path):
    with pytest.raises(CompressError, match="_Fake is not a registered job type"):
        run_job(_Fake(tmp_path))
