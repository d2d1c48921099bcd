"""Hostile values (issue 27, groups 3, 8, 9, 10, 11, 13): NaN weights and outputs, resource limits, values that
ended in a traceback, silent data loss in `data convert`, unchecked cfg/.data values, cosmetic errors.

One parametrized table per command: each row is (id, argv, exit code, substring of the one-line error). Paths
in argv are `{name}` placeholders filled from the `files` fixture (hostile files built once per module), so a
new case is a new row (and, if it needs one, a new file in `files`). Exit 1 = a library error: one `Error: ...`
line, last on stderr, no traceback (log lines may come before it); exit 2 = click's usage error.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.base.errors import CompressError, DistillError, QuantError
from compress.cli import main
from compress.darknet.cfg import parse_cfg, read_cfg
from compress.darknet.model import build_model
from compress.darknet.persist import save
from compress.data.dataset import DetectionDataset
from compress.data.synth import synthesize

from conftest import ASSETS, DEMO_CFG, ROOT, require_assets

# --- the hostile files ----------------------------------------------------------------------------------------

_HEADER = 20  # bytes before the floats of a Darknet .weights (major, minor, revision, seen as int64)
_LAYER0 = 4 * 16  # BN bias, scale, mean, var of the first conv (16 filters), then its 16x3x3x3 kernel
_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(9))


def _weights_with(src: Path, dst: Path, index: slice, value: float) -> Path:
    raw = src.read_bytes()
    floats = np.frombuffer(raw[_HEADER:], dtype=np.float32).copy()
    floats[index] = value
    dst.write_bytes(raw[:_HEADER] + floats.tobytes())
    return dst


def _cfg_with(text: str, dst: Path, old: str, new: str, count: int = 1) -> Path:
    assert old in text
    dst.write_text(text.replace(old, new, count))
    return dst


def _coco(dst: Path, change) -> Path:
    doc = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64},
                      {"id": 2, "file_name": "b.png", "width": 64, "height": 64}],
           "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20]},
                           {"id": 2, "image_id": 2, "category_id": 2, "bbox": [1, 1, 10, 10]}]}
    change(doc)
    dst.write_text(json.dumps(doc))
    return dst


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    t = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    cfg, weights = t / "demo.cfg", t / "demo.weights"
    save(build_model(read_cfg(DEMO_CFG)), cfg, weights)
    data = Path(synthesize(t / "s", n_train=4, n_valid=2, img_size=64, seed=0))
    text = cfg.read_text()
    first_conv = "filters=16\nsize=3\nstride=1\npad=1"
    f = {"t": t, "cfg": cfg, "weights": weights, "data": data, "valid": data.parent / "images" / "valid",
         "nan_weights": _weights_with(weights, t / "nan.weights", slice(_LAYER0 + 100, _LAYER0 + 101), np.nan),
         "inf_weights": _weights_with(weights, t / "inf.weights", slice(5000, 5010), np.inf),
         # finite weights whose products overflow: the outputs are Inf/NaN, the weights pass the load check
         "huge_weights": _weights_with(weights, t / "huge.weights", slice(_LAYER0, _LAYER0 + 432), 3e38),
         "sxy_nan": _cfg_with(text, t / "sxy.cfg", "[yolo]\n", "[yolo]\nscale_x_y=nan\n"),
         "anchor0": _cfg_with(text, t / "anchor0.cfg", "anchors=10,12", "anchors=0,0", count=2),
         "anchor_neg": _cfg_with(text, t / "anchorneg.cfg", "anchors=10,12", "anchors=-10,12"),
         "filters_10mb": _cfg_with(text, t / "bigf.cfg", "filters=16\n", "filters=" + "9" * 10_000_000 + "\n"),
         "padding_1e5": _cfg_with(text, t / "pad.cfg", first_conv, "filters=16\nsize=3\nstride=1\npadding=100000"),
         "shortcut0": _cfg_with(text, t / "sc0.cfg", "from=-3", "from=0"),
         "bomb_yaml": t / "bomb.yaml", "binary": t / "binary.yaml", "py_recipe": t / "py.yaml",
         "bomb_recipe": t / "bombr.yaml", "bad_recipe": t / "bad.yaml", "out": t / "out"}
    for key, value in (("abc", "abc"), ("neg", "-3")):
        f[f"classes_{key}"] = t / "s" / f"classes{value}.data"
        f[f"classes_{key}"].write_text(data.read_text().replace("classes = 3", f"classes = {value}"))
    f["bomb_yaml"].write_text(f"path: {data.parent}\ntrain: images/train\nval: images/valid\n"
                              f"names: [circle, square, triangle]\n{_BOMB}")
    f["bad_yaml"] = t / "s" / "bad.yaml"  # PyYAML's message spans four lines
    f["bad_yaml"].write_text(f"path: {data.parent}\ntrain: [images/train\nval: images/valid\nnames: [a, b, c]\n")
    f["binary"].write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    f["py_recipe"].write_text(f"model: {{cfg: !!python/object/apply:os.system [echo]}}\ndata: {data}\n"
                              "steps:\n  - prune: {method: slim}\n")
    f["bomb_recipe"].write_text(f"model: {{cfg: {cfg}}}\ndata: {data}\n{_BOMB}steps:\n  - prune: {{method: slim}}\n")
    f["bad_recipe"].write_text(f"model: {{cfg: {cfg}\ndata: {data}\nsteps:\n  - prune: {{method: slim}}\n")
    images = t / "coco"
    images.mkdir()
    for name, src in (("a.png", "train_00000.png"), ("b.png", "train_00001.png")):
        (images / name).write_bytes((data.parent / "images" / "train" / src).read_bytes())
    f["coco_images"] = images
    bad_box = {"id": 3, "image_id": 1, "category_id": 1}
    f.update({
        "coco_nan": _coco(t / "nan.json", lambda d: d["annotations"].append({**bad_box, "bbox": [float("nan"), 5, 20, 20]})),
        "coco_abc": _coco(t / "abc.json", lambda d: d["annotations"].append({**bad_box, "bbox": "abc"})),
        "coco_short": _coco(t / "short.json", lambda d: d["annotations"].append({**bad_box, "bbox": [5, 5]})),
        "coco_same_file": _coco(t / "samefile.json", lambda d: d["images"][1].update(file_name="a.png")),
        "coco_newline": _coco(t / "newline.json", lambda d: d["categories"][1].update(name="squ\nare")),
        "coco_dup_id": _coco(t / "dupid.json", lambda d: d["categories"].append({"id": 2, "name": "triangle"})),
    })
    f["coco_deep"] = t / "deep.json"
    f["coco_deep"].write_text('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return f


def cli(capsys, argv: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def check_row(capsys, files: dict[str, Path], argv: list[str], code: int, says: str) -> str:
    """Run one row; its error is one line (the last on stderr) holding `says`, with no traceback."""
    got, err = cli(capsys, [a.format(**files) for a in argv])
    lines = [line for line in err.splitlines() if line.strip()]
    assert got == code, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1, err[-2000:]
    if code == 1:
        assert lines[-1] == errors[0], err[-2000:]
    assert says in errors[0], errors[0][:2000]
    return errors[0]


_ids = lambda rows: [r[0] for r in rows]  # noqa: E731
MODEL = ["--cfg", "{cfg}", "--weights"]
SMALL = ["--img-size", "64"]

# --- info ---------------------------------------------------------------------------------------------------
INFO_ROWS = [
    ("nan-weights", ["info", *MODEL, "{nan_weights}"], 1, "layer 0 [convolutional] (" ),
    ("inf-weights", ["info", *MODEL, "{inf_weights}"], 1, "layer 1 [convolutional]"),
    ("scale_x_y-nan", ["info", "--cfg", "{sxy_nan}"], 1, "scale_x_y=nan is not a finite number"),
    ("anchor-negative", ["info", "--cfg", "{anchor_neg}"], 1, "anchorneg.cfg:164: [yolo] anchors has -10"),
    ("filters-10MB", ["info", "--cfg", "{filters_10mb}"], 1, "bigf.cfg:18: [convolutional] filters='999"),
    ("shortcut-from-0", ["info", "--cfg", "{shortcut0}"], 1, "with from layer 0 (128x128)"),
]


@pytest.mark.parametrize("row", INFO_ROWS, ids=_ids(INFO_ROWS))
def test_info(capsys, files, row):
    _, argv, code, says = row
    check_row(capsys, files, argv, code, says)


# --- eval ---------------------------------------------------------------------------------------------------
EVAL = ["eval", "--data", "{data}", *SMALL, "--workers", "0", "--no-progress"]
EVAL_ROWS = [
    ("nan-weights", [*EVAL, *MODEL, "{nan_weights}"], 1, "nan.weights: layer 0 [convolutional]"),
    # no made-up mAP and no NaN in --json: the first layer with a non-finite output is named instead
    ("inf-outputs", [*EVAL, *MODEL, "{huge_weights}", "--json", "{out}/d.json"], 1,
     "layer 0 [convolutional] (" ),
    ("scale_x_y-nan", [*EVAL, "--cfg", "{sxy_nan}", "--weights", "{weights}"], 1, "scale_x_y=nan"),
    ("padding-1e5", [*EVAL, "--cfg", "{padding_1e5}"], 1, "inference needs about"),
    ("classes-abc", ["eval", "--cfg", "{cfg}", "--data", "{classes_abc}", *SMALL], 1,
     "classesabc.data:1: classes = abc is not a class count"),
    ("classes-negative", ["eval", "--cfg", "{cfg}", "--data", "{classes_neg}", *SMALL], 1,
     "classes-3.data:1: classes = -3"),
    ("data-yaml-syntax-one-line", ["eval", "--cfg", "{cfg}", "--data", "{bad_yaml}", *SMALL], 1,
     "bad.yaml:2: not valid YAML ("),
    ("data-yaml-alias-bomb", ["eval", "--cfg", "{cfg}", "--data", "{bomb_yaml}", *SMALL], 1,
     "bomb.yaml:6: not valid YAML (an alias (*a) is not accepted here"),
]


@pytest.mark.parametrize("row", EVAL_ROWS, ids=_ids(EVAL_ROWS))
def test_eval(capsys, files, row):
    _, argv, code, says = row
    check_row(capsys, files, argv, code, says)
    assert not (files["out"] / "d.json").exists()


def test_eval_refuses_an_input_size_beyond_memory_before_allocating(capsys, files):
    """yolov3 at 4096: the estimate (about 100 GiB at batch 8) beats any CI machine; refused in seconds."""
    cfg = require_assets() / "cfg" / "yolov3.cfg"
    start = time.perf_counter()
    error = check_row(capsys, files, ["eval", "--cfg", str(cfg), "--data", "{data}", "--img-size", "4096",
                                      "--workers", "0"], 1, "4096x4096 input, batch 8: inference needs about")
    assert re.search(r"GiB are free on cpu; use a smaller --img-size", error)
    assert time.perf_counter() - start < 60  # not an allocation attempt (generous: shared CI cores)


# --- detect -------------------------------------------------------------------------------------------------
DETECT = ["detect", "--source", "{valid}", "--out", "{out}/det", *SMALL]
DETECT_ROWS = [
    ("inf-weights", [*DETECT, *MODEL, "{inf_weights}"], 1, "inf.weights: layer 1 [convolutional]"),
    ("inf-outputs", [*DETECT, *MODEL, "{huge_weights}"], 1, "is the first to output NaN/Inf"),
]


@pytest.mark.parametrize("row", DETECT_ROWS, ids=_ids(DETECT_ROWS))
def test_detect(capsys, files, row):
    _, argv, code, says = row
    check_row(capsys, files, argv, code, says)
    assert not (files["out"] / "det").exists()


# --- prune, quantize ----------------------------------------------------------------------------------------
PRUNE_ROWS = [
    ("nan-weights", ["prune", *MODEL, "{nan_weights}", "--out", "{out}/p"], 1, "layer 0 [convolutional]"),
]
QUANTIZE_ROWS = [
    ("nan-weights", ["quantize", *MODEL, "{nan_weights}", "--data", "{data}", *SMALL, "--out", "{out}/q"], 1,
     "nan.weights: layer 0 [convolutional]"),
    # finite weights, Inf activations: refused at calibration, before any artifact is written
    ("inf-outputs", ["quantize", *MODEL, "{huge_weights}", "--data", "{data}", *SMALL, "--out", "{out}/q"], 1,
     "calibration: layer 0 [convolutional]"),
    ("seed-65-bits", ["quantize", "--cfg", "{cfg}", "--out", "{out}/q", "--seed", str(2 ** 64)], 2,
     "Invalid value for '--seed'"),
]


@pytest.mark.parametrize("row", PRUNE_ROWS + QUANTIZE_ROWS, ids=_ids(PRUNE_ROWS) + _ids(QUANTIZE_ROWS))
def test_prune_quantize(capsys, files, row):
    _, argv, code, says = row
    check_row(capsys, files, argv, code, says)
    assert not (files["out"] / "p").exists() and not (files["out"] / "q").exists()


# --- train ---------------------------------------------------------------------------------------------------
TRAIN = ["train", "--cfg", "{cfg}", "--data", "{data}", "--out", "{out}/tr", *SMALL]
TRAIN_ROWS = [
    ("seed-beyond-64-bits", [*TRAIN, "--seed", "99999999999999999999999"], 2, "Invalid value for '--seed'"),
    ("binary-hyp", [*TRAIN, "--hyp", "{binary}"], 1, "binary.yaml: not a text file (byte 0 is not UTF-8)"),
    ("hyp-syntax-one-line", [*TRAIN, "--hyp", "{bad_yaml}"], 1, "bad.yaml:2: not valid YAML ("),
    ("hyp-alias-bomb", [*TRAIN, "--hyp", "{bomb_recipe}"], 1, "not valid YAML (an alias"),
    # parse accepts 0 (a published VisDrone cfg has one; Darknet infers zero-size boxes); training refuses it
    ("anchor-0", ["train", "--cfg", "{anchor0}", "--data", "{data}", "--out", "{out}/tr", *SMALL], 1,
     "anchor0.cfg:206: [yolo] mask uses an anchor of size 0"),
]


@pytest.mark.parametrize("row", TRAIN_ROWS, ids=_ids(TRAIN_ROWS))
def test_train(capsys, files, row):
    _, argv, code, says = row
    check_row(capsys, files, argv, code, says)


# --- data synth, data convert ---------------------------------------------------------------------------------
CONVERT = ["data", "convert", "--from", "coco", "--images", "{coco_images}", "--out", "{out}/cv", "--src"]
DATA_ROWS = [
    ("synth-seed-negative", ["data", "synth", "--out", "{out}/sy", "--seed", "-5"], 2, "Invalid value for '--seed'"),
    ("coco-deep-json", [*CONVERT, "{coco_deep}"], 1, "deep.json: not a COCO instances json (nested too deeply)"),
    ("coco-same-file-name", [*CONVERT, "{coco_same_file}"], 1, "two images become a.png"),
    ("coco-name-with-newline", [*CONVERT, "{coco_newline}"], 1, "category id 2 has the name 'squ\\nare'"),
    ("coco-duplicate-category-id", [*CONVERT, "{coco_dup_id}"], 1, "category id 2 is listed twice"),
]


@pytest.mark.parametrize("row", DATA_ROWS, ids=_ids(DATA_ROWS))
def test_data(capsys, files, row):
    _, argv, code, says = row
    check_row(capsys, files, argv, code, says)
    assert not (files["out"] / "cv").exists() and not (files["out"] / "sy").exists()


@pytest.mark.parametrize("source, reason", [
    ("coco_nan", "box: NaN or infinite coordinates"),
    ("coco_abc", "box: bbox or image size not numbers"),
    ("coco_short", "box: bbox or image size not numbers"),
])
def test_convert_skips_and_counts_malformed_boxes(capsys, files, tmp_path, source, reason):
    """A NaN box is not a full-width box; `"abc"`/`[5, 5]` are not a TypeError: skipped, counted, the rest kept."""
    code, err = cli(capsys, ["data", "convert", "--from", "coco", "--src", str(files[source]), "--images",
                             str(files["coco_images"]), "--out", str(tmp_path / "cv")])
    assert code == 0, err
    report = json.loads((tmp_path / "cv" / "convert.json").read_text())["train"]
    assert report["boxes"] == 2 and report["skipped"] == {reason: 1}
    labels = sorted((tmp_path / "cv" / "labels" / "train").glob("*.txt"))
    assert [len(p.read_text().splitlines()) for p in labels] == [1, 1]  # only the two good boxes


# --- run (recipes) -------------------------------------------------------------------------------------------
RUN_ROWS = [
    ("alias-bomb", ["run", "{bomb_recipe}", "--dry-run"], 1, "bombr.yaml:4: not valid YAML (an alias (*a)"),
    ("python-tag", ["run", "{py_recipe}", "--dry-run"], 1,
     "py.yaml:1: not valid YAML (the tag 'tag:yaml.org,2002:python/object/apply:os.system' is not accepted"),
    ("binary", ["run", "{binary}", "--dry-run"], 1, "not a text file"),
    ("syntax-one-line", ["run", "{bad_recipe}", "--dry-run"], 1, "bad.yaml:1: not valid YAML (expected ',' or '}'"),
]


@pytest.mark.parametrize("row", RUN_ROWS, ids=_ids(RUN_ROWS))
def test_run(capsys, files, row):
    _, argv, code, says = row
    error = check_row(capsys, files, argv, code, says)
    assert "Tracked(" not in error


def test_alias_bomb_is_refused_fast(files):
    """The 12-line bomb took 87 s to refuse inside a recipe; the loader stops at the first alias."""
    from compress.recipe.spec import parse_recipe
    start = time.perf_counter()
    with pytest.raises(CompressError, match="alias"):
        parse_recipe(files["bomb_recipe"])
    assert time.perf_counter() - start < 5


# --- resume state and caches a run left behind ----------------------------------------------------------------

def test_garbage_qat_resume_record(tmp_path):
    from compress.quant.config import make_config
    from compress.quant.qat import CONFIG_NAME, check_resume_config
    config = make_config("google", 8, 8)
    (tmp_path / CONFIG_NAME).write_text("garbage{")
    with pytest.raises(QuantError, match=r"quant_config.json: not valid JSON .*; start again without --resume"):
        check_resume_config(tmp_path, "demo.cfg", config)
    (tmp_path / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(QuantError, match=r"expected a JSON object, found list"):
        check_resume_config(tmp_path, "demo.cfg", config)


class _Payload:
    """Unpickling this would create a folder: proof that code in the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def _kd_hook():
    from compress.distill.config import DistillConfig
    from compress.distill.hook import DistillHook
    teacher = student = build_model(parse_cfg(DEMO_CFG.read_text()))
    hook = DistillHook(teacher, DistillConfig(strategy=4, feature="fitnet"))
    hook.setup(student.train(), (64, 64))
    return hook


