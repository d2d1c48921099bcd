"""Least-squares reconstruction after pruning (`prune --reconstruct N`): the refit equals numpy's lstsq on the
same patch rows (an independent solver), and on the official yolov4-tiny weights it brings the pruned model's
head outputs on images it was not fitted on closer to the original's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import compress
from compress.darknet.cfg import parse_cfg
from compress.darknet.model import build_model
from compress.base.errors import PruneError
from compress.jobs.prune import PruneJob
from compress.prune import PruneConfig, prune
from compress.prune.costs import Target
from compress.prune.reconstruct import ReconstructConfig, reconstruct, refit_layers
from compress.prune.surgery import apply_channel_mask

from conftest import randomize_bn

_CFG = ("[net]\nwidth=32\nheight=32\nchannels=3\n"
        "[convolutional]\nbatch_normalize=1\nfilters=8\nsize=3\nstride=1\npad=1\nactivation=leaky\n"
        "[convolutional]\nbatch_normalize=1\nfilters=6\nsize=3\nstride=1\npad=1\nactivation=leaky\n"
        "[convolutional]\nfilters=21\nsize=1\nstride=1\npad=1\nactivation=linear\n"
        "[yolo]\nmask=0,1,2\nanchors=4,5, 8,10, 12,9\nclasses=2\nnum=3\n")


def test_refit_equals_numpy_lstsq() -> None:
    """Conv 0 loses 3 of 8 channels; conv 1 is refitted. With every output position sampled and no ridge, its
    weights and intercept are numpy's least-squares solution of the original conv-1 output on the pruned input."""
    torch.manual_seed(0)
    model = randomize_bn(build_model(parse_cfg(_CFG))).eval()
    mask = {0: torch.tensor([True, False, True, True, False, True, False, True])}
    small = apply_channel_mask(model, mask, compensate=True)
    assert refit_layers(model, small) == [1]
    images = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
    reconstruct(model, small, mask, [images], ReconstructConfig(positions=32 * 32, ridge=0.0, downstream=False))
    with torch.no_grad():
        x = images.float() / 255
        h_small = small.layers[0](x)                      # the pruned model's input to conv 1
        y = model.layers[1].conv(model.layers[0](x))      # the original's conv-1 output (pre-BN)
    conv = small.layers[1].conv
    rows = F.unfold(h_small, 3, padding=1).permute(0, 2, 1).reshape(-1, conv.in_channels * 9).double().numpy()
    rows = np.concatenate([rows, np.ones((len(rows), 1))], 1)
    target = y.permute(0, 2, 3, 1).reshape(-1, 6).double().numpy()
    sol = np.linalg.lstsq(rows, target, rcond=None)[0]
    np.testing.assert_allclose(conv.weight.detach().reshape(6, -1).numpy(), sol[:-1].T, rtol=1e-4, atol=1e-5)
    mean = model.layers[1].bn.running_mean.double().numpy() - sol[-1]
    np.testing.assert_allclose(small.layers[1].bn.running_mean.numpy(), mean, rtol=1e-4, atol=1e-5)


def _heads(model, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return model.eval()(x, raw=True)


def test_reconstruction_brings_a_real_pruned_model_closer(assets: Path) -> None:
    from compress.train.bn_adapt import image_batches
    w = assets / "weights"
    model = compress.load(w / "yolov4-tiny.cfg", w / "yolov4-tiny.weights")
    result = prune(model, PruneConfig(method="l1", target=Target("flops", ratio=0.7), img_size=320))
    images = sorted(str(p) for p in (assets / "data" / "coco128" / "images" / "train2017").glob("*.jpg"))
    fit, held = images[:16], images[-8:]
    before = [h.clone() for h in _heads(result.model, next(iter(image_batches(held, 320, 8, 1))).float() / 255)]
    reconstruct(model, result.model, result.mask, image_batches(fit, 320, 8, 2), ReconstructConfig())
    x = next(iter(image_batches(held, 320, 8, 1))).float() / 255
    ref, after = _heads(model, x), _heads(result.model, x)
    err = [float((b - r).pow(2).mean() / r.pow(2).mean()) for b, r in zip(before, ref)]
    err_after = [float((a - r).pow(2).mean() / r.pow(2).mean()) for a, r in zip(after, ref)]
    assert all(e2 < 0.75 * e1 for e1, e2 in zip(err, err_after)), (err, err_after)


def test_reconstruct_needs_data(tmp_path: Path) -> None:
    with pytest.raises(PruneError, match="--reconstruct needs --data"):
        PruneJob(cfg=tmp_path / "a.cfg", weights=None, out=tmp_path / "o", reconstruct=16)
