"""weights.py / persist.py: byte-identical Darknet I/O, header widths, loud failures, cutoff, .pt checkpoints."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

import compress
from compress.darknet.cfg import read_cfg
from compress.base.errors import WeightsError
from compress.darknet.model import build_model
from compress.darknet.persist import read_checkpoint, save_checkpoint
from compress.darknet.weights import count_darknet_floats, darknet_tensors, read_weights, write_weights

from conftest import ASSETS, DATA, randomize_bn

# PROVENANCE.md 4a: (major, minor, revision, seen) of the official files.
HEADERS = {"yolov3-tiny": (0, 2, 0, 32_013_312), "yolov4-tiny": (0, 2, 5, 0), "yolo-fastest-1.1": (0, 2, 5, 14_231_680)}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _random_model(cfg_path: Path, seed: int = 0):
    torch.manual_seed(seed)
    model = randomize_bn(build_model(read_cfg(cfg_path)), seed)
    with torch.no_grad():
        for _, t in darknet_tensors(model):
            if t.dtype.is_floating_point and t.dim() > 1:
                t.normal_(0, 0.1)
    return model.eval()


def _state(model) -> list[torch.Tensor]:
    return [t.detach().clone() for _, t in darknet_tensors(model)]


@pytest.mark.parametrize("name", sorted(HEADERS))
def test_official_weights_round_trip_byte_identical(assets: Path, tmp_path: Path, name: str) -> None:
    src = ASSETS / "weights" / f"{name}.weights"
    model = compress.load(ASSETS / "weights" / f"{name}.cfg", src)
    assert model.header == HEADERS[name]
    assert src.stat().st_size == 20 + 4 * count_darknet_floats(model)
    out = tmp_path / f"{name}.weights"
    write_weights(out, model)
    assert _sha(out) == _sha(src)
    # Independent check of the file layout: the first conv's BN biases come first, right after the header.
    first = np.fromfile(src, dtype="<f4", count=8, offset=20)
    assert np.array_equal(first, model.layers[0].bn.bias.detach().numpy()[:8])
    assert not model.training  # load returns an eval-mode model


def test_write_read_identity(tmp_path: Path, tiny_cfg: Path) -> None:
    a = _random_model(tiny_cfg, seed=1)
    path = tmp_path / "m.weights"
    write_weights(path, a)
    assert path.stat().st_size == 20 + 4 * count_darknet_floats(a)
    b = _random_model(tiny_cfg, seed=2)
    assert not all(torch.equal(x, y) for x, y in zip(_state(a), _state(b)))
    header = read_weights(path, b)
    assert header == (0, 2, 5, 0) == b.header
    assert all(torch.equal(x, y) for x, y in zip(_state(a), _state(b)))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    write_weights(tmp_path / "again.weights", b)
    assert _sha(tmp_path / "again.weights") == _sha(path)


@pytest.mark.parametrize("header, size_of_seen", [((0, 1, 0, 123_456), 4), ((0, 2, 5, 2**40 + 7), 8),
                                                  ((1, 0, 0, 99), 8), ((1000, 1, 0, 5), 4)])
def test_header_seen_width(tmp_path: Path, header, size_of_seen: int) -> None:
    model = _random_model(DATA / "tiny-v4-groups.cfg")
    path = tmp_path / "h.weights"
    write_weights(path, model, header=header)
    assert path.stat().st_size == 12 + size_of_seen + 4 * count_darknet_floats(model)
    raw = path.read_bytes()
    assert tuple(np.frombuffer(raw[:12], "<i4")) == header[:3]
    assert int(np.frombuffer(raw[12:12 + size_of_seen], "<i4" if size_of_seen == 4 else "<i8")[0]) == header[3]
    other = _random_model(DATA / "tiny-v4-groups.cfg", seed=3)
    assert read_weights(path, other) == header and other.header == header
    assert all(torch.equal(x, y) for x, y in zip(_state(model), _state(other)))
    write_weights(tmp_path / "h2.weights", other)  # the model keeps its header
    assert _sha(tmp_path / "h2.weights") == _sha(path)


def test_truncated_file_names_counts(tmp_path: Path) -> None:
    model = _random_model(DATA / "tiny-v4-groups.cfg")
    n = count_darknet_floats(model)
    path = tmp_path / "t.weights"
    write_weights(path, model)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(WeightsError, match=rf"holds {n - 10} floats but .*tiny-v4-groups\.cfg needs {n} \(-10\).*"
                                           "truncated"):
        read_weights(path, build_model(read_cfg(DATA / "tiny-v4-groups.cfg")))
    path.write_bytes(b"\0" * 10)
    with pytest.raises(WeightsError, match="too short for a Darknet header"):
        read_weights(path, model)
    path.write_bytes(b"\0" * 16 + b"\1\2\3")  # a 16-byte header (version 0.0: int32 seen) + 3 stray bytes
    with pytest.raises(WeightsError, match="3 bytes after the header are not a whole number of float32"):
        read_weights(path, model)
    path.write_text((DATA / "tiny-v4-groups.cfg").read_text())  # the cfg passed as weights
    with pytest.raises(WeightsError, match=r"starts with text \('#.*not a Darknet \.weights header"):
        read_weights(path, model)
    with pytest.raises(WeightsError, match="not found"):
        read_weights(tmp_path / "missing.weights", model)


def test_wrong_cfg_names_counts(assets: Path) -> None:
    model = build_model(read_cfg(ASSETS / "cfg" / "yolov4-tiny-3l.cfg"))
    with pytest.raises(WeightsError) as err:
        read_weights(ASSETS / "weights" / "yolov4-tiny.weights", model)
    msg = str(err.value)
    assert "holds 6062814 floats" in msg and "needs 6334045 (-271231)" in msg and "--cutoff" in msg
    small = build_model(read_cfg(DATA / "tiny-v4-groups.cfg"))
    with pytest.raises(WeightsError, match=r"needs \d+ \(\+\d+\); the cfg has fewer"):
        read_weights(ASSETS / "weights" / "yolov4-tiny.weights", small)


def test_cutoff_loads_only_the_first_layers(tmp_path: Path) -> None:
    src = _random_model(DATA / "tiny-v4-groups.cfg", seed=1)
    path = tmp_path / "src.weights"
    write_weights(path, src)
    # A model whose heads differ (3 classes): the full file does not fit, the backbone does.
    cfg = read_cfg(DATA / "tiny-v4-groups.cfg")
    blocks = [b.replace(classes=3) if b.type == "yolo" else b for b in cfg.blocks]
    blocks = [b.replace(filters=24) if i + 1 < len(blocks) and blocks[i + 1].type == "yolo" else b
              for i, b in enumerate(blocks)]
    dst = build_model(cfg.with_blocks(blocks))
    before = [t.detach().clone() for i, t in darknet_tensors(dst) if i >= 12]
    with pytest.raises(WeightsError):
        read_weights(path, dst)
    read_weights(path, dst, cutoff=12)
    for (i, a), (j, b) in zip(darknet_tensors(src, 12), darknet_tensors(dst, 12)):
        assert i == j and torch.equal(a, b)
    after = [t for i, t in darknet_tensors(dst) if i >= 12]
    assert len(after) == len(before) > 0 and all(torch.equal(a, b) for a, b in zip(after, before))
    # loading through the public API with cutoff
    loaded = compress.load(cfg.with_blocks(blocks), path, cutoff=12)
    assert torch.equal(loaded.layers[11].conv.weight, src.layers[11].conv.weight)
    with pytest.raises(WeightsError, match=r"layers 0\.\.19 need \d+"):  # cutoff past the end of the file
        read_weights(path, build_model(read_cfg(DATA / "tiny-shortcut.cfg")), cutoff=20)


def test_pt_checkpoint_embeds_cfg(tmp_path: Path, tiny_cfg: Path) -> None:
    model = _random_model(tiny_cfg, seed=4)
    model.header = (0, 2, 5, 777)
    ckpt = tmp_path / "x.pt"
    save_checkpoint(model, ckpt, epoch=3)
    payload = read_checkpoint(ckpt)
    assert payload["epoch"] == 3 and payload["cfg"] == compress.format_cfg(model.cfg)
    loaded = compress.load(None, ckpt)
    assert loaded.cfg.blocks == compress.parse_cfg(payload["cfg"]).blocks
    assert tuple(loaded.header) == (0, 2, 5, 777)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    # save() picks the format from the suffix; both reload to the same outputs
    compress.save(model, tmp_path / "pair.cfg", tmp_path / "pair.weights")
    compress.save(model, tmp_path / "ck.cfg", tmp_path / "ck.pt")
    for cfg_path, weights in [(tmp_path / "pair.cfg", tmp_path / "pair.weights"), (tmp_path / "ck.cfg", tmp_path / "ck.pt")]:
        again = compress.load(cfg_path, weights)
        with torch.no_grad():
            assert torch.equal(model(x), again(x))


def test_pt_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint"):
        compress.load(None, bad)
    torch.save({"model": {}}, tmp_path / "nocfg.pt")
    with pytest.raises(WeightsError, match="do not embed one; pass --cfg"):
        compress.load(None, tmp_path / "nocfg.pt")
    with pytest.raises(WeightsError, match="no --cfg given"):
        compress.load(None, None)
    model = _random_model(DATA / "tiny-v4-groups.cfg")
    save_checkpoint(model, tmp_path / "v4.pt")
    with pytest.raises(WeightsError, match="use the cfg this checkpoint was saved with"):
        compress.load(DATA / "tiny-shortcut.cfg", tmp_path / "v4.pt")
    for exported in ("m.onnx", "model.xml", "model.param"):  # only eval runs exported models
        with pytest.raises(WeightsError, match="an exported model; `eval --weights` runs it"):
            compress.load(DATA / "tiny-v4-groups.cfg", tmp_path / exported)
