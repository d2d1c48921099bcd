"""fit(): loss goes down, hook order and cadence, decay groups, resume equivalence, outputs, CLI."""
from __future__ import annotations

import json
import time
import math

import pytest
import torch
from click.testing import CliRunner

from compress import CompressError, build_model, load, parse_cfg
from compress.cli import cli
from compress.data.dataset import load_data_spec
from compress.data.synth import synthesize
from compress.train import Hook, TrainConfig, fit
from compress.train.optim import build_optimizer
from conftest import TINY3_CFG_TEXT, tiny3_model

CFG_TEXT = TINY3_CFG_TEXT
tiny_model = tiny3_model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("synth"), n_train=16, n_valid=4, img_size=64, seed=1)


def quick(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=8, img_size=64, workers=0, progress=False, warmup_epochs=0, eval_every=100)
    return TrainConfig(**{**base, **kw})


class Recorder(Hook):
    def __init__(self):
        self.calls, self.grad_ok = [], []

    def on_fit_start(self, state):
        self.calls.append("start")

    def extra_loss(self, state, imgs, targets, heads):
        self.calls.append("loss")
        return {"l2": 1e-4 * sum((h.float() ** 2).mean() for h in heads)}

    def after_backward(self, state):
        self.calls.append("step")
        self.grad_ok.append(all(p.grad is not None and torch.isfinite(p.grad).all()
                                for p in state.model.parameters()))

    def on_epoch_end(self, state, metrics):
        self.calls.append("epoch")
        metrics["recorded"] = len(self.calls)

    def on_fit_end(self, state):
        self.calls.append("end")


def test_loss_decreases_on_fixed_data(data):
    result = fit(tiny_model(), load_data_spec(data), quick(epochs=5, augment=False, ema=False, lr0=0.02))
    totals = [r["total"] for r in result.history]
    assert all(torch.isfinite(torch.tensor(totals)))
    assert all(b < a for a, b in zip(totals, totals[1:])) and totals[-1] < 0.9 * totals[0], totals


def test_hook_order_and_one_after_backward_per_optimizer_step(data):
    hook = Recorder()
    result = fit(tiny_model(), load_data_spec(data), quick(batch_size=4, accumulate=2), hooks=[hook])
    per_epoch = ["loss", "loss", "step", "loss", "loss", "step", "epoch"]  # 16 images / 4 = 4 micro-batches
    assert hook.calls == ["start", *per_epoch, *per_epoch, "end"]
    assert all(hook.grad_ok)
    assert [r["recorded"] for r in result.history] == [8, 15]  # hooks can add logged metrics
    assert all(r["l2"] > 0 for r in result.history)  # extra loss terms are logged by name


def test_weight_decay_only_on_conv_weights():
    model = tiny_model()
    opt = build_optimizer(model, "sgd", lr=0.1, momentum=0.0, weight_decay=0.1)
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    bn_params = [p for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()]
    biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.bias is not None]
    assert bn_params and biases and not decay & {id(p) for p in bn_params + biases}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # zero gradients: only weight decay moves anything
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == (p.ndim == 1), name


class Interrupt(Hook):
    def extra_loss(self, state, imgs, targets, heads):
        if state.epoch == 1:
            raise KeyboardInterrupt
        return {}


def test_resume_continues_exactly(data, tmp_path):
    spec, config = load_data_spec(data), quick(epochs=2, batch_size=4, warmup_epochs=1)
    straight = fit(tiny_model(), spec, config, out_dir=tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(), spec, config, hooks=[Interrupt()], out_dir=tmp_path / "b")
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=False)["epoch"] == 1
    resumed = fit(tiny_model(seed=5), spec, quick(epochs=2, batch_size=4, warmup_epochs=1, resume=True),
                  out_dir=tmp_path / "b")
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    for key in ("total", "box", "obj", "cls"):
        assert resumed.history[1][key] == pytest.approx(straight.history[1][key], abs=1e-5)
    a, b = load(None, tmp_path / "a" / "last.pt"), load(None, tmp_path / "b" / "last.pt")
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-5), name


def test_outputs_and_report_via_cli(data, tmp_path):
    cfg = tmp_path / "tiny.cfg"
    cfg.write_text(CFG_TEXT)
    out, report = tmp_path / "run", tmp_path / "copy.json"
    res = CliRunner().invoke(cli, ["train", "--cfg", str(cfg), "--data", str(data), "--out", str(out), "--epochs",
                                   "2", "--batch-size", "8", "--workers", "0", "--report", str(report)])
    assert res.exit_code == 0, res.output
    for name in ("best.cfg", "best.weights", "last.cfg", "last.weights", "last.pt", "results.csv", "results.png",
                 "report.json"):
        assert (out / name).is_file(), name
    rep = json.loads(report.read_text())
    assert rep == json.loads((out / "report.json").read_text())
    assert rep["cfg"] == str(out / "best.cfg") and rep["weights"] == str(out / "best.weights")
    assert rep["epochs"] == 2 and len(rep["history"]) == 2 and rep["final_loss"] > 0
    assert 0 <= rep["map50"] <= 1 and {"params", "gflops", "size_mb", "latency_ms", "map50_95"} <= rep.keys()
    lines = (out / "results.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,total,box,obj,cls") and len(lines) == 3
    best = load(out / "best.cfg", out / "best.weights")
    assert best.num_classes == 3


