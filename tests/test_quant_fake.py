"""Fake-quant primitives: exact levels, zero points, pow2 rounding, observers, configs."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compress.base.errors import QuantError
from compress.quant.config import DorefaConfig, GoogleConfig, make_config
from compress.quant.fake_quant import (ActQuant, affine_qparams, fake_quant, pow2_exponent, pow2_round, round_ste,
                                       symmetric_qparams)
from compress.quant.weights import dorefa_weight, symmetric_weight


def test_round_ste_rounds_forward_and_passes_gradient():
    x = torch.tensor([0.4, 0.5, 1.5, -2.6], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 0.0, 2.0, -3.0]  # half to even, like ONNX QuantizeLinear
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("bits", range(2, 9))
def test_dorefa_weights_use_exactly_2_pow_k_levels(bits):
    # dense weights spanning [-a, a] per channel, shuffled, so every level can be hit
    w = torch.linspace(-1, 1, 4 * 4096)[torch.randperm(4 * 4096)].view(4, 1024, 2, 2)
    w = w / w.abs().flatten(1).amax(1).view(-1, 1, 1, 1) * torch.tensor([0.2, 0.5, 1.0, 30.0]).view(-1, 1, 1, 1)
    wq = dorefa_weight(w, bits, per_channel=True, pow2=False, rounding="ceil")
    n = 2 ** bits - 1
    for c in range(4):
        codes = wq.codes[c].unique()
        assert len(codes) == 2 ** bits
        assert codes.tolist() == list(range(-n, n + 1, 2))  # odd integers, 2^k of them
        assert len(wq.dequant[c].unique()) == 2 ** bits
    torch.testing.assert_close(wq.dequant, wq.codes.float() * wq.qparams.scale.view(-1, 1, 1, 1))
    # the scale is each channel's least-squares fit of the codes to w (exact formula)
    c, wf = wq.codes.flatten(1).double(), w.flatten(1).double()
    torch.testing.assert_close(wq.qparams.scale.double(), (c * wf).sum(1) / (c * c).sum(1), rtol=1e-5, atol=0)


def test_dorefa_formula_matches_paper_grid_on_normalised_weights():
    w = torch.randn(2, 8, 1, 1) * 5  # |w| > 1, as after BN folding
    k = 3
    wq = dorefa_weight(w, k, per_channel=False, pow2=False, rounding="ceil")
    t = torch.tanh(w / w.abs().max())  # normalised first: tanh's input stays in [-1, 1]
    u = t / (2 * t.abs().max()) + 0.5
    paper = 2 * torch.round((2 ** k - 1) * u) / (2 ** k - 1) - 1  # the paper's w_q in [-1, 1]
    code = paper * (2 ** k - 1)
    torch.testing.assert_close(wq.codes.double(), code.round().double())
    torch.testing.assert_close(wq.dequant, code * ((w * code).sum() / (code * code).sum()))


def _folded_like(seed: int = 0) -> torch.Tensor:
    """Conv weights with per-channel magnitudes spread over 0.05..20, as BN folding leaves them."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 32, 3, 3, generator=g)
    return w * torch.logspace(-1.3, 1.3, 16).view(-1, 1, 1, 1)


