"""Pruning stays exact through non-linear joins, checked by OpenCV's independent Darknet reader.

Channels with gamma = 0 and beta != 0 emit the constant act(beta). Where they reach a [shortcut] with
activation=leaky/mish/logistic, the join outputs act(a + b) of those constants, not a + b: surgery must carry that
through the activation (before the fix OpenCV's head outputs moved by ~0.08 on these cfgs). Layer removal across a
non-linear shortcut is refused. The original pair and the pruned pair both run in OpenCV, never in our forward.
The consumers of the cut channels here are 1x1 convs, where compensation is exact (a kxk consumer is exact only
away from the zero-padded border: tests/test_prune_surgery.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import compress
from compress.base.errors import PruneError
from compress.darknet.cfg import parse_cfg
from compress.darknet.model import build_model
from compress.prune import PruneConfig, prune
from compress.prune.blocks import remove_units
from compress.prune.coupling import build_coupling
from compress.prune.surgery import apply_channel_mask

from conftest import randomize_bn

import cv2
if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromDarknet"):
    pytest.skip("this OpenCV has no readNetFromDarknet (use opencv-python-headless<5)", allow_module_level=True)


def _conv(filters: int, size: int, act: str, stride: int = 1, bn: int = 1) -> str:
    return (f"[convolutional]\nbatch_normalize={bn}\nfilters={filters}\nsize={size}\nstride={stride}\npad=1\n"
            f"activation={act}\n")


def _shortcut(act: str, extra: str = "") -> str:
    return f"[shortcut]\nfrom=-3\nactivation={act}\n{extra}"


def _cfg(act: str, conv_act: str = "leaky", second: str | None = None, extra: str = "") -> str:
    """0 conv3x3/2 | 1-3 unit (1x1, 3x3, shortcut act) | 4-6 unit (shortcut `second`) | 7 maxpool | 8 conv1x1 |
    9 head conv | 10 [yolo]. Convs 0, 2, 5 are tied by the shortcuts; their consumers 1, 4, 8 are 1x1."""
    unit = _conv(8, 1, conv_act) + _conv(16, 3, conv_act)
    return ("[net]\nwidth=64\nheight=64\nchannels=3\n" + _conv(16, 3, conv_act, stride=2)
            + unit + _shortcut(act, extra) + unit + _shortcut(second or act, extra)
            + "[maxpool]\nsize=2\nstride=2\n" + _conv(32, 1, conv_act) + _conv(21, 1, "linear", bn=0)
            + "[yolo]\nmask=0,1,2\nanchors=4,5, 8,10, 12,9\nclasses=2\nnum=3\n")


TIED, HEAD_CONV = (0, 2, 5), 9


def _model(text: str, zero: dict[int, torch.Tensor]):
    """A random model whose channels `zero[i]` have gamma = 0 and a large beta (their constant act(beta))."""
    torch.manual_seed(0)
    model = randomize_bn(build_model(parse_cfg(text))).eval()
    with torch.no_grad():
        for i, cut in zero.items():
            model.layers[i].bn.weight[cut] = 0
            model.layers[i].bn.bias[cut] = torch.linspace(-3, 3, int(cut.sum()))  # both signs: leaky's two slopes
    return model


def _save(model, folder: Path, name: str) -> tuple[Path, Path]:
    cfg, weights = folder / f"{name}.cfg", folder / f"{name}.weights"
    compress.save(model, cfg, weights)
    return cfg, weights


def _opencv_head(pair: tuple[Path, Path], head_conv: int) -> np.ndarray:
    """OpenCV's output of the head conv (raw maps, no thresholding) on a fixed random image."""
    blob = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    net = cv2.dnn.readNetFromDarknet(str(pair[0]), str(pair[1]))
    net.setInput(blob)
    return net.forward(f"conv_{head_conv}")


def _cut_mask() -> torch.Tensor:
    return torch.arange(16) % 3 == 0  # 6 of 16 channels of the tied group


@pytest.mark.parametrize("act, conv_act", [("leaky", "leaky"), ("mish", "mish"), ("logistic", "leaky"),
                                           ("linear", "leaky")])