@pytest.mark.parametrize("field,value", [("epochs", 0), ("optimizer", "lion"), ("img_size", 100),
                                         ("momentum", 1.5), ("accumulate", 0)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(CompressError, match=field):
        quick(**{field: value})


def test_resume_without_checkpoint_is_a_clear_error(data, tmp_path):
    with pytest.raises(CompressError, match="nothing to resume"):
        fit(tiny_model(), load_data_spec(data), quick(resume=True), out_dir=tmp_path)


def test_hyp_file_keys_are_validated_with_file_and_key(tmp_path):
    from compress.train.hyp import load_hyp

    good = tmp_path / "hyp.yaml"
    good.write_text("lr0: 0.002\nmomentum: 0.9\nfreeze_bn_stats: true\nmosaic: 0.0\ndegrees: 0.0\niou_t: 0.2\n")
    assert load_hyp(good) == {"lr0": 0.002, "momentum": 0.9, "freeze_bn_stats": True, "mosaic": 0.0}
    cases = [("lr_zero: 0.1\n", "unknown hyp key 'lr_zero'"), ("lr0: fast\n", "hyp key lr0 must be a number"),
             ("degrees: 10\n", "degrees=10 is not supported"), ("- 1\n", "mapping"),
             ("freeze_bn_stats: 1\n", "true or false")]
    for text, match in cases:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(CompressError, match=match) as err:
            load_hyp(bad)
        assert str(bad) in str(err.value)


def test_finetune_defaults_hyp_and_typed_options_in_that_order(tmp_path):
    from compress.train.hyp import FINETUNE, resolve_train_config

    values = dict(epochs=1, lr0=0.01, warmup_epochs=3.0)
    scratch = resolve_train_config(values, set(), None, pretrained=False)
    assert (scratch.lr0, scratch.warmup_epochs, scratch.freeze_bn_stats, scratch.loss) == (0.01, 3.0, False, "v5")
    tuned = resolve_train_config(values, set(), None, pretrained=True)
    assert tuned.loss == "darknet" and tuned.lr0 == FINETUNE["darknet"]["lr0"]
    assert tuned.freeze_bn_stats == FINETUNE["darknet"]["freeze_bn_stats"]
    hyp = tmp_path / "h.yaml"
    hyp.write_text("lr0: 0.003\nwarmup_epochs: 1.5\n")
    from_hyp = resolve_train_config(values, set(), hyp, pretrained=True)
    assert (from_hyp.lr0, from_hyp.warmup_epochs) == (0.003, 1.5)
    typed = resolve_train_config(values, {"lr0"}, hyp, pretrained=True)
    assert (typed.lr0, typed.warmup_epochs) == (0.01, 1.5)
    v5 = resolve_train_config({**values, "loss": "v5"}, {"loss"}, None, pretrained=True)
    assert v5.loss == "v5" and v5.lr0 == FINETUNE["v5"]["lr0"]
    hyp.write_text("momentum: 1.5\n")
    with pytest.raises(CompressError, match=f"{hyp}: hyp key momentum"):
        resolve_train_config(values, set(), hyp, pretrained=False)


def _bn_buffers(model):
    return [b.clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)
            for b in (m.running_mean, m.running_var)]


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_bn_stats_keeps_running_statistics(data, freeze):
    model = tiny_model()
    before = _bn_buffers(model)
    fit(model, load_data_spec(data), quick(epochs=1, ema=False, freeze_bn_stats=freeze, bn_momentum=0.5))
    after = _bn_buffers(model)
    assert all(torch.equal(a, b) for a, b in zip(before, after)) == freeze
    assert all(m.momentum == 0.5 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_cli_finetune_with_darknet_loss_and_hyp(data, tmp_path):
    from compress.darknet.persist import save

    cfg = tmp_path / "tiny.cfg"
    cfg.write_text(CFG_TEXT)
    save(tiny_model(), tmp_path / "pre.cfg", tmp_path / "pre.weights")
    hyp = tmp_path / "hyp.yaml"
    hyp.write_text("momentum: 0.9\nscale: 0.2\n")
    out = tmp_path / "ft"
    res = CliRunner().invoke(cli, ["train", "--cfg", str(cfg), "--weights", str(tmp_path / "pre.weights"), "--data",
                                   str(data), "--out", str(out), "--epochs", "1", "--batch-size", "8", "--workers",
                                   "0", "--hyp", str(hyp), "--warmup-epochs", "0.5"])
    assert res.exit_code == 0, res.output
    tc = json.loads((out / "report.json").read_text())["train_config"]
    assert tc["loss"] == "darknet" and tc["freeze_bn_stats"] is True and tc["lr0"] < 0.001
    assert (tc["momentum"], tc["scale"], tc["warmup_epochs"]) == (0.9, 0.2, 0.5)
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr0: -1\n")
    res = CliRunner().invoke(cli, ["train", "--cfg", str(cfg), "--data", str(data), "--out", str(tmp_path / "x"),
                                   "--hyp", str(bad)])
    assert isinstance(res.exception, CompressError) and f"{bad}: hyp key lr0" in str(res.exception)


class InterruptAt(Hook):
    """Ctrl-C in the middle of epoch `epoch`, at its micro-batch `batch` (0-based), once."""

    def __init__(self, epoch, batch):
        self.epoch, self.batch, self.seen = epoch, batch, 0

    def extra_loss(self, state, imgs, targets, heads):
        if state.epoch == self.epoch:
            if self.seen == self.batch:
                raise KeyboardInterrupt
            self.seen += 1
        return {}


class CountSteps(Hook):
    def __init__(self):
        self.steps = 0

    def after_backward(self, state):
        self.steps += 1


@pytest.mark.parametrize("accumulate,batch", [(2, 3)])  # Ctrl-C inside an accumulation window
def test_ctrl_c_mid_epoch_resumes_exactly(data, tmp_path, accumulate, batch):
    """Same optimizer steps, same epoch losses and weights as an uninterrupted run (16 images, batches of 4)."""
    config = dict(epochs=2, batch_size=4, warmup_epochs=1, accumulate=accumulate, ema=True)
    straight = fit(tiny_model(), load_data_spec(data), quick(**config), out_dir=tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(), load_data_spec(data), quick(**config), hooks=[InterruptAt(1, batch)],
            out_dir=tmp_path / "b")
    counter = CountSteps()
    resumed = fit(tiny_model(seed=5), load_data_spec(data), quick(**config, resume=True), hooks=[counter],
                  out_dir=tmp_path / "b")
    steps = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["step"]
    assert steps == torch.load(tmp_path / "a" / "last.pt", weights_only=False)["step"] == 8 // accumulate
    assert counter.steps == (4 - batch // accumulate * accumulate) // accumulate
    for key in ("total", "box", "obj", "cls"):
        assert resumed.history[1][key] == pytest.approx(straight.history[1][key], rel=1e-5)
    a, b = load(None, tmp_path / "a" / "last.pt"), load(None, tmp_path / "b" / "last.pt")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(pa.float(), pb.float(), atol=1e-6), name


@pytest.mark.parametrize("loss", ["darknet", "v5"])
def test_new_coords_model_trains(data, loss):
    """scaled-YOLOv4 style heads (logistic conv + new_coords=1) train and the loss goes down."""
    text = CFG_TEXT.replace("filters=24\nactivation=linear", "filters=24\nactivation=logistic")
    text = text.replace("classes=3", "classes=3\nnew_coords=1\nscale_x_y=2.0")
    torch.manual_seed(0)
    model = build_model(parse_cfg(text, "tiny-newcoords.cfg"))
    assert all(h.new_coords for h in model.heads)
    result = fit(model, load_data_spec(data), quick(epochs=3, augment=False, ema=False, loss=loss, lr0=0.01,
                                                    optimizer="adam"))
    totals = [r["total"] for r in result.history]
    assert all(math.isfinite(t) for t in totals) and totals[-1] < totals[0], totals


def test_data_wait_share_measures_time_blocked_on_the_loader(data, tmp_path, monkeypatch):
    """Each epoch row reports the share of its loop spent waiting for batches: small with a fast loader,
    most of the epoch when every item takes 50 ms to load."""
    from compress.data.dataset import DetectionDataset
    spec = load_data_spec(data)
    fast = fit(tiny_model(), spec, quick(epochs=1, batch_size=4))
    real = DetectionDataset.__getitem__

    def slow(self, index):
        time.sleep(0.05)
        return real(self, index)
    monkeypatch.setattr(DetectionDataset, "__getitem__", slow)
    slowed = fit(tiny_model(), spec, quick(epochs=1, batch_size=4), out_dir=tmp_path)
    share_fast, share_slow = fast.history[0]["data_wait"], slowed.history[0]["data_wait"]
    assert 0 <= share_fast < share_slow <= 1
    assert share_slow > 0.5, share_slow
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert header[-4:] == ["data_wait", "map50", "map50_95", "time_s"]


@pytest.mark.parametrize("command, written", [("train", "last.weights"), ("sparse-train", "tiny-sparse.weights")])
def test_training_from_scratch_is_reproducible_with_its_seed(data, tmp_path, command, written):
    """`train` / `sparse-train` without --weights draw the initial weights from --seed: two runs give
    byte-identical weights (the demo's figures were not reproducible before: the init came from an unseeded
    RNG)."""
    cfg = tmp_path / "tiny.cfg"
    cfg.write_text(CFG_TEXT)
    outs = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        torch.manual_seed(int(name == "b") + 7)  # whatever the global RNG holds, --seed decides
        res = CliRunner().invoke(cli, [command, "--cfg", str(cfg), "--data", str(data), "--out", str(tmp_path / name),
                                       "--epochs", "1", "--batch-size", "8", "--workers", "0", "--seed", seed])
        assert res.exit_code == 0, res.output
        outs.append((tmp_path / name / written).read_bytes())
    assert outs[0] == outs[1] and outs[0] != outs[2]