def _rel_err(w: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    return (w - wq).flatten(1).norm(dim=1) / w.flatten(1).norm(dim=1)


def test_dorefa_error_does_not_depend_on_folded_magnitudes():
    # one weight pattern at 16 magnitudes (0.05..20, what BN folding produces): tanh sees w / max|w| per
    # channel, so every channel gets the same relative error (the old tanh(w) saturated: 2-13% at 8 bits)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 32, 3, 3, generator=g).expand(16, -1, -1, -1) * torch.logspace(-1.3, 1.3, 16).view(-1, 1, 1, 1)
    for bits, bound in ((8, 0.1), (4, 0.25)):
        err = _rel_err(w, dorefa_weight(w, bits, True, False, "ceil").dequant)
        assert err.max() - err.min() < 1e-4 and err.max() < bound
    assert _rel_err(w, symmetric_weight(w, 8, True, False, "ceil").dequant).max() < 0.01


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("rounding", ["ceil", "nearest"])
def test_dorefa_pow2_requantizes_onto_the_pow2_grid(bits, rounding):
    w = _folded_like(1)
    base = dorefa_weight(w, bits, True, False, rounding)
    wq = dorefa_weight(w, bits, True, True, rounding)
    s = wq.qparams.scale
    torch.testing.assert_close(s, torch.exp2(torch.round(torch.log2(s))))  # powers of two
    n = 2 ** bits - 1
    assert wq.codes.abs().max() <= n and (wq.codes % 2 == 1).all()  # odd codes, k bits
    torch.testing.assert_close(wq.dequant, wq.codes.float() * s.view(-1, 1, 1, 1))
    # re-quantized, not rescaled: every weight moves by at most one pow2 step (+ clamp for 'nearest')
    step = s.view(-1, 1, 1, 1)
    moved = (wq.dequant - base.dequant).abs()
    if rounding == "ceil":
        assert (moved <= step + 1e-6).all()
    # magnitudes are kept: per-channel max|w_q| / max|w| stays near 1 (the old bug reached 1.91)
    ratio = wq.dequant.abs().flatten(1).amax(1) / w.abs().flatten(1).amax(1)
    assert ratio.max() < 1 + 2.0 / n + 0.02
    if bits == 8:
        assert _rel_err(w, wq.dequant).max() < 0.15  # was 0.56 before the fix


def test_dorefa_ste_gradient_flows():
    w = torch.randn(3, 4, 3, 3, requires_grad=True)
    dorefa_weight(w, 4, True, False, "ceil").dequant.sum().backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_symmetric_weight_int8_range_and_exact_codes():
    w = torch.randn(6, 3, 3, 3)
    wq = symmetric_weight(w, 8, per_channel=True, pow2=False, rounding="ceil")
    assert wq.codes.min() >= -127 and wq.codes.max() <= 127
    assert (wq.codes.abs().flatten(1).amax(1) == 127).all()  # each channel uses its full range
    s = w.abs().flatten(1).amax(1) / 127
    torch.testing.assert_close(wq.qparams.scale, s)
    torch.testing.assert_close(wq.dequant, torch.round(w / s.view(-1, 1, 1, 1)) * s.view(-1, 1, 1, 1))
    assert (wq.dequant - w).abs().max() <= s.max() / 2 + 1e-7


@given(lo=st.floats(-50, 0), span=st.floats(1e-3, 100), bits=st.integers(2, 8), pow2=st.booleans())
@settings(max_examples=200, deadline=None)
def test_affine_zero_point_makes_zero_exact(lo, span, bits, pow2):
    qp = affine_qparams(torch.tensor(lo), torch.tensor(lo + span), bits, pow2, "ceil")
    assert float(qp.zero_point) == round(float(qp.zero_point))
    assert qp.qmin <= float(qp.zero_point) <= qp.qmax
    assert float(fake_quant(torch.tensor(0.0), qp.scale, qp.zero_point, qp.qmin, qp.qmax)) == 0.0
    if pow2:  # ceil never clips: the whole observed range is representable
        assert float(pow2_exponent(qp.scale)) == -torch.log2(qp.scale).item()
        lo_rep = (qp.qmin - qp.zero_point) * qp.scale
        hi_rep = (qp.qmax - qp.zero_point) * qp.scale
        slack = 1e-6 * float(qp.scale) + 1e-6  # affine_qparams lets the ends move by 1e-6 of a step (float noise)
        assert lo_rep <= min(lo, 0.0) + slack and hi_rep >= max(lo + span, 0.0) - slack


def test_affine_params_known_answer():
    qp = affine_qparams(torch.tensor(-1.0), torch.tensor(3.0), 8, False, "ceil")
    assert qp.scale.item() == pytest.approx(4 / 255)
    assert qp.zero_point.item() == round(1.0 / (4 / 255))  # 63.75 -> 64
    relu = affine_qparams(torch.tensor(0.0), torch.tensor(6.0), 8, False, "ceil")
    assert relu.zero_point.item() == 0


@given(st.floats(1e-6, 1e3))
def test_pow2_ceil_never_shrinks_scale(s):
    p = pow2_round(torch.tensor(s, dtype=torch.float64), "ceil")
    assert p >= s * (1 - 1e-12) and p < 2 * s
    n = torch.log2(p)
    assert n == torch.round(n)


def test_pow2_symmetric_weights_never_clip():
    w = torch.randn(5, 4, 3, 3)
    wq = symmetric_weight(w, 8, per_channel=True, pow2=True, rounding="ceil")
    assert ((wq.codes.abs().flatten(1).amax(1)) <= 127).all()
    torch.testing.assert_close(wq.dequant, w, atol=float(wq.qparams.scale.max()) / 2, rtol=0)
    exps = pow2_exponent(wq.qparams.scale)
    torch.testing.assert_close(wq.qparams.scale, torch.exp2(-exps.float()))


def test_observer_updates_only_in_training_with_ema():
    aq = ActQuant(8, momentum=0.1)
    aq.train()
    aq(torch.tensor([-1.0, 2.0]))
    assert (aq.min_val.item(), aq.max_val.item()) == (-1.0, 2.0)  # first batch initialises
    aq(torch.tensor([-3.0, 4.0]))
    assert aq.min_val.item() == pytest.approx(-1.0 + 0.1 * (-3.0 + 1.0))
    assert aq.max_val.item() == pytest.approx(2.0 + 0.1 * (4.0 - 2.0))
    before = (aq.min_val.item(), aq.max_val.item())
    aq.eval()
    aq(torch.tensor([-100.0, 100.0]))
    assert (aq.min_val.item(), aq.max_val.item()) == before


def test_configs_validate_and_method_defaults_from_bits():
    assert make_config(None, 4).method == "google" and make_config(None, 4).w_clip == "mse"
    assert make_config(None, 8).method == "google" and make_config(None, 8).w_clip == "max"
    assert make_config("dorefa", 4).method == "dorefa"
    assert make_config("google", 6).bits == 6
    for bad in (lambda: DorefaConfig(w_bits=1), lambda: GoogleConfig(bits=9), lambda: DorefaConfig(a_bits=16),
                lambda: GoogleConfig(pow2=True, bn_fold=False), lambda: make_config("int4", 4),
                lambda: DorefaConfig(w_bits=7), lambda: GoogleConfig(act_scheme="s4"),
                lambda: GoogleConfig(w_clip="p99")):
        with pytest.raises(QuantError):
            bad()
    with pytest.raises(Exception):
        GoogleConfig().bits = 4  # frozen


def test_reduced_range_caps_8bit_codes_at_63():
    w = torch.randn(6, 3, 3, 3)
    wq = symmetric_weight(w, 8, True, False, "ceil", max_code=63)
    assert (wq.codes.abs().flatten(1).amax(1) == 63).all()
    torch.testing.assert_close(wq.qparams.scale, w.abs().flatten(1).amax(1) / 63)
    assert DorefaConfig(w_bits=8, reduce_range=False).w_bits == 8  # full range allows DoReFa 7-8 bits


@pytest.mark.parametrize("per_channel,pow2,clip", [(True, False, "max"), (False, False, "max"),
                                                    (True, True, "max"), (True, False, "mse"),
                                                    (True, True, "mse"), (False, False, "mse"),
                                                    (False, True, "mse")])
def test_pair_safe_codes_never_saturate_an_int16_pair_sum(per_channel, pow2, clip):
    """Every pair of codes of one output channel times u8 activations (<= 255) fits int16 (VPMADDUBSW),
    whatever the pairing; codes use [-127, 127] and are finer than max|w|/63 where one weight stands out."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 8, 3, 3, generator=g) ** 3
    w[0, 0, 0, 0] = 8 * w[0].abs().max()  # a channel with an outlier
    w[1] = 0.5  # a flat channel: top-2 equal
    wq = symmetric_weight(w, 8, per_channel, pow2, "nearest", w_clip=clip, pair_max=128)
    top2 = wq.codes.abs().flatten(1).topk(2, dim=1).values.sum(1)
    assert int(top2.max()) * 255 <= 32767 and int(top2.max()) <= 128
    assert int(wq.codes.abs().max()) <= 127
    if per_channel and not pow2 and clip == "max":
        assert int(wq.codes[0].abs().max()) >= 100  # the outlier channel: far beyond 63
        half = symmetric_weight(w, 8, True, False, "ceil", max_code=63)
        assert float((wq.dequant - w).pow(2).sum()) < 0.8 * float((half.dequant - w).pow(2).sum())
    torch.testing.assert_close(wq.codes.float() * wq.qparams.view(4)[0], wq.dequant)


@pytest.mark.parametrize("rounding", ["ceil", "nearest"])
def test_pair_bound_holds_for_weights_beyond_the_mse_clip(rounding):
    """Issue 22.5: the MSE clip sized the pair bound while weights above the clip still got codes up to 127
    (a channel's top two summed to 131). Heavy tails: the clip lands well inside max|w|."""
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(64, 2304, generator=g) ** 3).view(64, 256, 3, 3)  # a 256-input 3x3 conv
    for pow2 in (False, True):
        wq = symmetric_weight(w, 8, True, pow2, rounding, w_clip="mse", pair_max=128)
        top2 = wq.codes.abs().flatten(1).topk(2, dim=1).values.sum(1)
        assert int(top2.max()) <= 128, (pow2, int(top2.max()))
        torch.testing.assert_close(wq.codes.float() * wq.qparams.view(4)[0], wq.dequant)


def test_pow2_mse_clip_is_searched_over_pow2_scales():
    """With --pow2 the MSE clip picks among powers of two, so rounding the scale up cannot undo it: the
    scales are powers of two, some clip below max|w|, and the error is below the max-range pow2 grid's."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, 3, 3, generator=g) ** 3
    mse = symmetric_weight(w, 4, True, True, "ceil", w_clip="mse")
    full = symmetric_weight(w, 4, True, True, "ceil", w_clip="max")
    s = mse.qparams.scale
    torch.testing.assert_close(s, torch.exp2(torch.round(torch.log2(s))))
    assert (s < full.qparams.scale).any()
    assert (s <= full.qparams.scale).all()
    err = lambda q: float((q.dequant - w).pow(2).sum())  # noqa: E731
    assert err(mse) < 0.9 * err(full)
    # the old way: the linear MSE clip, then its scale rounded up to a power of two (the clip mostly undone)
    lin = symmetric_weight(w, 4, True, False, "ceil", w_clip="mse").qparams.scale.view(-1, 1, 1, 1)
    up = pow2_round(lin, "ceil")
    assert err(mse) < 0.9 * float((torch.clamp(torch.round(w / up), -7, 7) * up - w).pow(2).sum())


def test_mse_clip_lowers_4bit_error_against_max():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, 3, 3, generator=g) ** 3  # heavy tails, like real conv weights
    err = lambda clip: float((symmetric_weight(w, 4, True, False, "ceil", w_clip=clip).dequant - w).pow(2).sum())  # noqa: E731
    assert err("mse") < 0.9 * err("max")


def test_symmetric_activation_params_zero_point_zero():
    qp = symmetric_qparams(torch.tensor(-0.5), torch.tensor(3.0), 8, False, "ceil")
    assert (qp.qmin, qp.qmax, float(qp.zero_point)) == (-128, 127, 0.0)
    assert qp.scale.item() == pytest.approx(3.0 / 127)
    # the fixed [0, 1] image range in pow2 mode: 2^-7 signed, 2^-8 unsigned (rounded down, not up)
    assert symmetric_qparams(torch.tensor(0.0), torch.tensor(1.0), 8, True, "ceil", fixed=True).scale.item() == 2 ** -7
    assert affine_qparams(torch.tensor(0.0), torch.tensor(1.0), 8, True, "ceil", fixed=True).scale.item() == 2 ** -8


def test_stopped_observer_keeps_its_range_in_training_and_passes_gradients():
    aq = ActQuant(8).train()
    aq(torch.tensor([-1.0, 2.0]))
    aq.stop_observing()
    x = torch.tensor([-5.0, 0.3, 9.0], requires_grad=True)
    y = aq(x)
    assert (aq.min_val.item(), aq.max_val.item()) == (-1.0, 2.0)
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 0.0]  # STE inside the fixed range, zero where it clips
