"""The surgery core: keep-size model (pruned channels' gamma AND beta zeroed) == compact model, on every shared
cfg with [shortcut]/[route]/[maxpool]; compensation exact on 1x1 consumers and interior-exact for 3x3."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from compress.darknet.cfg import format_cfg, parse_cfg, read_cfg
from compress.base.errors import PruneError
from compress.darknet.model import build_model
from compress.prune import PruneConfig, select_mask
from compress.prune.surgery import apply_channel_mask

from conftest import ASSETS, TINY_CFGS, randomize_bn


def _keep_size(model, mask, zero_beta: bool = True):
    ks = copy.deepcopy(model)
    with torch.no_grad():
        for i, keep in mask.items():
            ks.layers[i].bn.weight[~keep] = 0
            if zero_beta:
                ks.layers[i].bn.bias[~keep] = 0
    return ks


def _heads(model, x):
    with torch.no_grad():
        return model.eval()(x, raw=True)


def _check_exact(cfg_path: Path, method: str, percent: float, size: int, mask=None, modes=(False, True)) -> None:
    model = randomize_bn(build_model(read_cfg(cfg_path))).eval()
    if mask is None:
        mask, _ = select_mask(model, PruneConfig(method=method, percent=percent, min_keep=0.05))
    assert mask, "the method pruned nothing"
    ks = _keep_size(model, mask)
    x = torch.rand(1, 3, size, size)
    ref = _heads(ks, x)
    for compensate in modes:
        small = apply_channel_mask(ks, mask, compensate)
        assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
        for a, b in zip(_heads(small, x), ref):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
        again = build_model(parse_cfg(format_cfg(small.cfg)))  # the new cfg re-parses and builds
        assert [p.shape for p in again.parameters()] == [p.shape for p in small.parameters()]


@pytest.mark.parametrize("method", ["slim", "normal", "shortcut"])
@pytest.mark.parametrize("name", ["tiny-shortcut", "tiny-v4-groups"])
def test_keep_size_equals_compact_tiny(name: str, method: str) -> None:
    _check_exact(TINY_CFGS[0].parent / f"{name}.cfg", method, 0.4, 64)


def test_attention_cfg_prunes_through_the_depthwise_conv_and_spp_feeder_exactly() -> None:
    """tiny-attn: conv 0 feeds a depthwise conv (1), so slim cuts both together; every other BN conv feeds
    [eca], [sam] or SPP (reference rule 4). A hand mask on the SPP feeder (layer 9) is still exact."""
    cfg = TINY_CFGS[0].parent / "tiny-attn.cfg"
    model = build_model(read_cfg(cfg))
    mask, _ = select_mask(model, PruneConfig(method="slim", percent=0.3, min_keep=0.05, round_to=1))
    assert set(mask) == {0, 1} and torch.equal(mask[0], mask[1])
    with pytest.raises(PruneError, match="no prunable layer"):
        select_mask(model, PruneConfig(method="normal"))
    keep = torch.arange(8) % 3 != 1
    _check_exact(cfg, "slim", 0.0, 64, mask={0: keep, 1: keep})
    _check_exact(cfg, "slim", 0.0, 64, mask={9: torch.arange(16) % 4 != 1})


@pytest.mark.parametrize("method", ["slim", "normal", "shortcut"])
@pytest.mark.parametrize("name", ["yolov3-tiny", "yolov4-tiny", "yolo-fastest-1.1"])
def test_keep_size_equals_compact_official(assets: Path, name: str, method: str) -> None:
    _check_exact(assets / "weights" / f"{name}.cfg", method, 0.5, 96)


@pytest.mark.parametrize("name, method", [("yolov3", "slim"), ("yolov3-spp", "shortcut"), ("yolov4", "slim"),
                                          ("yolov4", "normal")])
def test_keep_size_equals_compact_big(assets: Path, name: str, method: str) -> None:
    _check_exact(assets / "cfg" / f"{name}.cfg", method, 0.5, 64, modes=(True,))


def test_all_true_mask_is_identity_and_input_untouched() -> None:
    model = randomize_bn(build_model(read_cfg(TINY_CFGS[1]))).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mask = {i: torch.ones(model.graph.channels[i], dtype=torch.bool) for i in (0, 2)}
    same = apply_channel_mask(model, mask)
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(same.eval()(x), model(x))
    pruned = apply_channel_mask(model, {0: torch.arange(8) % 2 == 0})
    assert pruned.graph.channels[0] == 4 and model.graph.channels[0] == 8
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


# conv0 3x3 -> conv1 1x1 (pruned) -> conv2 kxk -> shortcut(0+2) -> route(3, 1) -> upsample -> maxpool -> head
_COMP_CFG = """[net]
width=32
height=32
channels=3
[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=leaky
[convolutional]
batch_normalize=1
filters=8
size=1
stride=1
pad=1
activation=mish
[convolutional]
batch_normalize=1
filters=16
size={k}
stride=1
pad=1
activation=leaky
[shortcut]
from=-3
activation=linear
[route]
layers=-1,-3
[upsample]
stride=2
[maxpool]
size=2
stride=1
[convolutional]
filters=14
size=1
stride=1
pad=1
activation=linear
[yolo]
mask=0,1
anchors=4,5, 8,10
classes=2
num=2
"""


@pytest.mark.parametrize("k", [1, 3])
def test_compensation_folds_beta_constant(k: int) -> None:
    """gamma zeroed, beta kept: with compensation the compact model equals the keep-size model (everywhere for
    1x1 consumers, away from the zero-padded border for 3x3); without it, it does not."""
    model = randomize_bn(build_model(parse_cfg(_COMP_CFG.format(k=k)))).eval()
    with torch.no_grad():
        for i in (0, 1, 2):
            model.layers[i].bn.bias.mul_(20)  # large constants make the check sharp
    coupled = torch.arange(16) % 3 != 0
    mask = {0: coupled, 2: coupled.clone(), 1: torch.arange(8) < 5}
    ks = _keep_size(model, mask, zero_beta=False)
    x = torch.rand(1, 3, 32, 32)
    ref = _heads(ks, x)[0]
    got = _heads(apply_channel_mask(ks, mask, compensate=True), x)[0]
    plain = _heads(apply_channel_mask(ks, mask, compensate=False), x)[0]
    inner = (slice(None),) * 2 + ((slice(None),) * 2 if k == 1 else (slice(4, -4), slice(4, -4)))
    torch.testing.assert_close(got[inner], ref[inner], atol=1e-4, rtol=1e-5)
    assert (plain - ref).abs().max() > 1e-2
    if k == 3:
        assert (got - ref).abs().max() > 1e-4  # border taps saw zero padding: documented approximation


def test_invalid_masks_raise() -> None:
    model = build_model(read_cfg(TINY_CFGS[1]))  # tiny-shortcut: 1, 3, 6 coupled; 18 is a head
    with pytest.raises(PruneError, match="coupled"):
        apply_channel_mask(model, {1: torch.arange(16) < 8})
    with pytest.raises(PruneError, match="keeps no channel"):
        apply_channel_mask(model, {0: torch.zeros(8, dtype=torch.bool)})
    with pytest.raises(PruneError, match="cannot lose channels"):
        apply_channel_mask(model, {18: torch.arange(21) < 5})
