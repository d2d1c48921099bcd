"""`sparse-train --sparsity fade`: the planned channels (the prune step's own plan) fade to exactly zero, the
rest is untouched, and `prune --threshold 0` then cuts exactly them. The faded pair and the pruned pair of the
official yolov4-tiny / yolo-fastest-1.1 weights are both run in OpenCV's Darknet reader (never our forward) and
must agree; the CLI run (with distillation from a teacher) resumes bit-identically."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import compress
from compress.base.errors import PruneError
from compress.cli import cli
from compress.darknet.summary import summarize
from compress.jobs.prune import SparseTrainJob
from compress.prune import PruneConfig, prune
from compress.prune.costs import Target
from compress.prune.registry import LAYER_KEEP
from compress.prune.surgery import apply_channel_mask
from compress.prune.fade import PLAN_FILE, FadeConfig, FadeHook
from compress.train.ema import ModelEMA

from conftest import DEMO_CFG, randomize_bn, tiny3_model

import cv2


def _state(model, step: int, epochs: int = 2, ema=None, out_dir=None, resume: bool = False):
    return SimpleNamespace(model=model, step=step, epoch=0, epochs=epochs, ema=ema, out_dir=out_dir, rank=0,
                           config=SimpleNamespace(resume=resume))


def _faded(model, config: FadeConfig) -> FadeHook:
    """The hook after its last fading step: alpha = 0."""
    hook = FadeHook(config, model, steps_per_epoch=5)
    state = _state(model, step=0)
    hook.on_fit_start(state)
    state.step = hook.total_steps
    hook.after_step(state)
    return hook


def _opencv(pair: tuple[Path, Path], blob: np.ndarray) -> list[np.ndarray]:
    net = cv2.dnn.readNetFromDarknet(str(pair[0]), str(pair[1]))
    net.setInput(blob)
    return list(net.forward(net.getUnconnectedOutLayersNames()))


@pytest.mark.parametrize("name, size, flops", [("yolov4-tiny", 416, 0.5), ("yolo-fastest-1.1", 320, 0.7)])
def test_faded_real_model_prunes_exactly_in_opencv(assets: Path, tmp_path: Path, name: str, size: int,
                                                   flops: float) -> None:
    w = assets / "weights"
    model = compress.load(w / f"{name}.cfg", w / f"{name}.weights")
    before = {i: (l.bn.weight.clone(), l.bn.bias.clone())
              for i, l in enumerate(model.layers) if getattr(l, "bn", None) is not None}
    config = FadeConfig(PruneConfig(method="slim", target=Target("flops", ratio=flops)))
    hook = _faded(model, config)
    assert hook.planned > 0
    for i, (g, b) in before.items():  # planned channels at exactly 0, every other value untouched
        cut = hook.cut.get(i, torch.tensor([], dtype=torch.long))
        keep = torch.ones(len(g), dtype=torch.bool)
        keep[cut] = False
        bn = model.layers[i].bn
        assert torch.equal(bn.weight[cut], torch.zeros(len(cut))) and torch.equal(bn.bias[cut], torch.zeros(len(cut)))
        assert torch.equal(bn.weight[keep], g[keep]) and torch.equal(bn.bias[keep], b[keep])
    result = prune(model, config.prune_config())
    assert set(result.mask) == set(hook.mask) and all(torch.equal(result.mask[i], hook.mask[i]) for i in hook.mask)
    hw = (size, size)
    assert summarize(result.model, hw).gflops <= flops * summarize(model, hw).gflops * 1.001
    faded, pruned = (tmp_path / "f.cfg", tmp_path / "f.weights"), (tmp_path / "p.cfg", tmp_path / "p.weights")
    compress.save(model, *faded)
    compress.save(result.model, *pruned)
    img = cv2.imread(str(assets / "data" / "samples" / "dog.jpg"))
    blob = cv2.dnn.blobFromImage(img, 1 / 255.0, hw, swapRB=True, crop=False)
    for a, b in zip(_opencv(faded, blob), _opencv(pruned, blob)):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-4
    original = _opencv((w / f"{name}.cfg", w / f"{name}.weights"), blob)
    assert max(float(np.abs(a - b).max()) for a, b in zip(original, _opencv(faded, blob))) > 1e-2  # it did change


def test_caps_follow_alpha_on_the_model_and_its_ema() -> None:
    model = randomize_bn(tiny3_model())
    config = FadeConfig(PruneConfig(method="slim", percent=0.5, round_to=1), end=0.5)
    hook = FadeHook(config, model, steps_per_epoch=10)
    ema = ModelEMA(model)
    state = _state(model, step=0, epochs=2, ema=ema)
    hook.on_fit_start(state)
    assert hook.total_steps == 20 and hook.alpha(5) == pytest.approx(0.5) and hook.alpha(10) == 0.0
    with torch.no_grad():
        for i in hook.cut:  # the optimizer pushed everything up: the cap must pull the planned channels back
            for m in (model, ema.module):
                m.layers[i].bn.weight.mul_(3).add_(1)
    untouched = {i: model.layers[i].bn.weight.clone() for i in hook.cut}
    state.step = 4                      # after_step of step index 4 applies alpha(5) = 0.5
    hook.after_step(state)
    for i, idx in hook.cut.items():
        g0, b0 = hook.start[i]
        for m in (model, ema.module):
            bn = m.layers[i].bn
            assert (bn.weight[idx].abs() <= 0.5 * g0 + 1e-7).all() and (bn.bias[idx].abs() <= 0.5 * b0 + 1e-7).all()
        keep = torch.ones(len(untouched[i]), dtype=torch.bool)
        keep[idx] = False
        assert torch.equal(model.layers[i].bn.weight[keep], untouched[i][keep])


def test_bad_fade_options_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(PruneError, match="--method layer removes layers"):
        FadeConfig(PruneConfig(method="layer", shortcuts=1))
    with pytest.raises(PruneError, match="needs a latency table"):
        FadeConfig(PruneConfig(method="slim", target=Target("latency", ratio=0.5)))
    with pytest.raises(PruneError, match="--fade-end"):
        FadeConfig(end=0.0)
    base = dict(cfg=DEMO_CFG, weights=None, data=tmp_path, out=tmp_path / "o")
    with pytest.raises(PruneError, match=r"--percent plans a fade: add --sparsity fade"):
        SparseTrainJob(**base, percent=0.3)
    with pytest.raises(PruneError, match="--t_cfg and --t_weights go together"):
        SparseTrainJob(**base, t_cfg=DEMO_CFG)
    with pytest.raises(PruneError, match="give one target"):
        SparseTrainJob(**base, sparsity="fade", target_flops=0.5, target_params=0.5)
    with pytest.raises(PruneError, match="--threshold"):
        PruneConfig(method="layer", threshold=0.0)


def _run(args: list[str]):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_cli_fade_with_teacher_resumes_exactly_and_prunes_exactly(tmp_path: Path, monkeypatch) -> None:
    """sparse-train --sparsity fade with a teacher, killed after epoch 1 and resumed: the same bytes as the
    uninterrupted run; then `prune --threshold 0` cuts the plan and the report says the cut is exact."""
    from compress.data.synth import synthesize
    from compress.train import loop
    data = synthesize(tmp_path / "data", n_train=8, n_valid=2, img_size=64)
    teacher = tmp_path / "t.weights"
    compress.save(randomize_bn(compress.load(DEMO_CFG)), tmp_path / "t.cfg", teacher)
    full, killed = tmp_path / "full", tmp_path / "killed"
    save = loop._Trainer._save_epoch

    def save_and_snapshot(self, done: int, row: dict) -> None:
        save(self, done, row)
        if done == 1:
            shutil.copytree(self.out, killed)
    monkeypatch.setattr(loop._Trainer, "_save_epoch", save_and_snapshot)
    args = ["sparse-train", "--cfg", str(tmp_path / "t.cfg"), "--weights", str(teacher), "--data", str(data),
            "--sparsity", "fade", "--percent", "0.4", "--round-to", "4", "--fade-end", "0.5", "--epochs", "3",
            "--t_cfg", str(tmp_path / "t.cfg"), "--t_weights", str(teacher), "--batch-size", "4", "--img-size", "64",
            "--workers", "0", "--optimizer", "adam", "--lr0", "0.001", "--no-progress"]
    res = _run(args + ["--out", str(full)])
    assert res.exit_code == 0, res.output
    monkeypatch.setattr(loop._Trainer, "_save_epoch", save)
    res = _run(args + ["--out", str(killed), "--resume"])
    assert res.exit_code == 0, res.output
    a, b = (json.loads((d / "report.json").read_text()) for d in (full, killed))
    assert (full / "t-sparse.weights").read_bytes() == (killed / "t-sparse.weights").read_bytes()
    assert a["gamma_history"] == b["gamma_history"] and (full / PLAN_FILE).is_file()
    assert a["sparsity"] == "fade" and a["kd"] == 4 and a["prune_matches_plan"] and a["prune_max_abs_diff"] < 1e-4
    assert a["gamma_history"][-1]["planned_at_zero"] == 1.0 and a["fade"]["planned_channels"] > 0
    assert a["prune_with"] == "prune --method slim --threshold 0 --round-to 4"
    res = _run(["prune", "--cfg", a["cfg"], "--weights", a["weights"], "--out", str(tmp_path / "p"), "--method", "slim",
                "--threshold", "0", "--round-to", "4", "--img-size", "64"])
    assert res.exit_code == 0, res.output
    pruned = json.loads((tmp_path / "p" / "report.json").read_text())
    assert pruned["gflops_after"] == pytest.approx(a["gflops"] * a["gflops_ratio_after_prune"], rel=1e-3)
    cut = sum(c["before"] - c["after"] for c in pruned["channels"])
    assert cut == a["fade"]["planned_channels"]


def test_given_scores_rank_the_plan_as_slim_ranks_gammas() -> None:
    """plan_mask(scores=...) with --percent: the same cut slim makes when those scores are the gammas."""
    from compress.darknet.summary import bn_gammas
    from compress.prune.api import plan_mask
    from compress.prune.coupling import build_coupling, prunable_layers
    model = randomize_bn(tiny3_model())
    layers = prunable_layers(build_coupling(model.graph), 1)
    config = PruneConfig(method="l1", percent=0.4, round_to=1)
    given, _ = plan_mask(model, config, scores=bn_gammas(model, layers))
    slim, _ = plan_mask(model, PruneConfig(method="slim", percent=0.4, round_to=1))
    assert set(given) == set(slim) and all(torch.equal(given[i], slim[i]) for i in slim)
    reversed_, _ = plan_mask(model, config, scores={i: -g for i, g in bn_gammas(model, layers).items()})
    assert any(not torch.equal(reversed_[i], slim[i]) for i in slim)  # the scores, not the method, decide


def test_fade_plan_keeps_the_layer_floor_on_yolov4_tiny(assets: Path, tmp_path: Path) -> None:
    """`sparse-train --sparsity fade --target-flops 0.5` (no --layer-keep: a target's default floor, 0.5): the
    planned cut reaches the target and keeps at least half of every layer; `--layer-keep 0.01` given explicitly
    still wins (l1's FLOPs plan then cuts some 64- and 256-wide layers to 8, which the pretrained model does not
    heal from)."""
    from compress.prune.api import plan_mask
    w = assets / "weights"
    job = SparseTrainJob(cfg=w / "yolov4-tiny.cfg", weights=w / "yolov4-tiny.weights", data=tmp_path, out=tmp_path,
                         sparsity="fade", method="l1", target_flops=0.5)
    plan = job.sparsity_config().plan
    assert plan.layer_keep is None and plan.keep_floor == LAYER_KEEP.target == 0.5
    assert job.sparsity_config().to_dict()["fade"]["layer_keep"] == 0.5  # reported: the floor in effect
    explicit = replace(job, layer_keep=LAYER_KEEP.percent).sparsity_config()
    assert explicit.plan.keep_floor == 0.01 and explicit.to_dict()["fade"]["layer_keep"] == 0.01
    model = compress.load(job.cfg, job.weights)
    floored, _ = plan_mask(model, plan)
    bare, _ = plan_mask(model, explicit.plan)
    assert all(int(m.sum()) >= len(m) // 2 for m in floored.values())
    assert any(int(m.sum()) < len(m) // 4 for m in bare.values())  # the explicit 0.01 floor lets l1 crush a layer
    for mask in (floored, bare):
        ratio = summarize(apply_channel_mask(model, mask), (416, 416)).gflops / summarize(model, (416, 416)).gflops
        assert 0.45 < ratio <= 0.5