def test_kd_resume_state_without_calibration_and_hostile_adapters(tmp_path):
    from compress.distill.hook import ADAPTER_FILE, STATE_FILE
    hook = _kd_hook()
    (tmp_path / STATE_FILE).write_text('{"shares": []}')
    with pytest.raises(DistillError, match=r"kd_state.json: field 'calibration' is missing"):
        hook._load_state(tmp_path / STATE_FILE)
    (tmp_path / STATE_FILE).write_text(json.dumps({"calibration": {"n": 1}}))
    with pytest.raises(DistillError, match=r"'calibration' is not a calibration state \(KeyError"):
        hook._load_state(tmp_path / STATE_FILE)
    (tmp_path / STATE_FILE).write_text(json.dumps({"calibration": hook.calibrator.state_dict()}))
    marker = tmp_path / "pwned"
    torch.save([_Payload(marker)], tmp_path / ADAPTER_FILE)
    with pytest.raises(DistillError, match=r"kd_adapters.pt: refused: not the adapter state this run wrote"):
        hook._load_state(tmp_path / STATE_FILE)
    assert not marker.exists()


def test_wrong_shape_npy_in_a_reused_disk_cache_is_decoded_again(files, tmp_path):
    images = sorted(files["valid"].glob("*.png"))
    ds = DetectionDataset(images, 64, cache="disk", cache_dir=tmp_path)
    planted = ds.cache._file(0)
    np.save(planted, np.zeros((5, 5), np.uint8))  # another run's or an edited file under the same name
    img = ds[0][0]
    assert img.shape == (3, 64, 64)
    assert np.load(planted).shape[2] == 3  # rewritten with the real decode


