"""QAT through `compress.train.fit`: fake-quant model trains, observers move, BN freezes, export still exact."""
from __future__ import annotations

import pytest
import torch

from compress.darknet.cfg import read_cfg
from compress.darknet.model import build_model
from compress.quant import ActQuant, DorefaConfig, QConvBNAct, prepare_qat, to_darknet
from compress.quant.pipeline import QATHook
from compress.quant.qat import act_drop_at
from compress.data.synth import synthesize

from conftest import DEMO_CFG, randomize_bn

import compress.train as train


def test_one_qat_epoch_updates_weights_observers_and_freezes_bn(tmp_path):
    data = synthesize(tmp_path / "synth", n_train=8, n_valid=4, img_size=64)
    from compress.data.dataset import load_data_spec
    model = randomize_bn(build_model(read_cfg(DEMO_CFG)))
    q = prepare_qat(model, DorefaConfig(w_bits=4, a_bits=8))
    before = {k: v.clone() for k, v in q.state_dict().items()}
    cfg = train.TrainConfig(epochs=1, batch_size=4, img_size=64, lr0=1e-3, optimizer="adam", warmup_epochs=0.0,
                            ema=False, workers=0, progress=False, augment=False)
    result = train.fit(q, load_data_spec(data), cfg, hooks=[QATHook(freeze_bn_after=1, freeze_observers_after=1)])
    assert result.final_loss is not None and result.final_loss == result.final_loss  # finite, not NaN
    after = q.state_dict()
    conv = next(i for i, m in enumerate(q.layers) if isinstance(m, QConvBNAct) and m.spec.w_scheme == "dorefa")
    assert not torch.equal(before[f"layers.{conv}.conv.weight"], after[f"layers.{conv}.conv.weight"])
    observers = [m for m in q.modules() if isinstance(m, ActQuant) and not m.fixed]
    assert all(bool(m.initialized) for m in observers)  # every observer saw training batches
    assert all(bool(m.bn_frozen) for m in q.modules() if isinstance(m, QConvBNAct))  # the hook froze BN
    assert not any(bool(m.observing) for m in observers)  # ... and the observers
    q.eval()
    dk = to_darknet(q)
    for i, m in enumerate(q.layers):
        if isinstance(m, QConvBNAct):
            torch.testing.assert_close(dk.layers[i].conv.weight, m.folded().weight)


def test_act_drop_skips_fake_quant_on_that_share_in_training_only():
    q = ActQuant(4, symmetric=False)
    x = torch.randn(20000)
    q.train()
    q(x)  # initialise the range
    q.drop = 0.5
    torch.manual_seed(0)
    y = q(x)
    assert abs((y == x).float().mean().item() - 0.5) < 0.02  # at 4 bits almost no element is on the grid
    q.drop = 0.0
    assert (q(x) == x).float().mean().item() < 0.01
    q.drop = 0.5
    q.eval()
    assert (q(x) == x).float().mean().item() < 0.01  # evaluation/export: every element quantized


def _spy_act_drop(monkeypatch) -> list:
    """Records every observer's QDrop share at each QAT training step, then ("done", shares) once QAT returned
    (what calibration, evaluation and export then run with)."""
    import compress.quant.pipeline as pipeline
    seen: list = []
    real_fit, real_run_qat = train.fit, pipeline.run_qat

    def drops(model) -> set:
        return {m.drop for m in model.modules() if isinstance(m, ActQuant)}

    class Spy(train.Hook):
        def after_step(self, state) -> None:
            seen.append((state.epoch, drops(state.model)))

    def run_qat(qmodel, *a, **k):
        figures = real_run_qat(qmodel, *a, **k)
        seen.append(("done", drops(qmodel)))
        return figures
    monkeypatch.setattr("compress.quant.qat.fit", lambda *a, hooks=(), **k: real_fit(*a, hooks=[*hooks, Spy()], **k))
    monkeypatch.setattr(pipeline, "run_qat", run_qat)
    return seen


def test_quantize_act_drop_is_on_during_qat_only(tmp_path, monkeypatch):
    """`--act-drop` reaches every observer while `fit` trains and is off again for evaluation and export."""
    from compress.jobs import QuantizeJob
    data = synthesize(tmp_path / "synth", n_train=8, n_valid=4, img_size=64)
    seen = _spy_act_drop(monkeypatch)
    job = QuantizeJob.from_dict({"cfg": str(DEMO_CFG), "weights": None, "data": str(data), "out": str(tmp_path / "q"),
                                 "bits": 4, "epochs": 1, "batch_size": 4, "img_size": 64, "act_drop": 0.25,
                                 "no_eval": True})
    figures = job.run()
    assert seen[-1] == ("done", {0.0}) and seen[:-1] and all(drops == {0.25} for _, drops in seen[:-1])
    assert figures["qat_act_drop"] == 0.25
    with pytest.raises(Exception, match="--act-drop 1.0 must be in"):
        QuantizeJob(str(DEMO_CFG), None, str(data), str(tmp_path / "q2"), bits=4, act_drop=1.0)


def test_act_drop_at_is_off_before_after_epochs():
    assert [act_drop_at(e, 0.5, 2) for e in range(4)] == [0.0, 0.0, 0.5, 0.5]
    assert [act_drop_at(e, 0.5, 0) for e in range(2)] == [0.5, 0.5]


def test_act_drop_after_reaches_each_epoch_and_qat_drops_nothing_by_default(tmp_path, monkeypatch):
    """--act-drop 0.5 --act-drop-after 1: epoch 1 fully quantized, epoch 2 with QDrop. Without --act-drop
    (pow2 too) QAT never drops: measured on yolov4-tiny W4A8-pow2 @320, QDrop lost 1.5 points (README)."""
    from compress.jobs import QuantizeJob
    data = synthesize(tmp_path / "synth", n_train=8, n_valid=4, img_size=64)
    seen = _spy_act_drop(monkeypatch)
    common = {"cfg": str(DEMO_CFG), "weights": None, "data": str(data), "bits": 4, "epochs": 2, "batch_size": 8,
              "img_size": 64, "no_eval": True, "pow2": True}
    figures = QuantizeJob.from_dict({**common, "out": str(tmp_path / "d"), "act_drop": 0.5,
                                     "act_drop_after": 1}).run()
    assert seen == [(0, {0.0}), (1, {0.5}), ("done", {0.0})]
    assert (figures["qat_act_drop"], figures["qat_act_drop_after"]) == (0.5, 1)
    seen.clear()
    figures = QuantizeJob.from_dict({**common, "out": str(tmp_path / "p")}).run()
    assert seen == [(0, {0.0}), (1, {0.0}), ("done", {0.0})] and figures["qat_act_drop"] == 0.0
