"""BN folding: exact in eval mode; QAT folding (Jacob et al.) equals BN in training; grid-exact Darknet output."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.darknet.cfg import read_cfg
from compress.darknet.model import build_model
from compress.quant import (GoogleConfig, DorefaConfig, QConvBNAct, calibrate, fold_bn, fold_model, prepare_qat,
                            to_darknet)
from compress.quant.config import LayerQuant
from compress.quant.fake_quant import QParams
from compress.quant.weights import WEIGHT_QUANTIZERS, WeightQ, register_weight_quantizer
from compress.darknet.layers import ConvBNAct
from compress.darknet.cfg import Block
from conftest import randomize_bn


@pytest.fixture(autouse=True)
def _identity_quantizer():
    @register_weight_quantizer("identity-test")
    def identity(w, bits, per_channel, pow2, rounding, **_):
        one = torch.ones(w.shape[0])
        return WeightQ(w, w.detach(), QParams(one, torch.zeros_like(one), -1, 1, 0))
    yield
    WEIGHT_QUANTIZERS.pop("identity-test")


def _conv_bn(c_in: int = 3, c_out: int = 6, act: str = "leaky") -> ConvBNAct:
    block = Block("convolutional", (("batch_normalize", "1"), ("filters", str(c_out)), ("size", "3"),
                                    ("stride", "1"), ("pad", "1"), ("activation", act)), 1, "test")
    layer = ConvBNAct(block, c_in)
    randomize_bn(layer)
    return layer


def _spec(scheme: str = "symmetric", bn_fold: bool = True, a_bits=None) -> LayerQuant:
    return LayerQuant(scheme, 8, a_bits, None, True, False, "ceil", 0.1, bn_fold)


def test_fold_bn_is_exact_in_eval():
    layer = _conv_bn().eval()
    x = torch.randn(2, 3, 16, 16)
    folded = fold_bn(layer.conv, layer.bn)
    torch.testing.assert_close(folded(x), layer.bn(layer.conv(x)), atol=1e-5, rtol=1e-5)
    assert layer.conv.bias is None  # pure: the input conv is untouched


def test_fold_model_matches_on_tiny_cfgs(tiny_cfg):
    model = randomize_bn(build_model(read_cfg(tiny_cfg))).eval()
    folded = fold_model(model)
    assert all(b.get_int("batch_normalize", 0) == 0 for b in folded.cfg.blocks if b.type == "convolutional")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-5)


def test_qat_fold_in_training_equals_batchnorm_with_batch_stats():
    """With an identity weight quantizer, Jacob's folded training step is exactly conv -> BN(train)."""
    ref = _conv_bn()
    q = QConvBNAct(_conv_bn(), _spec("identity-test"))
    q.load_state_dict({**ref.state_dict(), "bn_frozen": torch.tensor(False)})
    x = torch.randn(4, 3, 12, 12)
    ref.train(), q.train()
    torch.testing.assert_close(q(x), ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.bn.running_mean, ref.bn.running_mean)
    torch.testing.assert_close(q.bn.running_var, ref.bn.running_var)
    q.eval(), ref.eval()
    torch.testing.assert_close(q(x), ref(x), atol=1e-5, rtol=1e-5)


def test_freeze_bn_uses_running_stats_in_training():
    q = QConvBNAct(_conv_bn(), _spec("identity-test"))
    q.freeze_bn()
    q.train()
    x = torch.randn(4, 3, 12, 12)
    before = q.bn.running_mean.clone()
    y_train = q(x)
    torch.testing.assert_close(q.bn.running_mean, before)  # frozen: no update
    q.eval()
    torch.testing.assert_close(y_train, q(x))


@pytest.mark.parametrize("bn_fold", [True, False])
def test_eval_weights_are_on_grid_and_match_folded_export(bn_fold):
    q = QConvBNAct(_conv_bn(act="linear"), _spec(bn_fold=bn_fold)).eval()
    f = q.folded()
    assert f.codes.abs().max() <= 127
    conv = nn.Conv2d(3, 6, 3, 1, 1)
    conv.weight.data, conv.bias.data = f.weight, f.bias
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), q(x), atol=1e-5, rtol=1e-5)
    ratio = f.weight / f.w_qp.scale.view(-1, 1, 1, 1)
    torch.testing.assert_close(ratio, ratio.round(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("config", [GoogleConfig(), DorefaConfig(w_bits=4), GoogleConfig(pow2=True)],
                         ids=["google", "dorefa4", "google-pow2"])
def test_to_darknet_equals_weight_only_fake_quant(tiny_cfg, config):
    """The written Darknet pair == the fake-quant model with activation quantizers off (weights on the grid)."""
    model = randomize_bn(build_model(read_cfg(tiny_cfg))).eval()
    q = prepare_qat(model, config)
    calibrate(q, [torch.rand(2, 3, 64, 64)])
    dk = to_darknet(q)
    for m in q.modules():
        if hasattr(m, "initialized") and not getattr(m, "fixed", False):
            m.initialized.fill_(False)  # uninitialised observers pass through
        if hasattr(m, "fixed") and m.fixed:
            m.initialized.fill_(False)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dk(x), q(x), atol=1e-4, rtol=1e-5)
    for i, layer in enumerate(q.layers):
        if isinstance(layer, QConvBNAct):
            f = layer.folded()
            torch.testing.assert_close(dk.layers[i].conv.weight, f.weight)
            levels = dk.layers[i].conv.weight.unique().numel()
            assert levels <= 2 ** layer.spec.w_bits * (f.w_qp.scale.numel())


def test_prepare_does_not_touch_input_and_applies_edge_policy(tiny_cfg):
    model = randomize_bn(build_model(read_cfg(tiny_cfg))).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    q = prepare_qat(model, DorefaConfig(w_bits=3, a_bits=4))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, QConvBNAct) for m in model.modules())
    qconvs = {i: m for i, m in enumerate(q.layers) if isinstance(m, QConvBNAct)}
    first = min(qconvs)
    heads = {p for h in model.graph.heads for p in model.graph.inputs[h]}
    assert qconvs[first].spec.w_bits == 8 and qconvs[first].spec.w_scheme == "symmetric"
    assert all(qconvs[h].spec.w_bits == 8 and qconvs[h].act_quant is None for h in heads)
    inner = [m for i, m in qconvs.items() if i != first and i not in heads]
    assert inner and all(m.spec.w_scheme == "dorefa" and m.spec.w_bits == 3 and m.act_quant.bits == 4 for m in inner)
