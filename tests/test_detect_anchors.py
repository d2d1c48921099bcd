"""k-means anchors, detect output files, and the anchors / data synth / detect commands."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from compress.detection.anchors import AnchorConfig, compute_anchors, format_anchors, kmeans_anchors, wh_iou
from compress.cli import cli
from compress.detection.detect import DetectConfig, detect_to_dir
from compress.base.errors import DataError

CFG = Path(__file__).parent / "data" / "tiny-v4-groups.cfg"


def test_wh_iou():
    wh = np.array([[10.0, 10.0], [20.0, 5.0]])
    m = wh_iou(wh, np.array([[10.0, 10.0], [5.0, 20.0]]))
    assert m[0, 0] == 1.0 and m[1, 1] == pytest.approx(25 / 175)


def test_kmeans_recovers_clusters():
    centres = np.array([[10, 13], [30, 60], [62, 45], [116, 90], [200, 300], [373, 326]], float)
    rng = np.random.default_rng(0)
    wh = np.concatenate([c * rng.uniform(0.93, 1.07, (80, 2)) for c in centres])
    found = kmeans_anchors(wh, 6, seed=1)
    assert np.allclose(found, centres, rtol=0.05)
    assert (np.diff(found.prod(1)) > 0).all()  # sorted by area
    assert np.array_equal(found, kmeans_anchors(wh, 6, seed=1))  # deterministic
    assert format_anchors(found[:2]).count(",") == 3
    with pytest.raises(DataError, match="cannot make"):
        kmeans_anchors(wh[:3], 6)


def _folder(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    for i, (w, h) in enumerate([(100, 50), (60, 60), (30, 90)]):
        Image.fromarray(np.full((h, w, 3), 60 * i, np.uint8)).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text("0 0.5 0.5 0.5 0.5\n1 0.3 0.3 0.2 0.1\n")
    return d


def test_compute_anchors_scales_to_img_size(tmp_path):
    res = compute_anchors(sorted(_folder(tmp_path).glob("*.png")), AnchorConfig(n=2, img_size=100))
    assert res.boxes == 6 and 0 < res.mean_iou <= 1
    # box 0.5x0.5 of a 100x50 image scaled to long side 100 -> 50 x 25
    assert res.cfg_line().startswith("anchors = ")
    assert res.anchors.shape == (2, 2) and res.anchors.prod(1)[0] <= res.anchors.prod(1)[1]


class Fixed:
    """A predictor with one confident class-1 box of side S/4 at the input's centre."""
    num_classes = 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[-1]
        out = torch.zeros(len(x), 2, 7)
        out[:, 0] = torch.tensor([s / 2, s / 2, s / 4, s / 4, 0.9, 0.0, 1.0])
        return out


@pytest.mark.parametrize("letterbox,box", [(True, [37.5, 12.5, 62.5, 37.5]), (None, [37.5, 18.75, 62.5, 31.25])])
def test_detect_to_dir_writes_images_and_json(tmp_path, letterbox, box):
    src = _folder(tmp_path)
    config = DetectConfig(img_size=64, progress=False, letterbox=letterbox)  # None: plain resize (Darknet)
    records = detect_to_dir(Fixed(), src, tmp_path / "out", ["a", "b"], config)
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"0.png", "1.png", "2.png", "detections.json"}
    assert json.loads((tmp_path / "out" / "detections.json").read_text()) == records
    det = records[0]["detections"][0]  # image 0 is 100x50: centre box of side 64/4 -> 25 px wide
    assert det["name"] == "b" and det["conf"] == pytest.approx(0.9)
    assert np.allclose(det["box_xyxy"], box, atol=0.5)
    drawn = np.asarray(Image.open(tmp_path / "out" / "0.png"))
    assert drawn.shape == (50, 100, 3) and not (drawn == 0).all()


def test_cli_synth_anchors_detect(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["data", "synth", "--out", str(tmp_path / "s"), "--n-train", "4", "--n-valid", "2",
                              "--img-size", "64"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "s" / "synth.data").is_file() and len(list((tmp_path / "s/images/train").glob("*"))) == 4
    report = tmp_path / "a.json"
    res = runner.invoke(cli, ["anchors", "--data", str(tmp_path / "s" / "synth.data"), "--n", "3",
                              "--img-size", "64", "--report", str(report)])
    assert res.exit_code == 0, res.output
    assert "anchors = " in res.output and len(json.loads(report.read_text())["anchors"]) == 3
    res = runner.invoke(cli, ["detect", "--cfg", str(CFG), "--source", str(tmp_path / "s/images/valid"),
                              "--out", str(tmp_path / "det"), "--conf-thres", "0.0"])
    assert res.exit_code == 0, res.output
    assert len(json.loads((tmp_path / "det" / "detections.json").read_text())) == 2


def test_detect_names_shorter_than_classes_is_an_error(tmp_path):
    from compress.base.errors import DataError
    with pytest.raises(DataError, match="has 1 names but the model predicts 2 classes"):
        detect_to_dir(Fixed(), _folder(tmp_path), tmp_path / "out", ["a"], DetectConfig(img_size=64, progress=False))
    assert not (tmp_path / "out").exists()
