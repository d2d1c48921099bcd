"""Every registered method produces valid masks; policy knobs (percent limit, round-to, floors); layer pruning."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from compress.darknet.cfg import format_cfg, parse_cfg, read_cfg
from compress.base.errors import PruneError
from compress.darknet.model import build_model
from compress.prune import METHODS, PruneConfig, prune, select_mask
from compress.prune.blocks import remove_blocks
from compress.prune.coupling import build_coupling, prunable_layers, residual_units
from compress.prune.mask import validate_mask
from compress.prune.registry import DEFAULT_ROUND_TO

from conftest import DATA, randomize_bn

CHANNEL_METHODS = sorted(n for n, p in METHODS.items() if p.kind == "channel")


def _model(path: Path, seed: int = 0):
    return randomize_bn(build_model(read_cfg(path)), seed).eval()


def test_registry_has_every_method() -> None:
    assert set(METHODS) == {"normal", "regular", "shortcut", "slim", "layer", "layer-channel", "group-norm", "l1",
                            "taylor"}


@pytest.mark.parametrize("method", CHANNEL_METHODS)
@pytest.mark.parametrize("round_to", [None, 4])
def test_channel_methods_give_valid_masks(method: str, round_to: int | None) -> None:
    model = _model(DATA / "tiny-shortcut.cfg")
    coupling = build_coupling(model.graph)
    mask, info = select_mask(model, PruneConfig(method=method, percent=0.6, round_to=round_to, min_keep=0.05))
    assert mask and validate_mask(coupling, mask).keys() == mask.keys()
    n = round_to or METHODS[method].default_round_to
    for i, keep in mask.items():
        width, kept = len(keep), int(keep.sum())
        assert 1 <= kept < width and i not in coupling.fixed
        assert kept % n == 0 or kept == width
        assert all(torch.equal(mask[j], keep) for j in coupling.group_of[i])  # coupled groups identical
    result = prune(model, PruneConfig(method=method, percent=0.6, round_to=round_to, min_keep=0.05))
    assert result.model.eval()(torch.rand(1, 3, 64, 64)).shape[1] == model(torch.rand(1, 3, 64, 64)).shape[1]


def test_masks_are_deterministic_with_ties() -> None:
    model = _model(DATA / "tiny-v4-groups.cfg")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.fill_(0.5)
    a, _ = select_mask(model, PruneConfig(method="regular", percent=0.5))
    b, _ = select_mask(copy.deepcopy(model), PruneConfig(method="regular", percent=0.5))
    assert a.keys() == b.keys() and all(torch.equal(a[i], b[i]) for i in a)


@pytest.mark.parametrize("method", ["normal", "shortcut"])
def test_percent_too_high_names_layer_and_safe_percent(assets: Path, method: str) -> None:
    model = _model(assets / "weights" / "yolov3-tiny.cfg")
    _, info = select_mask(model, PruneConfig(method=method, percent=0.1))
    safe = info["safe_percent"]
    with pytest.raises(PruneError, match=rf"largest safe --percent is {safe} \(limited by layer \d+\)"):
        select_mask(model, PruneConfig(method=method, percent=min(0.99, safe + 0.05)))
    mask, _ = select_mask(model, PruneConfig(method=method, percent=safe))  # the suggestion itself works
    assert all(bool(m.any()) for m in mask.values())
    floored, _ = select_mask(model, PruneConfig(method=method, percent=0.99, min_keep=0.1))
    assert all(int(m.sum()) >= int(0.1 * len(m)) for m in floored.values())


def _largest_accepted_percent(model, method: str) -> float:
    """Bisection on select_mask itself: the largest --percent it accepts (to ~1e-6)."""
    lo, hi = 0.0, 0.9999
    for _ in range(20):
        mid = (lo + hi) / 2
        try:
            select_mask(model, PruneConfig(method=method, percent=mid))
            lo = mid
        except PruneError:
            hi = mid
    return lo


@pytest.mark.parametrize("cfg", ["tiny-shortcut", "yolov3"])
def test_shortcut_safe_percent_is_the_boundary_of_its_own_threshold(assets: Path, cfg: str) -> None:
    """The threshold runs over every mode-1 gamma (chain members included): the suggested percent must be the
    largest accepted one (floored to 4 decimals), and the error must name that same value."""
    path = DATA / "tiny-shortcut.cfg" if cfg == "tiny-shortcut" else assets / "cfg" / "yolov3.cfg"
    model = _model(path, seed=3)
    _, info = select_mask(model, PruneConfig(method="shortcut", percent=0.01))
    safe, boundary = info["safe_percent"], _largest_accepted_percent(model, "shortcut")
    n = sum(model.graph.channels[i] for i in prunable_layers(build_coupling(model.graph), 1))
    assert safe <= boundary < safe + 1e-4 + 1 / n  # thr = sorted[floor(N * p)]: one gamma = 1/N of percent
    select_mask(model, PruneConfig(method="shortcut", percent=safe))  # the suggestion itself works
    too_high = min(0.9999, boundary + 1e-4)
    with pytest.raises(PruneError, match=rf"largest safe --percent is {safe} \(limited by layer \d+\)"):
        select_mask(model, PruneConfig(method="shortcut", percent=too_high))


def test_regular_rounds_up_within_width() -> None:
    model = _model(DATA / "tiny-v4-groups.cfg")
    mask, _ = select_mask(model, PruneConfig(method="regular", percent=0.3))
    assert all(int(m.sum()) % 8 == 0 or int(m.sum()) == len(m) for m in mask.values())
    mask, _ = select_mask(model, PruneConfig(method="regular", percent=0.95))  # emptied layers keep 8 (or all)
    assert all(int(m.sum()) == min(8, len(m)) for m in mask.values())


def test_slim_union_keeps_channel_kept_by_any_member() -> None:
    model = _model(DATA / "tiny-shortcut.cfg")
    with torch.no_grad():
        for i in (1, 3, 6):
            model.layers[i].bn.weight.fill_(1e-3)
        model.layers[6].bn.weight[5] = 2.0  # only one member keeps channel 5
    mask, _ = select_mask(model, PruneConfig(method="slim", percent=0.5, round_to=1))  # the reference's widths
    # layers 1 and 3 keep their floor of 1 channel (all tied -> lowest index 0), layer 6 keeps 5: union {0, 5}
    expected = (torch.arange(16) == 0) | (torch.arange(16) == 5)
    assert all(torch.equal(mask[i], expected) for i in (1, 3, 6))


def test_config_validation() -> None:
    with pytest.raises(PruneError, match="unknown"):
        PruneConfig(method="magic")
    with pytest.raises(PruneError, match="--percent"):
        PruneConfig(percent=1.0)
    with pytest.raises(PruneError, match="--shortcuts"):
        prune(_model(DATA / "tiny-shortcut.cfg"), PruneConfig(method="layer"))


@pytest.mark.parametrize("name, n", [("yolov3", 8), ("yolov4", 6)])
def test_layer_pruning_removes_3n_blocks_and_is_exact_on_dead_branches(assets: Path, name: str, n: int) -> None:
    model = _model(assets / "cfg" / f"{name}.cfg")
    units = residual_units(model.graph)
    assert len(units) == 23
    result = prune(model, PruneConfig(method="layer", shortcuts=n))
    assert len(result.removed_blocks) == 3 * n == len(model.cfg.blocks) - len(result.model.cfg.blocks)
    again = build_model(parse_cfg(format_cfg(result.model.cfg)))
    assert len(again.heads) == 3
    # zero gamma AND beta of the removed branches' last conv: removing them is then exact
    dead = copy.deepcopy(model)
    with torch.no_grad():
        for s in result.info["removed_units"]:
            dead.layers[units[s][1]].bn.weight.zero_()
            dead.layers[units[s][1]].bn.bias.zero_()
    x = torch.rand(1, 3, 64, 64)
    small = prune(dead, PruneConfig(method="layer", shortcuts=n)).model.eval()
    with torch.no_grad():
        for a, b in zip(small(x, raw=True), dead(x, raw=True)):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_layer_pruning_folds_the_removed_branch_constant() -> None:
    """gamma zeroed, beta kept on a removed branch: the constant act(beta) reaches the next 1x1 conv exactly."""
    model = _model(DATA / "tiny-shortcut.cfg")
    with torch.no_grad():
        model.layers[15].bn.weight.zero_()  # unit (14, 15, 16) feeds conv 17 (1x1)
        model.layers[15].bn.bias.mul_(30)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x, raw=True)
        got = remove_blocks(model, {14, 15, 16}, {15: torch.zeros(64, dtype=torch.bool)}).eval()(x, raw=True)
        plain = remove_blocks(model, {14, 15, 16}, compensate=False).eval()(x, raw=True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    assert max((a - b).abs().max() for a, b in zip(plain, ref)) > 1e-2


def test_remove_blocks_remaps_negative_and_multi_input_routes() -> None:
    model = _model(DATA / "tiny-shortcut.cfg")
    new = remove_blocks(model, {2, 3, 4})  # first unit of the first chain
    by_line = {b.line: b for b in new.cfg.blocks}
    old = {b.line: b for b in model.cfg.blocks}
    route = old[model.cfg.blocks[23].line]
    assert route.get("layers") == "-1,12" and by_line[route.line].get("layers") == "-1,9"
    assert by_line[old[model.cfg.blocks[7].line].line].get("from") == "-3"  # now reads the downsample conv 1
    assert new.graph.inputs[4] == (3, 1)
    with pytest.raises(PruneError, match="reads layer 17"):
        remove_blocks(model, {17})


def test_layer_channel_composes_slim_then_layer() -> None:
    model = _model(DATA / "tiny-shortcut.cfg")
    result = prune(model, PruneConfig(method="layer-channel", percent=0.5, shortcuts=1))
    assert len(result.removed_blocks) == 3 and result.mask
    assert len(result.model.cfg.blocks) == len(model.cfg.blocks) - 3
    assert sum(p.numel() for p in result.model.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("method", ["slim", "normal", "shortcut"])
def test_channel_methods_round_to_8_by_default_and_1_gives_the_reference_widths(method: str) -> None:
    """Odd widths run slowly (issue 23): by default every kept count is a multiple of 8 (or the whole layer);
    --round-to 1 keeps the reference's exact threshold widths."""
    model = _model(DATA / "tiny-shortcut.cfg")
    randomize_bn(model)
    assert METHODS[method].default_round_to == DEFAULT_ROUND_TO == 8
    mask, _ = select_mask(model, PruneConfig(method=method, percent=0.6, min_keep=0.05))
    assert mask and all(int(m.sum()) % 8 == 0 or int(m.sum()) == len(m) for m in mask.values())
    exact, _ = select_mask(model, PruneConfig(method=method, percent=0.6, min_keep=0.05, round_to=1))
    assert any(int(m.sum()) % 8 for m in exact.values())  # the unrounded widths differ: rounding did something
