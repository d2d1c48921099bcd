"""BN adaptation: re-estimate every BatchNorm's running statistics from the model's own activations.

After training or pruning, a model's weights and its BN running mean/var can disagree: statistics frozen while
the weights moved, averaged over mosaic-augmented batches, or left behind by a cut that was not exact. Such a
model can score mAP 0.000 with fine weights (issue 23: 0.000 -> 0.336 by this re-estimation alone, no
training). NNCF calls the fix BN adaptation: forward passes over training images with the BN layers in train
mode and `momentum=None` (a cumulative average over all batches, not an EMA of the last few), no gradients.
Only the BN layers change mode, so dropout and the heads behave as at inference.
"""
from __future__ import annotations

import copy
import itertools
import logging
import os
from typing import Iterable, Sequence

import torch
from torch import nn

from compress.data.dataset import make_loader, to_input

__all__ = ["adapt_bn", "adapted_copy", "image_batches", "DEFAULT_BN_ADAPT"]

log = logging.getLogger(__name__)
DEFAULT_BN_ADAPT = 16  # batches (16 x 8 covers COCO128's 96 training images; NNCF's default is 2000 images)


def _bns(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def adapt_bn(model: nn.Module, batches: Iterable[torch.Tensor], device: str | torch.device = "cpu") -> int:
    """Replace the running statistics of `model`'s BN layers by their cumulative average over `batches`
    (float input tensors, or uint8 images that `to_input` converts). Returns the number of images seen; with
    none, the statistics are left as they were. The model's modes and momenta are restored."""
    bns = _bns(model)
    if not bns:
        return 0
    saved = [(m.momentum, m.training, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in bns]
    was_training = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts the same
        m.train()
    seen = 0
    try:
        for imgs in batches:
            model(to_input(imgs, device), raw=True)
            seen += imgs.shape[0]
    finally:
        model.train(was_training)
        for m, (momentum, training, mean, var, count) in zip(bns, saved):
            m.momentum = momentum
            m.train(training)
            if not seen:  # nothing seen: keep the old statistics rather than the reset ones
                m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(count)
    return seen


def image_batches(images: Sequence[str | os.PathLike], img_size: int, batch_size: int, n_batches: int,
                  letterbox: bool = True) -> Iterable[torch.Tensor]:
    """The first `n_batches` un-augmented batches of `images` in order (deterministic; uint8 tensors)."""
    loader = make_loader(list(images), img_size, batch_size, augment=False, workers=0, letterbox=letterbox)
    return (imgs for imgs, *_ in itertools.islice(loader, n_batches))


def adapted_copy(model: nn.Module, images: Sequence[str | os.PathLike], img_size: int, batch_size: int,
                 n_batches: int, letterbox: bool = True, device: str | torch.device = "cpu") -> nn.Module:
    """A deep copy of `model` with BN statistics re-estimated on `n_batches` batches of `images` (the model
    itself is untouched: a training run goes on with its own statistics)."""
    out = copy.deepcopy(model)
    seen = adapt_bn(out, image_batches(images, img_size, batch_size, n_batches, letterbox), device)
    log.info("BN adaptation: running statistics re-estimated on %d training images", seen)
    return out
