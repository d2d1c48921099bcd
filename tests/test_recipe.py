"""Recipe runner: validation with file:line errors, model threading, manifest/resume, and recipe <-> CLI parity."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import compress
from compress.base.errors import CompressError, PruneError, RecipeError
from compress.base.guard import Output
from compress.darknet.persist import load, save
from compress.jobs import JOBS, Job, Report
from compress.jobs.base import PathLike
from compress.recipe import Plan, prepare, render_commands, run_recipe
from compress.recipe.runner import sha256_file
from compress.darknet.summary import stage_figures

from conftest import DATA, ROOT, randomize_bn

TINY = DATA / "tiny-shortcut.cfg"
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))

# ---------------------------------------------------------------- fake model-producing jobs (fast, real files)
CALLS: list[tuple[str, dict]] = []


def _produce(name: str, cfg: str, weights: str | None, out: str, scale: float = 1.0, **extra) -> dict:
    model = load(cfg, weights)
    if weights is None:
        randomize_bn(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.mul_(scale)
    cfg_out, w_out = Path(out) / f"{name}.cfg", Path(out) / f"{name}.weights"
    save(model, cfg_out, w_out)
    return {**stage_figures(model, cfg_out, w_out, latency_runs=1), **extra}


class Fake(Job):
    """A fake command: records its options, writes into `out` when it has one."""

    def inputs(self) -> tuple[Path, ...]:
        return tuple(Path(getattr(self, n)) for n in ("cfg", "weights", "t_cfg", "t_weights", "data")
                     if getattr(self, n, None))

    def outputs(self) -> tuple[Output, ...]:
        return (Output(Path(self.out), "dir", "--out"),) if getattr(self, "out", None) else ()

    def out_dir(self) -> Path | None:
        return Path(self.out) if getattr(self, "out", None) else None

    def run(self, dist=None) -> Report:
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        CALLS.append((self.command, {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}))
        return self.report(self.produce())


@dataclass(frozen=True)
class FakeTrain(Fake):
    command: ClassVar[str] = "train"
    produces_model: ClassVar[bool] = True
    in_summary: ClassVar[bool] = True
    cfg: PathLike
    data: PathLike
    out: PathLike
    weights: PathLike | None = None
    epochs: int = 3
    lr0: float = 0.01

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise CompressError("--epochs must be >= 1")

    def produce(self) -> dict:
        return _produce("trained", self.cfg, self.weights, self.out)


@dataclass(frozen=True)
class FakePrune(Fake):
    command: ClassVar[str] = "prune"
    produces_model: ClassVar[bool] = True
    in_summary: ClassVar[bool] = True
    cfg: PathLike
    out: PathLike
    weights: PathLike | None = None
    data: PathLike | None = None
    method: str = "slim"
    percent: float = 0.5
    round_to: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.percent < 1:
            raise CompressError(f"--percent {self.percent} is not in [0, 1)")
        if self.method not in ("slim", "regular"):
            raise CompressError(f"--method {self.method!r} is not one of slim, regular")

    def produce(self) -> dict:
        return _produce("pruned", self.cfg, self.weights, self.out, scale=1 - self.percent)


@dataclass(frozen=True)
class FakeDistill(Fake):
    command: ClassVar[str] = "distill"
    produces_model: ClassVar[bool] = True
    in_summary: ClassVar[bool] = True
    cfg: PathLike
    t_cfg: PathLike
    data: PathLike
    out: PathLike
    t_weights: PathLike | None = None
    weights: PathLike | None = None
    kd: int = 3

    def produce(self) -> dict:
        return _produce("distilled", self.cfg, self.weights, self.out, map50=0.4, map50_95=0.2)


@dataclass(frozen=True)
class FakeEval(Fake):
    command: ClassVar[str] = "eval"
    in_summary: ClassVar[bool] = True
    cfg: PathLike
    data: PathLike
    weights: PathLike | None = None

    def produce(self) -> dict:
        return {"map50": 0.5, "map50_95": 0.25, "images": 4}


@dataclass(frozen=True)
class FakeSynth(Fake):
    command: ClassVar[str] = "data synth"
    out: PathLike
    n_train: int = 8

    def produce(self) -> dict:
        Path(self.out).mkdir(parents=True, exist_ok=True)
        (Path(self.out) / "synth.data").write_text(f"classes=3\n# n_train={self.n_train}\n")
        return {"data": str(Path(self.out) / "synth.data")}


FAKES = {**JOBS, **{k.command: k for k in (FakeTrain, FakePrune, FakeDistill, FakeEval, FakeSynth)}}


def _recipe(tmp_path: Path, text: str) -> Path:
    shutil.copy(TINY, tmp_path / "net.cfg")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


PIPELINE = """\
model: {cfg: net.cfg}
data: {synth: {n_train: 4}}
steps:
  - train: {epochs: 2}
  - prune: {method: slim, percent: 0.5}
  - distill: {teacher: step:1, kd: 3}
  - eval: {}
  - export: {check: true, dynamic-batch: true}
