"""The shipped real-model recipes run end to end (issue "Hardening", defect 10): the recipe files themselves,
with `--set` shrinking them to 1 epoch at 64 px on 2 + 1 COCO128 images. yolov3 has no shared weights, so it
starts from random init (the pipeline, not the accuracy, is under test)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from compress.darknet.cfg import read_cfg
import compress

from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.assets]
SIZE = 64
TRAINING = {"sparse-train": ("epochs=1", f"img_size={SIZE}", "batch_size=2", "workers=0"),
            "train": ("epochs=1", f"img_size={SIZE}", "batch_size=2", "workers=0"),
            "prune": (f"img_size={SIZE}",), "eval": (f"img_size={SIZE}", "workers=0", "batch_size=2"),
            "export": (f"img_size={SIZE}",),
            "distill": ("epochs=1", f"img_size={SIZE}", "batch_size=2", "workers=0"),
            # 1 epoch at 64 px on 2 images: the pipeline is under test, not what quantization costs against fp32
            "quantize": ("epochs=1", f"img_size={SIZE}", "batch_size=2", "calib_batches=1", "max_drop=100")}


def coco_data(assets: Path, tmp_path: Path) -> Path:
    coco = assets / "data" / "coco128"
    images = sorted((coco / "images" / "train2017").glob("*.jpg"))
    (tmp_path / "train.txt").write_text("".join(f"{p}\n" for p in images[:2]))
    (tmp_path / "valid.txt").write_text(f"{images[2]}\n")
    data = tmp_path / "coco.data"
    data.write_text(f"classes=80\ntrain={tmp_path / 'train.txt'}\nvalid={tmp_path / 'valid.txt'}\n"
                    f"names={coco / 'coco.names'}\n")
    return data


def shrink(recipe: Path) -> tuple[str, ...]:
    """--set overrides: every step's epochs/size/batch, by step number."""
    steps = [next(iter(s)) for s in yaml.safe_load(recipe.read_text())["steps"]]
    return tuple(f"steps.{i}.{name}.{kv}" for i, name in enumerate(steps, 1) for kv in TRAINING.get(name, ()))


def run(name: str, model: tuple[Path, Path | None], assets: Path, tmp_path: Path,
        extra: tuple[str, ...] = ()) -> tuple[dict, Path]:
    recipe = ROOT / "recipes" / f"{name}.yaml"
    sets = (f"model.cfg={model[0]}", f"model.weights={model[1] or ''}", f"data={coco_data(assets, tmp_path)}",
            *shrink(recipe), *extra)
    out = tmp_path / "out"
    result = compress.run_recipe(recipe, sets, out=out)  # the Python API: no click below it
    assert [r.status for r in result.records] == ["done"] * len(result.records)
    summary = json.loads((out / "summary.json").read_text())
    return {row["stage"].split("-", 1)[1]: row for row in summary["stages"]}, out


def test_yolov3_slim(assets, tmp_path):
    # KNOWN HAZARD (issue 23 branch): BN statistics re-estimated on 2 images at 64 px of this untrained yolov3
    # make its exported boxes overflow (inf) and the export check fail; the pipeline is under test here
    no_adapt = tuple(f"steps.{s}.bn_adapt=0" for s in ("sparse-train", "prune", "train"))
    stages, out = run("yolov3-slim", (assets / "cfg" / "yolov3.cfg", None), assets, tmp_path, no_adapt)
    assert stages["prune"]["params"] < 0.5 * stages["sparse-train"]["params"]  # 80 % of the BN channels cut
    assert stages["eval"]["params"] == stages["train"]["params"]
    assert (out / "05-export" / "model.onnx").stat().st_size > 1e6


def test_yolov4_tiny_regular(assets, tmp_path):
    stages, out = run("yolov4-tiny-regular", (assets / "weights" / "yolov4-tiny.cfg",
                                              assets / "weights" / "yolov4-tiny.weights"), assets, tmp_path)
    pruned = read_cfg(json.loads((out / "02-prune" / "report.json").read_text())["cfg"])
    widths = [b.get("filters") for b in pruned.blocks if b.type == "convolutional" and b.get("batch_normalize")]
    assert widths and all(int(w) % 8 == 0 for w in widths)  # round_to: 8
    assert stages["prune"]["params"] < stages["sparse-train"]["params"]
    assert (out / "04-quantize" / "model-int8.onnx").is_file()


def test_yolov3_layer(assets, tmp_path):
    stages, out = run("yolov3-layer", (assets / "cfg" / "yolov3.cfg", None), assets, tmp_path)
    before = read_cfg(assets / "cfg" / "yolov3.cfg")
    after = read_cfg(json.loads((out / "02-prune" / "report.json").read_text())["cfg"])
    shortcuts = lambda cfg: sum(b.type == "shortcut" for b in cfg.blocks)  # noqa: E731
    assert shortcuts(before) - shortcuts(after) == 12
    assert stages["prune"]["params"] < stages["sparse-train"]["params"]


@pytest.mark.parametrize("name,weights,flops", [("yolov4-tiny-slim", "yolov4-tiny", 0.5),
                                                ("yolo-fastest-slim", "yolo-fastest-1.1", 0.7)])
def test_pretrained_slim_recipes(assets, tmp_path, name, weights, flops):
    """prune (l1 to the FLOPs target, half of every layer kept, least-squares refit) -> distill (teacher: the
    input model) -> int8 -> export, from the COCO weights."""
    w = assets / "weights"
    stages, out = run(name, (w / f"{weights}.cfg", w / f"{weights}.weights"), assets, tmp_path)
    assert list(stages) == ["prune", "distill", "quantize"]
    pruned = json.loads((out / "01-prune" / "report.json").read_text())
    full, cut = read_cfg(w / f"{weights}.cfg"), read_cfg(Path(pruned["cfg"]))
    assert pruned["gflops_after"] <= (flops + 0.01) * pruned["gflops_before"] and pruned["round_to"] == 8
    assert pruned["reconstruct_images"] == 2  # all the (2) training images of the shrunk data
    widths = [(a.get_int("filters"), b.get_int("filters")) for a, b in zip(full.blocks, cut.blocks)
              if a.type == "convolutional"]
    assert any(b < a for a, b in widths) and all(b >= a // 2 for a, b in widths)  # the floor: half of every layer
    report = json.loads((out / "02-distill" / "report.json").read_text())  # pretrained: fine-tune defaults
    assert report["train_config"]["loss"] == "darknet" and report["train_config"]["bn_adapt"] > 0
    assert report["train_config"]["optimizer"] == "sgd" and report["map50_start"] is not None
    assert "collapsed" in report
    quant = json.loads((out / "03-quantize" / "report.json").read_text())
    assert quant["vs_fp32"]["max_drop"] == 100 and quant["vs_fp32"]["checks"]
    assert (out / "04-export" / "model.onnx").is_file() and full.width in (320, 416)
