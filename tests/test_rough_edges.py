"""Issue #26's rough edges, one test each: one `safe_percent`; channel totals that do not depend on --round-to;
help texts; eval on labels that use a subset of the model's classes; Darknet's default anchors for a [yolo]
mask beyond the anchors list."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from compress.base.errors import CompressError, DataError
from compress.cli import cli
from compress.darknet.cfg import parse_cfg, read_cfg
from compress.darknet.model import build_model
from compress.data.synth import synthesize
from compress.detection.evaluate import EvalConfig, evaluate
from compress.detection.losses_darknet import DarknetLoss
from compress.jobs import JOBS
from compress.prune import PruneConfig, prune
from compress.prune.sparsity import BNL1Hook, SparsityConfig, sparsity_layers
from compress.darknet.summary import summarize
from compress.recipe import run_recipe, stage_table
from compress.train import loop

from conftest import DEMO_CFG, randomize_bn


@pytest.fixture(scope="module")
def sparse_model():
    """The demo net with random BN gammas, a third of them near zero (as after sparse training)."""
    torch.manual_seed(3)
    model = randomize_bn(build_model(read_cfg(DEMO_CFG)))
    with torch.no_grad():
        for layer in model.layers:
            bn = getattr(layer, "bn", None)
            if bn is not None:
                bn.weight.mul_((torch.rand_like(bn.weight) > 0.33).float() + 1e-4)
    return model


@pytest.mark.parametrize("mode, method", [(0, "normal"), (0, "regular"), (1, "slim")])
def test_sparse_train_and_prune_state_one_safe_percent(sparse_model, mode, method):
    summary = BNL1Hook(SparsityConfig(mode=mode), sparsity_layers(sparse_model, mode)).summary(sparse_model)
    info = prune(sparse_model, PruneConfig(method=method, percent=0.1)).info
    assert summary["safe_percent"] == info["safe_percent"] > 0.3   # before #26: min(that, share < 1e-2)
    assert summary["near_zero_percent"] <= summary["safe_percent"]
    assert "suggested_max_percent" not in summary


def test_channel_totals_do_not_depend_on_round_to(sparse_model):
    totals = []
    for round_to in (None, 8, 16):
        result = prune(sparse_model, PruneConfig(method="slim", percent=0.5, round_to=round_to))
        rows = result.channel_rows(sparse_model)
        assert [r[0] for r in rows] == [i for i, s in enumerate(sparse_model.graph.sections) if s.conv]
        assert [r[3] for r in rows] == [result.model.graph.channels[i] for i, *_ in rows]  # the pruned widths
        totals.append(sum(r[2] for r in rows))
    assert len(set(totals)) == 1


def _commands(group=None, prefix=""):
    group = group or cli
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command


def test_every_data_help_names_data_yaml():
    helps = {name: p.help for name, c in _commands() for p in c.params if p.name == "data"}
    assert {"train", "sparse-train", "distill", "quantize", "prune", "eval", "anchors", "benchmark"} <= set(helps)
    assert all("data.yaml" in h and ".data" in h for h in helps.values()), helps


@pytest.mark.parametrize("command", ["train", "sparse-train", "distill"])
def test_every_trainer_has_no_progress(command, tmp_path):
    params = {p.name for name, c in _commands() if name == command for p in c.params}
    assert "no_progress" in params
    base = {"cfg": str(DEMO_CFG), "weights": None, "data": str(tmp_path), "out": str(tmp_path / "o")}
    if command == "distill":
        base.update(t_cfg=str(DEMO_CFG), t_weights=str(DEMO_CFG))
    assert JOBS[command].from_dict({**base, "no_progress": True}).train.progress is False
    assert JOBS[command].from_dict(base).train.progress is True
    argv = JOBS[command].from_dict({**base, "no_progress": True}).to_argv()
    assert "--no-progress" in argv


def test_eval_accepts_labels_using_a_subset_of_the_model_classes(tmp_path):
    """A folder without a names file whose labels use class 0 only; the model predicts 3 classes: valid data
    (before #26: "model predicts 3 classes but the data has 1"); a label id the model lacks stays an error."""
    data = Path(synthesize(tmp_path / "s", n_train=1, n_valid=3, img_size=64, seed=1)).parent
    folder = data / "images" / "valid"
    (data / "synth.names").unlink()
    for lab in (data / "labels" / "valid").glob("*.txt"):
        lab.write_text("".join("0" + line[1:] + "\n" for line in lab.read_text().splitlines()))
    torch.manual_seed(0)
    model = build_model(read_cfg(DEMO_CFG))
    config = EvalConfig(img_size=64, workers=0, progress=False)
    result = evaluate(model, folder, config)
    assert result.images == 3 and [c["id"] for c in result.per_class] == [0]
    (tmp_path / "s" / "three.names").write_text("a\nb\nc\n")   # the same labels, named as the model's classes
    named = evaluate(model, folder, config)
    assert named.map50 == result.map50 and named.map50_95 == result.map50_95 and len(named.per_class) == 3
    (tmp_path / "s" / "three.names").unlink()
    lab = next((data / "labels" / "valid").glob("*.txt"))
    lab.write_text(lab.read_text() + "5 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DataError, match="labels use class ids up to 5 but the model predicts 3 classes"):
        evaluate(model, folder, config)


YOLO_CFG = ("[net]\nwidth=64\nheight=64\n\n[convolutional]\nbatch_normalize=1\nfilters=8\nsize=3\nstride=1\npad=1\n"
            "activation=leaky\n\n[convolutional]\nfilters=21\nsize=1\nactivation=linear\n\n[yolo]\nmask={mask}\n"
            "anchors=4,5, 8,10, 12,9\nclasses=2\nnum=3\n")


def test_yolo_mask_past_the_anchors_runs_with_darknets_default_anchors(caplog):
    """Darknet's make_yolo_layer starts every bias at .5 and parse_yolo overwrites only the listed anchors, so a
    mask index past anchors= / num= runs with a 0.5 x 0.5 anchor (before #26: refused, "out of range")."""
    model = build_model(parse_cfg(YOLO_CFG.format(mask="2,3,4"), "m.cfg"))
    assert "Darknet uses 0.5" in caplog.text
    assert model.heads[0].anchors.tolist() == [[12, 9], [0.5, 0.5], [0.5, 0.5]]
    x = torch.rand(2, 3, 64, 64)
    assert model.eval()(x).shape == (2, 3 * 64 * 64, 7)   # stride 1: a 64x64 grid
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.2, 0.3], [1, 0, 0.3, 0.3, 0.01, 0.01]])
    loss, parts = DarknetLoss(model)(model.train()(x), targets, (64, 64))
    assert torch.isfinite(loss) and set(parts) == {"box", "obj", "cls"}
    with pytest.raises(CompressError):   # a negative index stays an error
        parse_cfg(YOLO_CFG.format(mask="-1,0,1"), "m.cfg")