"""


# ---------------------------------------------------------------------------------------------------- running
def test_pipeline_threads_models_writes_manifest_and_resumes(tmp_path):
    CALLS.clear()
    recipe, out = _recipe(tmp_path, PIPELINE), tmp_path / "out"
    result = run_recipe(recipe, out=out, jobs=FAKES)
    calls = dict(CALLS)
    assert [c for c, _ in CALLS] == ["data synth", "train", "prune", "distill", "eval"]
    data = str(out / "00-data" / "synth.data")
    assert calls["train"]["cfg"] == str(tmp_path / "net.cfg") and calls["train"]["weights"] is None
    assert calls["train"]["data"] == data == calls["distill"]["data"] == calls["eval"]["data"]
    assert calls["train"]["epochs"] == 2 and calls["prune"]["percent"] == 0.5
    trained = json.loads((out / "01-train" / "report.json").read_text())
    pruned = json.loads((out / "02-prune" / "report.json").read_text())
    distilled = json.loads((out / "03-distill" / "report.json").read_text())
    assert (calls["prune"]["cfg"], calls["prune"]["weights"]) == (trained["cfg"], trained["weights"])
    assert (calls["distill"]["t_cfg"], calls["distill"]["t_weights"]) == (trained["cfg"], trained["weights"])
    assert (calls["distill"]["cfg"], calls["distill"]["weights"]) == (pruned["cfg"], pruned["weights"])
    assert (calls["eval"]["cfg"], calls["eval"]["weights"]) == (distilled["cfg"], distilled["weights"])
    export = json.loads((out / "05-export" / "report.json").read_text())
    assert export["cfg"] == distilled["cfg"] and Path(export["onnx"]).is_file() and export["max_abs_diff"] < 1e-3

    manifest = json.loads((out / "manifest.json").read_text())["steps"]
    assert [s["status"] for s in manifest] == ["done"] * 6
    assert manifest[2]["sha256"][trained["weights"]] == sha256_file(trained["weights"])
    lines = [ln for ln in (out / "commands.sh").read_text().splitlines() if ln.startswith("yolo-compress")]
    assert lines == [shlex.join(s["argv"]) for s in manifest]  # commands.sh is exactly what ran, 1:1

    summary = json.loads((out / "summary.json").read_text())["stages"]
    assert [r["stage"] for r in summary] == ["01-train", "02-prune", "03-distill", "04-eval"]
    assert summary[3]["params"] == distilled["params"] and summary[3]["map50"] == 0.5
    assert summary[2]["map50"] == 0.4 and (out / "summary.png").stat().st_size > 1000
    assert len(result.records) == 6

    resolved = prepare(out / "resolved.yaml", jobs=FAKES)  # resolved.yaml is a runnable recipe
    assert render_commands(resolved) == render_commands(prepare(recipe, out=out, jobs=FAKES))

    CALLS.clear()  # unchanged re-run: everything reused
    run_recipe(recipe, out=out, jobs=FAKES)
    assert CALLS == []
    assert {s["status"] for s in json.loads((out / "manifest.json").read_text())["steps"]} == {"reused"}

    CALLS.clear()  # a changed option re-runs that step and, through the changed hashes, everything downstream
    run_recipe(recipe, ("steps.2.prune.percent=0.25",), out=out, jobs=FAKES)
    assert [c for c, _ in CALLS] == ["prune", "distill", "eval"]
    assert [s["status"] for s in json.loads((out / "manifest.json").read_text())["steps"]] == \
        ["reused", "reused", "done", "done", "done", "done"]


@dataclass(frozen=True)
class FailingPrune(FakePrune):
    def produce(self) -> dict:
        raise PruneError("layer 3: boom; use another --percent")


def test_failed_step_names_the_recipe_line_and_resume_reuses_finished_steps(tmp_path):
    CALLS.clear()
    recipe = _recipe(tmp_path, "model: {cfg: net.cfg}\ndata: {synth: {}}\nsteps:\n  - train: {}\n  - prune: {}\n")
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match=f"^{recipe}:5: step 2 `prune` failed: layer 3: boom"):
        run_recipe(recipe, out=out, jobs={**FAKES, "prune": FailingPrune})
    manifest = json.loads((out / "manifest.json").read_text())["steps"]
    assert [(s["name"], s["status"]) for s in manifest] == [("data synth", "done"), ("train", "done"),
                                                             ("prune", "failed")]
    assert "boom" in manifest[2]["error"]
    CALLS.clear()
    run_recipe(recipe, out=out, jobs=FAKES)
    assert [c for c, _ in CALLS] == ["prune"]


# ------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("bad, line, match", [
    ("  - prune: {method: slim, precent: 0.5}\n", 5, "step 2 `prune` has no option `precent`; valid options: .*percent"),
    ("  - prune: {method: slim, percent: 2}\n", 5, "--percent 2(\\.0)? is not in \\[0, 1\\)"),
    ("  - prune: {method: magic}\n", 5, "--method 'magic' is not one of"),
    ("  - prun: {}\n", 5, "unknown step `prun`; valid steps: .*prune"),
    ("  - distill: {teacher: step:3}\n", 5, "`step:3` must name an earlier model-producing step"),
    ("  - prune: {cfg: x.cfg}\n", 5, "`cfg` is set by the runner"),
    ("  - export: {img_size: [1, 2]}\n", 5, "`export` option `img_size`: \\[1, 2\\] is not a"),
    ("  - eval: {}\n  - info: {gamma_plot: g.png, cutoff: 0}\n", 6, "--cutoff 0 is out of range; use a value >= 1"),
])
def test_bad_step_is_a_recipe_error_with_file_and_line(tmp_path, bad, line, match):
    recipe = _recipe(tmp_path, "model: {cfg: net.cfg}\ndata: {synth: {}}\nsteps:\n  - train: {epochs: 1}\n" + bad)
    with pytest.raises(RecipeError, match=f"^{recipe}:{line}: {match}"):
        run_recipe(recipe, out=tmp_path / "out", dry_run=True, jobs=FAKES)
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


@pytest.mark.parametrize("text, line, match", [
    ("model: {cfg: missing.cfg}\nsteps:\n  - info: {}\n", 1, "model cfg .*missing.cfg does not exist"),
    ("model: {cfg: net.cfg}\ndata: nowhere.data\nsteps:\n  - info: {}\n", 2, "data .*nowhere.data does not exist"),
    ("model: {cfg: net.cfg}\nsteps:\n  - train: {epochs: 1}\n", 3, "`train` needs --data; add `data:`"),
    ("model: {cfg: net.cfg}\nmodle: {}\nsteps:\n  - info: {}\n", 2, "unknown top-level key `modle`"),
    ("model: {cfg: net.cfg}\nsteps:\n  - info: {}\n    export: {}\n", 3, "step 1 must be a one-key mapping"),
    ("model: {cfg: net.cfg}\nsteps:\n  - info: {img_size: 64\n", 3, "not valid YAML"),
    ("model: {cfg: net.cfg}\nsteps:\n  - info: {}\n  - distill: {teacher: {cfg: gone.cfg}}\n", 4,
     "cfg .*gone.cfg does not exist"),
])
def test_bad_recipe_shape_or_file_names_the_line(tmp_path, text, line, match):
    recipe = _recipe(tmp_path, text)
    with pytest.raises(RecipeError, match=f"^{recipe}:{line}: {match}"):
        run_recipe(recipe, out=tmp_path / "out", dry_run=True, jobs=FAKES)


def test_overrides_are_typed_checked_and_relative_to_cwd(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, PIPELINE)
    (tmp_path / "sub").mkdir()
    shutil.copy(TINY, tmp_path / "sub" / "other.cfg")
    monkeypatch.chdir(tmp_path / "sub")
    overrides = ("model.cfg=other.cfg", "steps.prune.percent=0.7", "steps.3.distill.teacher=input",
                 "data=../net.cfg")
    plan = run_recipe(recipe, overrides, out="o", dry_run=True, jobs=FAKES)
    assert isinstance(plan, Plan)
    assert plan.input_model == (str(tmp_path / "sub" / "other.cfg"), None)
    assert plan.data == str(tmp_path / "net.cfg") and plan.out == tmp_path / "sub" / "o"
    prune = next(s for s in plan.steps if s.name == "prune")
    assert prune.user.values["percent"] == 0.7 and "--percent 0.7" in " ".join(prune.argv(lambda s: ("m.cfg", None), "d"))
    assert next(s for s in plan.steps if s.name == "distill").refs["teacher"][0] == 0
    assert [s.index for s in plan.steps] == [1, 2, 3, 4, 5]  # no synth step once data is a path
    with pytest.raises(RecipeError, match=r"^--set steps.2.prune.percent: --percent 1.5 is not in \[0, 1\)"):
        run_recipe(recipe, ("steps.2.prune.percent=1.5",), out="o", dry_run=True, jobs=FAKES)
    with pytest.raises(RecipeError, match=r"--set steps.3.prune.percent: step 3 is `distill`.*`prune` is step 2"):
        run_recipe(recipe, ("steps.3.prune.percent=0.5",), out="o", dry_run=True, jobs=FAKES)
    with pytest.raises(RecipeError, match=r"--set model.cfg: model cfg .*nope.cfg does not exist"):
        run_recipe(recipe, ("model.cfg=nope.cfg",), out="o", dry_run=True, jobs=FAKES)


# ------------------------------------------------------------------------------------ recipes <-> real CLI parity
def _stand_ins(recipe: Path, tmp_path: Path) -> tuple[str, ...]:
    """Real-model recipes name user files (placeholders, given with --set): stand in existing files.

    A dry run checks that files exist, not what they hold, so empty stand-ins suffice."""
    text = recipe.read_text()
    if "weights:" not in text.split("steps:")[0]:
        return ()
    weights, data = tmp_path / "stand-in.weights", tmp_path / "stand-in.data"
    weights.write_bytes(b"")
    data.write_text("classes=80\n")
    return (f"model.cfg={TINY}", f"model.weights={weights}", f"data={data}")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_validates_against_the_real_jobs(recipe, tmp_path):
    plan = run_recipe(recipe, _stand_ins(recipe, tmp_path), out=tmp_path / "out", dry_run=True)
    assert [s.name for s in plan.steps if s.index > 0] == [s.name for s in plan.recipe.steps]


def test_commands_sh_reproduces_the_run(tmp_path):
    recipe = _recipe(tmp_path, "model: {cfg: net.cfg, weights: net.weights}\nsteps:\n  - info: {img_size: 64}\n"
                               "  - export: {opset: 13, dynamic_batch: true}\n")
    save(randomize_bn(load(TINY)), tmp_path / "net.cfg", tmp_path / "net.weights")
    out = tmp_path / "out"
    run_recipe(recipe, out=out)
    onnx = out / "02-export" / "model.onnx"
    first = onnx.read_bytes()
    onnx.unlink()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", str(out / "commands.sh")], check=True, env=env, capture_output=True)
    assert onnx.read_bytes() == first


def test_truncated_output_reruns_the_step_instead_of_reusing_it(tmp_path):
    CALLS.clear()
    recipe, out = _recipe(tmp_path, "model: {cfg: net.cfg}\ndata: {synth: {}}\nsteps:\n  - train: {}\n"
                                    "  - prune: {}\n"), tmp_path / "out"
    run_recipe(recipe, out=out, jobs=FAKES)
    weights = Path(json.loads((out / "01-train" / "report.json").read_text())["weights"])
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])  # e.g. a disk that filled up, or an interrupted copy
    CALLS.clear()
    run_recipe(recipe, out=out, jobs=FAKES)
    assert [c for c, _ in CALLS][0] == "train"
    steps = json.loads((out / "manifest.json").read_text())["steps"]
    assert [s["status"] for s in steps][:2] == ["reused", "done"]
    assert len(weights.read_bytes()) == len(whole) and steps[1]["output_sha256"][str(weights)] == sha256_file(weights)


def test_run_refuses_a_foreign_non_empty_folder(tmp_path):
    recipe, out = _recipe(tmp_path, "model: {cfg: net.cfg}\ndata: {synth: {}}\nsteps:\n  - train: {}\n"), \
        tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CompressError, match="already holds an earlier run"):
        run_recipe(recipe, out=out, jobs=FAKES)
    run_recipe(recipe, out=out, exist_ok=True, jobs=FAKES)
    run_recipe(recipe, out=out, jobs=FAKES)  # now a recipe run (manifest.json): resumed
    assert (out / "notes.txt").read_text() == "mine"


def test_recipe_device_reaches_every_step_with_device(tmp_path):
    recipe = _recipe(tmp_path, "model: {cfg: net.cfg}\ndata: {synth: {}}\ndevice: cpu\nsteps:\n  - eval: {}\n"
                               "  - export: {}\n  - eval: {device: auto}\n")
    lines = render_commands(run_recipe(recipe, out=tmp_path / "o", dry_run=True))
    evals = [ln for ln in lines.splitlines() if ln.startswith("yolo-compress eval")]
    export = next(ln for ln in lines.splitlines() if ln.startswith("yolo-compress export"))
    assert "--device cpu" in evals[0] and "--device cpu" not in evals[1]  # the step's own (auto) wins
    assert "--device" not in export
    bad = _recipe(tmp_path, "model: {cfg: net.cfg}\ndevice: banana\nsteps:\n  - export: {}\n")
    with pytest.raises(RecipeError, match=rf"^{bad}:2: --device banana: not a device"):
        run_recipe(bad, out=tmp_path / "o", dry_run=True)
