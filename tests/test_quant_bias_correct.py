"""Empirical bias correction (Nagel et al. 2019): after it, each conv's quantized output has the float
output's per-channel mean on the calibration inputs (exact for 1x1 convs: no padding)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from compress.darknet.cfg import read_cfg
from compress.darknet.model import build_model
from compress.quant import GoogleConfig, QConvBNAct, calibrate, prepare_qat
from compress.quant.bias_correct import correct_biases, input_means
from conftest import DEMO_CFG, randomize_bn


def _float_folded(m: QConvBNAct) -> tuple[torch.Tensor, torch.Tensor]:
    if m.bn is None:
        return m.conv.weight.clone(), m.conv.bias.clone()
    g = m.bn.weight / torch.sqrt(m.bn.running_var + m.bn.eps)
    return m.conv.weight * g.view(-1, 1, 1, 1), m.bn.bias - m.bn.running_mean * g


@torch.no_grad()
def test_bias_correction_removes_the_mean_output_shift_of_weight_rounding():
    torch.manual_seed(0)
    q = prepare_qat(randomize_bn(build_model(read_cfg(DEMO_CFG))), GoogleConfig(bits=3, first_last_bits=None))
    batches = [torch.rand(4, 3, 64, 64) * 0.5 + 0.4 for _ in range(2)]  # inputs with a clear mean
    calibrate(q, batches)
    pointwise = [m for m in q.modules() if isinstance(m, QConvBNAct) and m.conv.kernel_size == (1, 1)]
    seen: dict[QConvBNAct, list[torch.Tensor]] = {m: [] for m in pointwise}
    handles = [m.register_forward_pre_hook(lambda mod, a: seen[mod].append(a[0].clone())) for m in pointwise]
    means = input_means(q, batches)
    for h in handles:
        h.remove()
    before = {m: _float_folded(m) for m in pointwise}  # float reference, before the bias moves

    def shift(m: QConvBNAct) -> torch.Tensor:  # mean(quantized output) - mean(float output), per channel
        x = torch.cat(seen[m])
        w, b = before[m]
        f = m.folded()
        return (F.conv2d(x, f.weight, f.bias) - F.conv2d(x, w, b)).mean((0, 2, 3))

    errors = {m: shift(m) for m in pointwise}
    assert len(pointwise) >= 2 and all(e.abs().max() > 1e-3 for e in errors.values())  # 3-bit rounding shifts
    corrections = correct_biases(means)
    assert set(corrections) == set(means) and len(means) == sum(isinstance(m, QConvBNAct) for m in q.modules())
    for m in pointwise:
        torch.testing.assert_close(shift(m), torch.zeros_like(errors[m]), atol=1e-5, rtol=0)
        torch.testing.assert_close(corrections[m], -errors[m], atol=1e-5, rtol=1e-4)