def test_rerun_after_ctrl_c_continues_the_interrupted_step(tmp_path, monkeypatch, caplog):
    """Ctrl-C after the train step's epoch-1 checkpoint; the re-run continues that step from its last.pt
    (trains epoch 2 only) instead of retraining from epoch 1."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{cfg: {DEMO_CFG}}}\ndata: {{synth: {{n_train: 4, n_valid: 2, img_size: 64}}}}\n"
                      "steps:\n  - train: {epochs: 2, img_size: 64, batch_size: 4, workers: 0, eval_every: 2}\n")
    save = loop._Trainer._save_epoch   # an epoch's files (pairs + last.pt) as one set
    saved: list[int] = []

    def save_then_ctrl_c(self, done: int, row: dict) -> None:
        save(self, done, row)
        saved.append(done)
        if len(saved) == 1:
            raise KeyboardInterrupt   # (the loop saves once more on Ctrl-C)
    monkeypatch.setattr(loop._Trainer, "_save_epoch", save_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, out=tmp_path / "out")
    assert set(saved) == {1}
    saved.clear()
    first = list(csv.DictReader((tmp_path / "out" / "01-train" / "results.csv").open()))

    def save_and_count(self, done: int, row: dict) -> None:
        save(self, done, row)
        saved.append(done)
    monkeypatch.setattr(loop._Trainer, "_save_epoch", save_and_count)
    with caplog.at_level("INFO"):
        run_recipe(recipe, out=tmp_path / "out")
    assert saved == [2]   # the re-run trained epoch 2 only
    assert "continuing the interrupted run" in caplog.text
    rows = list(csv.DictReader((tmp_path / "out" / "01-train" / "results.csv").open()))
    # epoch 1's row is the interrupted run's (the re-run's evaluation may add columns, so compare by name)
    assert len(rows) == 2 and all(rows[0][k] == v for k, v in first[0].items() if v != "")
    steps = json.loads((tmp_path / "out" / "manifest.json").read_text())["steps"]
    assert [s["status"] for s in steps] == ["reused", "done"]


def test_stage_table_counts_every_rows_gflops_at_one_size(tmp_path):
    """train at --img-size 64 and prune at the cfg's 128: both rows' GFLOPs at 128 (the input cfg's width)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{cfg: {DEMO_CFG}}}\ndata: {{synth: {{n_train: 4, n_valid: 2, img_size: 64}}}}\n"
                      "steps:\n  - train: {epochs: 1, img_size: 64, batch_size: 4, workers: 0}\n"
                      "  - prune: {method: slim, percent: 0.3}\n")
    run_recipe(recipe, out=tmp_path / "out")
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())["stages"]
    trained = json.loads((tmp_path / "out" / "01-train" / "report.json").read_text())
    pruned = json.loads((tmp_path / "out" / "02-prune" / "report.json").read_text())
    assert [r["gflops_img_size"] for r in rows] == [128, 128] and pruned["img_size"] == 128
    for row, report in zip(rows, (trained, pruned)):
        assert row["gflops"] == round(summarize(build_model(read_cfg(report["cfg"])), (128, 128)).gflops, 4)
    assert rows[1]["gflops"] == pruned["gflops"] and rows[0]["gflops"] > 3 * trained["gflops"]  # train's: at 64
    assert "GFLOPs @128" in stage_table(rows).splitlines()[0]