def test_channels_through_a_nonlinear_shortcut_match_opencv(tmp_path: Path, act: str, conv_act: str) -> None:
    cut = _cut_mask()
    zero = {i: cut for i in TIED} | {8: torch.arange(32) < 10}
    model = _model(_cfg(act, conv_act), zero)
    mask = {i: ~z for i, z in zero.items()}
    small = apply_channel_mask(model, mask, compensate=True)
    assert [small.graph.channels[i] for i in (0, 3, 6, 8)] == [10, 10, 10, 22]
    before = _opencv_head(_save(model, tmp_path, "a"), HEAD_CONV)
    after = _opencv_head(_save(small, tmp_path, "b"), HEAD_CONV)
    scale = float(np.abs(before).max())
    assert np.abs(after - before).max() < 1e-5 * max(1.0, scale), act
    plain = _opencv_head(_save(apply_channel_mask(model, mask, compensate=False), tmp_path, "c"), HEAD_CONV)
    assert np.abs(plain - before).max() > 1e-2  # the constants matter: the check can fail


def test_prune_method_on_a_mish_shortcut_cfg_matches_opencv(tmp_path: Path) -> None:
    """The public `prune` (slim, global threshold) picks the gamma = 0 channels first; the pair stays exact."""
    model = _model(_cfg("mish", "mish"), {i: _cut_mask() for i in TIED})
    result = prune(model, PruneConfig(method="slim", percent=6 * 3 / 120, min_keep=0.05, round_to=1))
    assert {i: int((~m).sum()) for i, m in result.mask.items() if not m.all()} == {0: 6, 2: 6, 5: 6}
    before = _opencv_head(_save(model, tmp_path, "a"), HEAD_CONV)
    after = _opencv_head(_save(result.model, tmp_path, "b"), HEAD_CONV)
    assert np.abs(after - before).max() < 1e-5 * max(1.0, float(np.abs(before).max()))


def test_weighted_shortcut_keeps_its_inputs_whole() -> None:
    """A weighted [shortcut] (weights sized by the channels, then its activation): its inputs are never cut."""
    text = _cfg("leaky", extra="weights_type=per_feature\nweights_normalization=relu\n")
    coupling = build_coupling(build_model(parse_cfg(text)).graph)
    assert set(TIED) <= coupling.fixed
    model = _model(text, {i: _cut_mask() for i in TIED})
    with pytest.raises(PruneError):
        apply_channel_mask(model, {i: ~_cut_mask() for i in TIED})


def test_layer_removal_across_a_nonlinear_shortcut_is_refused() -> None:
    model = _model(_cfg("leaky"), {})
    with pytest.raises(PruneError, match=r"layer 3 \(\[shortcut\] activation=leaky.*not a plain linear add"):
        remove_units(model, {3})
    with pytest.raises(PruneError, match="removable residual blocks"):
        prune(model, PruneConfig(method="layer", shortcuts=1))


def test_layer_removal_before_a_nonlinear_shortcut_is_refused() -> None:
    """Removing a linear unit leaves its constant riding on the identity path; a leaky shortcut downstream would
    need act(x + c), which no folding gives: refused, naming that shortcut."""
    model = _model(_cfg("linear", second="leaky"), {2: torch.ones(16, dtype=torch.bool)})
    with pytest.raises(PruneError, match=r"activation=leaky follows the addition"):
        remove_units(model, {3})


@pytest.mark.parametrize("unit", [3, 6])
def test_layer_removal_with_beta_matches_opencv(tmp_path: Path, unit: int) -> None:
    """A whole residual branch with gamma = 0, beta != 0 (a constant) is removed exactly: its constant rides the
    linear identity path (through the next linear shortcut and the maxpool for unit 3) into 1x1 convs."""
    model = _model(_cfg("linear"), {unit - 1: torch.ones(16, dtype=torch.bool)})
    small, dropped = remove_units(model, {unit})
    assert dropped == {unit - 2, unit - 1, unit}
    before = _opencv_head(_save(model, tmp_path, "a"), HEAD_CONV)
    after = _opencv_head(_save(small, tmp_path, "b"), HEAD_CONV - 3)
    assert np.abs(after - before).max() < 1e-5 * max(1.0, float(np.abs(before).max()))
    plain, _ = remove_units(model, {unit}, compensate=False)
    assert np.abs(_opencv_head(_save(plain, tmp_path, "c"), HEAD_CONV - 3) - before).max() > 1e-2
