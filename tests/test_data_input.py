"""Dataset items are uint8 RGB CHW images; `to_input` is the one place they become the float network input, and
the consumers (trainer, evaluate, quantization calibration) feed their models through it."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from compress import build_model, parse_cfg
from compress.data.dataset import DetectionDataset, collate, make_loader, to_input
from compress.detection.evaluate import EvalConfig, evaluate
from compress.data.synth import synthesize
from compress.train import Hook, TrainConfig, fit
from conftest import DATA

SIZE = 320


@pytest.fixture(scope="module")
def coco4():
    from conftest import require_assets
    return sorted((require_assets() / "data" / "coco128" / "images" / "train2017").glob("*.jpg"))[:4]


def test_to_input_is_exact():
    u8 = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    out = to_input(u8, "cpu")
    assert out.dtype == torch.float32 and out.shape == u8.shape
    # bit-identical to the worker-side formula of earlier versions (numpy, float32 reciprocal) ...
    assert np.array_equal(out.numpy().ravel(), np.arange(256, dtype=np.float32) * np.float32(1 / 255))
    # ... within float32 eps of the exact quotient; 0 and 1 exactly
    got, exact = out.numpy().ravel().astype(np.float64), np.arange(256) / 255.0
    assert np.abs(got - exact).max() < np.finfo(np.float32).eps
    assert out.min() == 0.0 and out.max() == 1.0
    floats = torch.rand(2, 3, 4, 4)
    assert to_input(floats) is floats and torch.equal(to_input(floats, "cpu"), floats)  # already normalised


def test_items_are_uint8_rgb_planes_of_the_image(coco4):
    """Plain resize: the item is the RGB image (PIL decode, OpenCV resize as reference), planar, uint8."""
    ds = DetectionDataset(coco4, SIZE, letterbox=False)
    for i, path in enumerate(coco4):
        img = ds[i][0]
        assert img.dtype == torch.uint8 and img.shape == (3, SIZE, SIZE) and img.is_contiguous()
        ref = cv2.resize(np.asarray(Image.open(path).convert("RGB")), (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
        diff = np.abs(img.permute(1, 2, 0).numpy().astype(np.int16) - ref.astype(np.int16))
        assert diff.mean() < 1.0, diff.mean()        # same pixels up to the JPEG decoders' rounding
        swapped = np.abs(img.numpy()[::-1].transpose(1, 2, 0).astype(np.int16) - ref).mean()
        assert swapped > 5 * diff.mean() + 1          # and RGB, not BGR
    boxed = DetectionDataset(coco4[:1], SIZE, letterbox=True)[0]
    (_, pad_h) = boxed[4][1]
    assert pad_h > 0 and (boxed[0][:, :pad_h] == 114).all()  # padding is exactly the grey value


def test_loader_batches_stay_uint8_through_workers(coco4):
    serial = next(iter(make_loader(coco4, SIZE, batch_size=4, workers=0)))[0]
    forked = next(iter(make_loader(coco4, SIZE, batch_size=4, workers=2)))[0]
    assert serial.dtype == forked.dtype == torch.uint8 and torch.equal(serial, forked)


class _Recorder:
    """A letterboxing predictor that records its input and predicts nothing."""

    letterbox = True

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return torch.zeros(len(x), 1, 5 + 80)


def test_evaluate_feeds_the_normalised_batch(coco4):
    ds = DetectionDataset(coco4, SIZE, num_classes=80, letterbox=True)
    rec = _Recorder()
    evaluate(rec, ds, EvalConfig(img_size=SIZE, batch_size=4, workers=0, progress=False))
    expected = np.stack([ds[i][0].numpy() for i in range(4)]).astype(np.float32) * np.float32(1 / 255)
    assert len(rec.seen) == 1 and rec.seen[0].dtype == torch.float32
    assert np.array_equal(rec.seen[0].numpy(), expected)


def _on_the_255_grid(x: torch.Tensor) -> bool:
    """x is exactly to_input of some uint8 image (so it went through the one normalisation)."""
    return x.dtype == torch.float32 and torch.equal(to_input((x * 255).round().to(torch.uint8)), x)


def test_trainer_feeds_the_normalised_batch(tmp_path):
    seen = []

    class Grab(Hook):
        def extra_loss(self, state, imgs, targets, heads):
            seen.append(imgs.detach().clone())
            return {}

    data = synthesize(tmp_path / "synth", n_train=4, n_valid=2, img_size=64, seed=1)
    text = (DATA / "tiny-shortcut.cfg").read_text().replace("classes=2", "classes=3").replace("filters=21",
                                                                                               "filters=24")
    torch.manual_seed(0)
    from compress.data.dataset import load_data_spec
    fit(build_model(parse_cfg(text, "tiny-3cls.cfg")), load_data_spec(data),
        TrainConfig(epochs=1, batch_size=4, img_size=64, workers=0, progress=False, warmup_epochs=0,
                    eval_every=100), hooks=[Grab()], out_dir=tmp_path / "out")
    assert seen and all(_on_the_255_grid(x) and x.max() > 0.5 for x in seen)


def test_calibration_takes_loader_batches(coco4):
    from compress.quant import GoogleConfig, calibrate, prepare_qat
    text = (DATA / "tiny-shortcut.cfg").read_text()
    batch = collate([DetectionDataset(coco4, 64)[i] for i in range(4)])[0]
    states = []
    for imgs in (batch, to_input(batch)):  # uint8 from the loader, or already normalised: the same observers
        torch.manual_seed(0)
        q = prepare_qat(build_model(parse_cfg(text, "tiny.cfg")), GoogleConfig())
        calibrate(q, [imgs])
        states.append({k: v for k, v in q.state_dict().items() if "quant" in k or "obs" in k})
    assert states[0] and states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
