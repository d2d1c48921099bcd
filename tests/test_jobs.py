"""The job contract (compress/jobs): every command is one registered job whose fields are its options; `run_job`
guards before any work (for Python callers too, not only the CLI), writes OUT/report.json and --report itself,
and keeps torchrun rank 0 the only writer."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import click
import pytest
import torch

from compress.base.errors import CompressError, GuardError
from compress.cli import cli
from compress.darknet.cfg import read_cfg
from compress.darknet.model import build_model
from compress.darknet.persist import load, save
from compress.data.synth import synthesize
from compress.jobs import (CLI_ONLY, JOBS, AnchorsJob, BenchmarkJob, ConvertJob, DetectJob, DistillJob, EvalJob, ExportJob, InfoJob,
                           Job, PruneJob, QuantizeJob, Report, SparseTrainJob, SplitJob, SynthJob, TrainJob,
                           job_paths, register_job, run_job)
from compress.recipe import RecipeJob
from compress.train import DistConfig, TrainConfig

from conftest import DEMO_CFG


def lookup_command(path: str) -> click.Command:
    """The click command at a command path like "prune" or "data synth"."""
    command = cli
    for word in path.split():
        command = command.commands[word]
    return command


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


# job type -> a job whose declared output is (or would replace) one of its inputs, and the message
HOSTILE = {
    "train": lambda f: (TrainJob(f["cfg"], f["weights"], f["data"], f["cfg"].parent, TrainConfig(epochs=1)),
                        "holds the input"),
    "sparse-train": lambda f: (SparseTrainJob(str(f["cfg"]), str(f["weights"]), str(f["data"]), str(f["cfg"].parent)),
                               "holds the input"),
    "prune": lambda f: (PruneJob(str(f["cfg"]), str(f["weights"]), str(f["cfg"].parent)), "holds the input"),
    "quantize": lambda f: (QuantizeJob(str(f["cfg"]), str(f["weights"]), str(f["data"]), str(f["cfg"].parent)),
                           "holds the input"),
    "distill": lambda f: (DistillJob(f["cfg"], f["weights"], f["cfg"], f["weights"], f["data"], f["cfg"].parent,
                                     kd=1), "holds the input"),
    "info": lambda f: (InfoJob(f["cfg"], f["weights"], gamma_plot=f["weights"]), "is an input"),
    "eval": lambda f: (EvalJob(f["cfg"], f["weights"], f["data"], json_path=f["cfg"]), "is an input"),
    "detect": lambda f: (DetectJob(f["cfg"], f["weights"], f["img"], f["img"]), "input folder"),
    "export": lambda f: (ExportJob(f["cfg"], f["weights"], f["weights"]), "is an input"),
    "anchors": lambda f: (AnchorsJob(f["data"]), "is an input"),          # its one output: the report
    "benchmark": lambda f: (BenchmarkJob(f["cfg"], f["weights"], f["data"]), "is an input"),  # the report only
    "data synth": lambda f: (SynthJob(f["root"] / "s"), "already holds an earlier run"),  # no inputs to hit
    "data convert": lambda f: (ConvertJob("voc", f["img"], f["img"]), "is an input folder"),
    "data split": lambda f: (SplitJob(f["img"], f["img"]), "is an input folder"),
    "run": lambda f: (RecipeJob(f["recipe"], f["cfg"].parent), "holds the input"),
}


def _leaf_commands(group: click.Group, prefix: str = "") -> list[str]:
    names = []
    for name, command in group.commands.items():
        full = f"{prefix}{name}"
        names += _leaf_commands(command, full + " ") if isinstance(command, click.Group) else [full]
    return names


def test_every_cli_command_is_one_registered_job():
    assert sorted(JOBS) == sorted(_leaf_commands(cli)) == sorted(HOSTILE)
    assert all(job.command == name for name, job in JOBS.items())


@pytest.mark.parametrize("command", sorted(HOSTILE))
def test_click_options_are_the_job_fields(command):
    """One to one: the command's parameters are the job's fields (the training options in place of `train`),
    apart from the CLI-only ones (--report, --exist-ok, ...)."""
    job = JOBS[command]
    fields = {f.name for f in dataclasses.fields(job)} - {"train"} | set(job.train_options)
    params = {p.name for p in lookup_command(command).params}
    assert params - (CLI_ONLY - fields) == fields


@pytest.mark.parametrize("command", sorted(HOSTILE))
def test_click_defaults_are_the_job_defaults(command):
    """What a command does without an option is what its job does without the field (recipes and Python build
    jobs without click): every click default equals the field's default, or the training option's default."""
    job = JOBS[command]
    defaults = {f.name: f.default for f in dataclasses.fields(job) if f.default is not dataclasses.MISSING}
    if job.train_options:  # TrainingJob.train_default; QuantizeJob keeps its QAT defaults in train_defaults
        default = job.train_default if hasattr(job, "train_default") else job.train_defaults.get
        defaults.update({name: default(name) for name in job.train_options})
    differ = {p.name: (p.default, defaults[p.name]) for p in lookup_command(command).params
              if isinstance(p, click.Option) and p.name in defaults and _set(p.default)
              and _plain(p, p.default) != _plain(p, defaults[p.name])}
    assert not differ, f"click default vs job default: {differ}"


def _set(default: object) -> bool:
    """A default the option states (not None / click's "unset" sentinel: the job computes those)."""
    return default is not None and type(default).__name__ != "Sentinel"


def _plain(param: click.Option, value: object) -> object:
    """Choice values compare as text (`--kd 4` is the choice "4", the job's int 4); sequences as tuples."""
    if isinstance(param.type, click.Choice):
        return str(value)
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _digests(folder: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("command", sorted(HOSTILE))
def test_run_job_refuses_an_output_onto_an_input_before_any_work(command, files, monkeypatch):
    job, says = HOSTILE[command](files)
    assert JOBS[command] is type(job)
    report = files["data"] if command in ("anchors", "benchmark") else None
    declared = job_paths(job, report)
    assert declared.outputs, f"{command}: no declared outputs"
    # the run method must never be reached: the guard comes first
    monkeypatch.setattr(type(job), "run", lambda j, dist=None: pytest.fail("ran"))
    before = _digests(files["root"])
    with pytest.raises(GuardError, match=says):
        run_job(job, report)
    assert _digests(files["root"]) == before


@pytest.mark.parametrize("command", sorted(set(HOSTILE) - {"run"}))
def test_to_argv_parses_back_into_the_same_job(command, files):
    job, _ = HOSTILE[command](files)
    argv = job.to_argv()
    assert argv[:len(command.split())] == command.split()
    click_command = lookup_command(command)
    ctx = click_command.make_context(command, argv[len(command.split()):])
    options = {k: v for k, v in ctx.params.items() if k not in CLI_ONLY}
    given = {k for k in ctx.params if ctx.get_parameter_source(k).name == "COMMANDLINE"}
    with ctx:
        again = type(job).from_options(options, given)
    assert again.to_argv() == argv


def test_from_dict_is_strict_and_resolves_paths(files, tmp_path):
    with pytest.raises(CompressError, match=r"recipe.yaml:12: `prune` has no option `percnt`; valid options: .*percent"):
        JOBS["prune"].from_dict({"cfg": "m.cfg", "percnt": 0.3}, where="recipe.yaml:12")
    with pytest.raises(CompressError, match=r"recipe.yaml:3: `prune` needs option\(s\) out"):
        JOBS["prune"].from_dict({"cfg": "m.cfg", "weights": None}, where="recipe.yaml:3")
    root = files["cfg"].parent
    job = JOBS["distill"].from_dict({"cfg": "demo.cfg", "weights": "demo.weights", "t-cfg": "demo.cfg",
                                     "t_weights": "demo.weights", "data": str(files["data"]), "out": "kd",
                                     "epochs": 2, "lr0": 1, "sync-bn": True, "kd": 1}, where="r.yaml:1", base=root)
    assert job.cfg == root / "demo.cfg" and job.out == root / "kd" and job.data == files["data"]
    assert (job.train.epochs, job.train.lr0, job.train.sync_bn, job.kd) == (2, 1.0, True, 1)
    assert isinstance(job.train.lr0, float) and job.train.img_size == read_cfg(files["cfg"]).width
    export = JOBS["export"].from_dict({"cfg": "demo.cfg", "weights": None, "out": "m.onnx", "check": False,
                                       "check-image": ["a.png"]}, base=root)
    assert export.runtime_check is False and export.check_images == (root / "a.png",)
    with pytest.raises(CompressError, match="`eval` option `batch_size`: 'x' is not a int"):
        JOBS["eval"].from_dict({"cfg": "a", "weights": None, "data": "d", "batch_size": "x"})


def test_train_options_keep_their_precedence(files, tmp_path):
    """Fine-tune defaults < --hyp < options the user gave, whichever way the job is built."""
    hyp = tmp_path / "hyp.yaml"
    hyp.write_text("lr0: 0.002\nbox: 0.07\n")
    base = {"cfg": files["cfg"], "weights": files["weights"], "data": files["data"], "out": tmp_path / "t"}
    tuned = TrainJob.from_dict(base)
    assert (tuned.train.lr0, tuned.train.loss, tuned.train.freeze_bn_stats) == (4e-5, "darknet", True)
    assert TrainJob.from_dict({**base, "hyp": hyp}).train.lr0 == 0.002
    job = TrainJob.from_dict({**base, "hyp": hyp, "lr0": 0.003})
    assert (job.train.lr0, job.train.box) == (0.003, 0.07)
    argv = job.to_argv()
    assert argv[argv.index("--hyp") + 1] == str(hyp) and argv[argv.index("--lr0") + 1] == "0.003"


def test_run_job_refuses_a_report_onto_an_input(files):
    with pytest.raises(GuardError, match="--report .*is an input"):
        run_job(InfoJob(files["cfg"]), files["cfg"])


def test_the_library_writes_report_json(files, tmp_path):
    """Python API, no CLI: OUT/report.json and report_path hold the returned Report; cfg/weights name the output."""
    out = tmp_path / "p"
    job = PruneJob(str(files["cfg"]), str(files["weights"]), str(out), method="slim", percent=0.3)
    report = run_job(job, tmp_path / "copy.json")
    assert isinstance(report, Report) and report.command == "prune"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads((tmp_path / "copy.json").read_text()) == json.loads(json.dumps(report.to_dict()))
    model = load(on_disk["cfg"], on_disk["weights"])  # the pruned pair, as the recipes read it
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in load(files["cfg"]).parameters())
    with pytest.raises(GuardError, match="already holds an earlier run"):
        run_job(job)                      # a second run into the same folder needs exist_ok
    run_job(job, exist_ok=True)
    dry = dataclasses.replace(job, out=str(tmp_path / "dry"), dry_run=True)
    assert run_job(dry)["dry_run"] and not (tmp_path / "dry").exists()  # dry run: nothing written


def test_synth_and_eval_reports(files, tmp_path):
    synth = run_job(SynthJob(tmp_path / "d", n_train=2, n_valid=2, img_size=64))
    assert json.loads((tmp_path / "d" / "report.json").read_text()) == synth.to_dict()
    ev = run_job(EvalJob(files["cfg"], files["weights"], synth["data"], img_size=64, no_progress=True, workers=0),
                 tmp_path / "eval.json")
    assert ev["images"] == 2 and json.loads((tmp_path / "eval.json").read_text())["map50"] == ev["map50"]


class _Refused(CompressError):
    pass


@dataclasses.dataclass(frozen=True)
class _Fake(Job):
    command = "fake"
    out: Path

    def out_dir(self) -> Path:
        return self.out

    def run(self, dist: DistConfig | None = None) -> Report:
        return self.report({"cfg": "x"})

    def check(self, report: Report, written: Path | None) -> None:
        raise _Refused(f"figures in {written}")


def test_post_report_check_runs_after_writing_and_later_ranks_write_nothing(tmp_path, monkeypatch):
    register_job(_Fake)
    try:
        with pytest.raises(_Refused, match="report.json") as info:  # e.g. quantize's verification
            run_job(_Fake(tmp_path / "a"))
        assert info.value.report.to_dict() == {"cfg": "x"} and (tmp_path / "a" / "report.json").is_file()
        later = DistConfig(rank=1, world_size=2, local_rank=1, init_method="tcp://127.0.0.1:1")
        assert run_job(_Fake(tmp_path / "b"), dist=later).to_dict() == {"cfg": "x"}
        assert not (tmp_path / "b").exists()  # rank 0 writes
    finally:
        del JOBS["fake"]


def test_unregistered_job_type_is_named(tmp_path):
    with pytest.raises(CompressError, match="_Fake is not a registered job type"):
        run_job(_Fake(tmp_path))