# --- cfg values --------------------------------------------------------------------------------------------------

def test_repeated_cfg_key_takes_the_first_value_like_opencv(capsys, caplog, tmp_path):
    """Darknet's option_find and OpenCV's reader take the first of a repeated key (the last would build another
    network: 1,402,344 vs 1,404,896 params on the demo); our outputs match OpenCV's on the real yolov3-tiny pair
    with its first conv's filters= repeated, and the repetition is one warning line."""
    import cv2
    from test_opencv_parity import _compare
    weights = require_assets() / "weights" / "yolov3-tiny.weights"
    text = (ASSETS / "weights" / "yolov3-tiny.cfg").read_text()
    dup = _cfg_with(text, tmp_path / "dup.cfg", "filters=16\n", "filters=16\nfilters=8\n")
    code, err = cli(capsys, ["info", "--cfg", str(dup), "--weights", str(weights)])
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "repeated" in r.getMessage()]
    assert len(warnings) == 1 and "filters=8 (line" in warnings[0] and "the first value is used" in warnings[0]
    assert read_cfg(dup).blocks[0].get_int("filters") == 16
    rng = np.random.default_rng(0)
    blob = cv2.dnn.blobFromImage(rng.integers(0, 255, (416, 416, 3), np.uint8), 1 / 255, (416, 416), swapRB=True)
    box_err, cls_err, _ = _compare(dup, weights, blob)
    assert box_err < 1e-4 and cls_err < 1e-4


# --- Ctrl-C --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("presses", [1, 3])
def test_ctrl_c_prints_interrupted_and_exits_130(tmp_path, presses):
    """README: Ctrl-C prints `Interrupted.` and exits 130 (not click's `Aborted.`); pressed three times, the
    process still ends with 130 and the message, not by the signal (-2) without a word."""
    out = tmp_path / "syn"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "compress", "data", "synth", "--n-train", "100000", "--out",
                             str(out)], stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for _ in range(300):  # started writing: past the imports, inside the command
            if (out / "images").is_dir() or proc.poll() is not None:
                break
            time.sleep(0.1)
        for _ in range(presses):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.02)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "Interrupted.", err
