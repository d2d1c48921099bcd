"""Pruning to a target (issue 25): latency tables (IO, cache keys, interpolation), the width search on a fake
latency table (reaches the target, honours couplings and channel multiples, deterministic, least importance per
ms first), FLOPs/params targets against the independent count of the built model, the prune/info options, and
the one-layer ncnn model the tables time (its output against torch's conv). No timing assertions."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.base.errors import CfgError, ExportError, PruneError
from compress.cli import cli
from compress.darknet.block import Block
from compress.darknet.cfg import read_cfg
from compress.darknet.layers import ConvBNAct
from compress.darknet.model import build_model
from compress.darknet.persist import save
from compress.darknet.summary import summarize
from compress.deploy.latency import LATENCY_RUNTIMES, layer_module, measure_table
from compress.deploy.latency_table import (LatencyTable, LayerTiming, TableKey, find_table, machine_id,
                                           model_fingerprint, read_tables, store_table)
from compress.jobs import InfoJob, PruneJob, SparseTrainJob, run_job
from compress.prune import PruneConfig, prune
from compress.prune.costs import ConvCost, LatencyCost, Target
from compress.prune.coupling import build_coupling
from compress.prune.latency_target import areas
from compress.prune.registry import LAYER_KEEP
from compress.prune.layout import build_layout, cuttable_groups, table_grid
from compress.prune.search import allowed_widths

from conftest import DEMO_CFG, randomize_bn

SIZE = 128


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_bn(build_model(read_cfg(DEMO_CFG)).eval(), seed=3)


def _key(model, runtime: str = "fake", threads: int = 1) -> TableKey:
    return TableKey("test cpu | avx2", runtime, "0", threads, (SIZE, SIZE), model_fingerprint(model.cfg))


def fake_ms(i: int, c_in: float, c_out: float, area: int) -> float:
    """A made-up per-conv latency: one weight per layer, bilinear in the widths, plus a per-call constant."""
    return 0.01 + (1 + i % 3) * c_in * c_out * area * 1e-7


def fake_table(model, multiple: int = 4, rest: float = 1.0) -> LatencyTable:
    """A table on the grid the real measurement would use, filled with fake_ms (exact under bilinear
    interpolation); the whole model = the convs + `rest`."""
    coupling = build_coupling(model.graph)
    grid = table_grid(build_layout(coupling, cuttable_groups(coupling)), multiple)
    area = areas(model, SIZE)
    layers = tuple(LayerTiming(i, "convolutional", g.in_widths, g.out_widths,
                               tuple(tuple(fake_ms(i, o if g.tied else c, o, area[i]) for o in g.out_widths)
                                     for c in g.in_widths)) for i, g in sorted(grid.items()))
    whole = sum(t.full_ms for t in layers) + rest
    return LatencyTable(_key(model), whole, layers)


def true_fake_ms(pruned, rest: float = 1.0) -> float:
    """fake_ms of a pruned model from ITS OWN graph (what surgery built), not from the planner's layout."""
    area = areas(pruned, SIZE)
    g = pruned.graph
    return rest + sum(fake_ms(i, g.in_channels(i), g.channels[i], area[i])
                      for i, s in enumerate(g.sections) if s.conv)


# --- the latency table: interpolation, keys, file -----------------------------------------------------------

def test_layer_timing_interpolates_bilinearly_and_monotone():
    t = LayerTiming(3, "convolutional", (8, 16), (8, 16, 32),
                    ((1.0, 2.0, 4.0), (2.0, 4.0, 8.0)))
    assert t.at(8, 16) == pytest.approx(2.0)
    assert t.at(12, 24) == pytest.approx(4.5)           # bilinear between the four corners
    assert t.at(16, 40) == pytest.approx(10.0)          # beyond the grid: the last segment extended
    assert t.at(1, 1) >= 0.0
    noisy = LayerTiming(3, "convolutional", (8,), (8, 16, 24), ((1.0, 3.0, 2.0),))  # 24 measured faster than 16
    assert noisy.at(8, 24) == pytest.approx(3.0) and noisy.full_ms == 2.0   # raw kept, lookup made monotone
    with pytest.raises(ExportError, match="layer 3"):
        LayerTiming(3, "convolutional", (8, 8), (8,), ((1.0,), (1.0,)))


def test_machine_id_names_cpu_and_isa_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nmodel name : Test CPU 9000\nflags : fpu avx2 fma avx512f avx512_vnni sse\n")
    assert machine_id(info) == "Test CPU 9000 | avx2 fma avx512f avx512_vnni"
    assert "|" in machine_id(tmp_path / "missing")


def test_fingerprint_follows_structure_not_weights(model):
    pruned = prune(model, PruneConfig(method="slim", percent=0.3)).model
    assert model_fingerprint(model.cfg) == model_fingerprint(build_model(model.cfg).cfg)
    assert model_fingerprint(pruned.cfg) != model_fingerprint(model.cfg)


def test_table_file_keeps_one_table_per_key(model, tmp_path):
    path = tmp_path / "lat.json"
    assert read_tables(path) == [] and find_table(path, _key(model)) is None
    a = fake_table(model)
    b = replace(a, key=_key(model, threads=2), model_ms=a.model_ms * 0.6)
    store_table(path, a)
    store_table(path, b)
    store_table(path, replace(a, model_ms=123.0))       # same key: replaced, not added
    tables = read_tables(path)
    assert len(tables) == 2
    assert find_table(path, a.key).model_ms == 123.0 and find_table(path, b.key).model_ms == b.model_ms
    assert find_table(path, a.key).layers == a.layers   # round trip through JSON
    assert find_table(path, replace(a.key, runtime_version="1")) is None   # another version: not reused


def test_table_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ExportError, match="bad.json"):
        read_tables(bad)
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ExportError, match="bad.json: not a yolo-compress latency tables file"):
        read_tables(bad)


# --- the search on a fake table -------------------------------------------------------------------------------

@pytest.mark.parametrize("method,ratio,multiple", [("slim", 0.5, 4), ("slim", 0.7, 8), ("l1", 0.6, 4),
                                                   ("shortcut", 0.6, 4)])
def test_plan_reaches_latency_target_with_couplings_and_multiples(model, method, ratio, multiple):
    table = fake_table(model, multiple)
    cost = LatencyCost(table, areas(model, SIZE), multiple=multiple)
    result = prune(model, PruneConfig(method=method, target=Target("latency", ratio=ratio)), cost)
    plan = result.info["plan"]
    true = true_fake_ms(result.model)
    assert plan["predicted"] == pytest.approx(true, rel=1e-9)           # layout prediction == built model
    assert true <= ratio * table.model_ms
    assert true > ratio * table.model_ms * 0.85                         # not pruned far past the target
    coupling = build_coupling(model.graph)
    after = result.model.graph.channels
    for group in coupling.groups:
        widths = {after[i] for i in group}
        assert len(widths) == 1                                          # coupled convs keep equal widths
        (w,) = widths
        full = model.graph.channels[group[0]]
        assert w == full or w % multiple == 0                            # the runtime's channel multiple
    assert plan["multiple"] == multiple and plan["reached"]


def test_plan_is_deterministic_and_keeps_top_channels(model):
    table = fake_table(model)
    cost = LatencyCost(table, areas(model, SIZE), multiple=4)
    config = PruneConfig(method="slim", target=Target("latency", ratio=0.6))
    a, b = prune(model, config, cost), prune(model, config, cost)
    assert a.info["plan"] == b.info["plan"]
    assert all(torch.equal(a.mask[i], b.mask[i]) for i in a.mask)
    gammas = {i: model.layers[i].bn.weight.detach().abs() for i in a.mask}
    for i, keep in a.mask.items():                                      # singletons: kept = the top |gamma|
        if len(build_coupling(model.graph).group_of[i]) == 1 and not keep.all():
            assert gammas[i][keep].min() >= gammas[i][~keep].max()


def test_first_step_cuts_least_importance_per_ms(model):
    """Equal importance everywhere: the first step goes to the group that saves the most ms per channel cut."""
    flat = randomize_bn(build_model(model.cfg).eval(), seed=3)
    for layer in flat.layers:
        if getattr(layer, "bn", None) is not None:
            layer.bn.weight.data.fill_(1.0)
    cost = LatencyCost(fake_table(flat), areas(flat, SIZE), multiple=4)
    result = prune(flat, PruneConfig(method="slim", target=Target("latency", ratio=0.999)), cost)
    plan = result.info["plan"]
    assert plan["steps"] == 1
    (cut,) = [g["layers"] for g in plan["groups"] if g["after"] < g["before"]]
    layout = build_layout(build_coupling(flat.graph), [tuple(g["layers"]) for g in plan["groups"]])
    full, per_channel = list(layout.full), []
    for n, g in enumerate(layout.groups):
        ladder = allowed_widths(layout.full[n], 4, 0.01)
        if len(ladder) < 2:
            continue
        trial = full[:n] + [ladder[1]] + full[n + 1:]
        saved = sum(cost.layer(i, layout.in_width(i, full), layout.out_width(i, full))
                    - cost.layer(i, layout.in_width(i, trial), layout.out_width(i, trial)) for i in layout.blocks)
        per_channel.append((saved / (layout.full[n] - ladder[1]), g))
    assert tuple(cut) == max(per_channel)[1]


def test_unreachable_target_names_the_option(model):
    cost = LatencyCost(fake_table(model, rest=1e6), areas(model, SIZE), multiple=4)   # convs ~ nothing of it
    with pytest.raises(PruneError, match="--target-latency 0.5 is out of reach"):
        prune(model, PruneConfig(method="slim", target=Target("latency", ratio=0.5)), cost)
    best = prune(model, PruneConfig(method="slim", target=Target("latency", ratio=0.5, best_effort=True)), cost)
    assert not best.info["plan"]["reached"]


@pytest.mark.parametrize("metric,figure", [("flops", "gflops"), ("params", "params")])
def test_flops_and_params_targets_match_the_count_of_the_built_model(model, metric, figure):
    result = prune(model, PruneConfig(method="slim", target=Target(metric, ratio=0.5)),
                   ConvCost(model, metric, SIZE))
    before, after = summarize(model, (SIZE, SIZE)), summarize(result.model, (SIZE, SIZE))
    achieved = getattr(after, figure) / getattr(before, figure)
    assert achieved == pytest.approx(result.info["plan"]["predicted_ratio"], rel=1e-6)   # summarize counts anew
    assert 0.45 < achieved <= 0.5


def test_flops_target_on_depthwise_model(assets):
    """yolo-fastest-1.1: depthwise convs are cut with their producer (tied widths), the count still matches."""
    m = build_model(read_cfg(assets / "weights" / "yolo-fastest-1.1.cfg")).eval()
    result = prune(m, PruneConfig(method="l1", target=Target("flops", ratio=0.6)))
    size = m.cfg.width
    achieved = summarize(result.model, (size, size)).gflops / summarize(m, (size, size)).gflops
    assert achieved == pytest.approx(result.info["plan"]["predicted_ratio"], rel=1e-6) and achieved <= 0.6
    coupling = build_coupling(m.graph)
    layout = build_layout(coupling, cuttable_groups(coupling))
    assert any(layout.tied(i) for i in layout.convs)


def test_target_refused_where_it_cannot_apply(model):
    with pytest.raises(PruneError, match="--method layer cannot prune to a target"):
        PruneConfig(method="layer", target=Target("flops", ratio=0.5))
    with pytest.raises(PruneError, match=r"--target-flops 1.5 must be a ratio in \(0, 1\)"):
        Target("flops", ratio=1.5)
    with pytest.raises(PruneError, match="needs measured per-layer latencies"):
        prune(model, PruneConfig(method="slim", target=Target("latency", ratio=0.5)))


# --- the per-layer floor: 0.5 for a target search unless given, 0.01 for --percent -----------------------------

def _below_half(mask) -> list[int]:
    return [i for i, m in mask.items() if int(m.sum()) < len(m) // 2]


@pytest.mark.parametrize("metric,ratio", [("latency", 0.55), ("flops", 0.4)])
def test_target_search_keeps_half_of_every_layer_by_default(model, metric, ratio):
    """No --layer-keep: a target search keeps >= half of every cut layer (LAYER_KEEP.target) and reports that
    floor; an explicit --layer-keep 0.01 with the same target still wins and goes lower."""
    cost = (LatencyCost(fake_table(model), areas(model, SIZE), multiple=4) if metric == "latency"
            else ConvCost(model, metric, SIZE))
    target = Target(metric, ratio=ratio)   # the fake table's floor-0.5 plan predicts 0.46 at best
    config = PruneConfig(method="slim", target=target)
    assert config.layer_keep is None and config.keep_floor == LAYER_KEEP.target == 0.5
    floored = prune(model, config, cost)
    assert floored.mask and not _below_half(floored.mask) and floored.info["layer_keep"] == 0.5
    assert any(int(m.sum()) < len(m) for m in floored.mask.values())     # it did cut
    bare = prune(model, PruneConfig(method="slim", target=target, layer_keep=0.01), cost)
    assert _below_half(bare.mask) and bare.info["layer_keep"] == 0.01


def test_percent_keeps_its_default_floor(model):
    """--percent without --layer-keep keeps the methods' 0.01: the same cut as --layer-keep 0.01 given, layers
    may go below half, and the report names 0.01."""
    config = PruneConfig(method="slim", percent=0.8, round_to=1)
    assert config.keep_floor == LAYER_KEEP.percent == 0.01
    default = prune(model, config)
    given = prune(model, PruneConfig(method="slim", percent=0.8, round_to=1, layer_keep=0.01))
    assert all(torch.equal(default.mask[i], given.mask[i]) for i in given.mask) and set(default.mask) == set(given.mask)
    assert _below_half(default.mask) and default.info["layer_keep"] == 0.01
    assert PruneConfig(method="l1", threshold=0.0).keep_floor == 0.01   # a --threshold cut is not a target search
    with pytest.raises(PruneError, match=r"--layer-keep 1.5 must be a fraction in \[0, 1\]"):
        PruneConfig(method="slim", layer_keep=1.5)


def test_cli_and_job_leave_the_floor_to_the_kind_of_plan(pair, tmp_path):
    """CLI and job agree: --layer-keep not given is None (the report records the floor in effect: 0.5 with a
    target, 0.01 with --percent); given, it is passed on and rendered back, 0.01 included."""
    cfg, weights = pair
    prune_cmd = cli.commands["prune"]
    option = next(p for p in prune_cmd.params if p.name == "layer_keep")
    assert option.default is None is PruneJob.layer_keep and "default 0.5 with a --target-*, else 0.01" in option.help
    sparse = next(p for p in cli.commands["sparse-train"].params if p.name == "layer_keep")
    assert sparse.default is None is SparseTrainJob.layer_keep and "default 0.5 with a --target-*" in sparse.help

    def report(*args: str) -> dict:
        out = tmp_path / f"r{len(list(tmp_path.iterdir()))}.json"
        cli.main(["prune", "--cfg", str(cfg), "--weights", str(weights), "--out", str(tmp_path / "o"), "--dry-run",
                  "--report", str(out), *args], standalone_mode=False)
        return json.loads(out.read_text())

    targeted = report("--target-flops", "0.4")
    assert targeted["layer_keep"] == 0.5 and all(c["after"] >= c["before"] // 2 for c in targeted["channels"])
    assert report("--target-flops", "0.4", "--layer-keep", "0.01")["layer_keep"] == 0.01
    assert report("--percent", "0.5")["layer_keep"] == 0.01
    job = PruneJob(cfg, weights, tmp_path / "o", target_flops=0.4)
    assert job.prune_config().keep_floor == 0.5 and "--layer-keep" not in job.to_argv()
    explicit = PruneJob(cfg, weights, tmp_path / "o", target_flops=0.4, layer_keep=0.01)
    assert explicit.prune_config().keep_floor == 0.01
    assert explicit.to_argv()[explicit.to_argv().index("--layer-keep") + 1] == "0.01"
    recipe = {"cfg": str(cfg), "weights": str(weights), "out": str(tmp_path), "target_flops": 0.4}
    assert PruneJob.from_dict(recipe).layer_keep is None                  # a recipe step without layer_keep
    with pytest.raises(PruneError, match="--layer-keep plans a fade: add --sparsity fade"):
        SparseTrainJob(cfg=cfg, weights=weights, data=tmp_path, out=tmp_path, layer_keep=0.01)


# --- the job, the CLI, info ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(tmp_path_factory, model) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lat")
    save(model, root / "demo.cfg", root / "demo.weights")
    return root / "demo.cfg", root / "demo.weights"


def test_job_takes_one_target_and_names_table_output(pair, tmp_path):
    cfg, weights = pair
    with pytest.raises(PruneError, match="give one target, not --target-latency and --target-flops"):
        PruneJob(cfg, weights, tmp_path / "o", target_latency=0.5, target_flops=0.5)
    with pytest.raises(PruneError, match="--runtime 'tflite' is unknown"):
        PruneJob(cfg, weights, tmp_path / "o", target_latency=0.5, runtime="tflite")
    job = PruneJob(cfg, weights, tmp_path / "o", target_latency=0.5)
    assert job.table_path() == tmp_path / "o" / "latency_table.json"
    assert job.table_path() in {o.path for o in job.outputs()}
    own = PruneJob(cfg, weights, tmp_path / "o", target_latency=0.5, latency_table=tmp_path / "t.json")
    assert any(o.option == "--latency-table" for o in own.outputs())
    assert PruneJob(cfg, weights, tmp_path / "o", target_flops=0.5).table_path() is None


def test_cli_target_flops_dry_run_prints_the_plan(pair, tmp_path, capsys):
    cfg, weights = pair
    cli.main(["prune", "--cfg", str(cfg), "--weights", str(weights), "--out", str(tmp_path / "o"),
              "--target-flops", "0.6", "--dry-run", "--report", str(tmp_path / "r.json")], standalone_mode=False)
    assert "target flops 0.6 x: predicted" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["target"]["metric"] == "flops" and report["target"]["achieved_ratio"] <= 0.6
    assert report["info"]["plan"]["groups"] and report["channels"]
    assert not (tmp_path / "o").exists()


def test_latency_target_end_to_end_on_torch(pair, tmp_path):
    """The whole loop on the torch runtime with a tiny model (fast): table measured and kept, rounds reported.
    No assertion on the timings themselves."""
    cfg, weights = pair
    table = tmp_path / "lat.json"
    report = run_job(PruneJob(cfg, weights, tmp_path / "o", method="slim", target_latency=0.7, runtime="torch",
                              latency_table=table, refine=1, img_size=64))
    lat = report["latency"]
    assert lat["runtime"] == "torch" and lat["table_measured"] and lat["table"] == str(table)
    assert 1 <= len(lat["rounds"]) <= 2 and lat["measured_ms"] > 0 and lat["base_ms"] > 0
    assert report["target"]["achieved_ratio"] == lat["measured_ratio"]
    assert len(read_tables(table)) == 1
    again = run_job(PruneJob(cfg, weights, tmp_path / "o2", method="slim", target_latency=0.7, runtime="torch",
                             latency_table=table, refine=0, img_size=64))
    assert not again["latency"]["table_measured"]                       # the cached table was reused
    info = run_job(InfoJob(cfg, latency_table=table))
    rows = info["latency_tables"][0]["rows"]
    assert rows[-1]["type"] == "rest of the model" and len(rows) > 10
    other = tmp_path / "other.json"
    store_table(other, replace(read_tables(table)[0], key=replace(read_tables(table)[0].key, model="0" * 16)))
    with pytest.raises(CfgError, match="none of its 1 table"):
        run_job(InfoJob(cfg, latency_table=other))


# --- what the tables time: the one-layer models ----------------------------------------------------------------

@pytest.mark.parametrize("groups", [1, 16])
def test_ncnn_one_layer_model_computes_the_conv(model, tmp_path, groups):
    """The ncnn .param written for a table (geometry, groups, fused activation) computes what torch's conv +
    activation compute (bias 0: the timing model folds BN away), so the table times the right layer."""
    i = 2 if groups == 1 else 0                                         # demo: a 3x3 leaky conv
    module = layer_module(model, i, 16, 16)
    conv = torch.nn.Conv2d(16, 16, module.conv.kernel_size, module.conv.stride, module.conv.padding,
                           groups=groups, bias=False)
    module.conv, module.bn = conv, None
    x = torch.rand(1, 16, 20, 20)
    (tmp_path / "n").mkdir()
    fn = LATENCY_RUNTIMES["ncnn"].layer(module, x, 1, tmp_path / "n")
    ret, mat = fn()
    out = torch.from_numpy(np.array(mat))
    with torch.no_grad():
        ref = module.act(conv(x))[0]
    assert out.shape == ref.shape
    assert ret == 0 and torch.allclose(out, ref, atol=1e-4)


def test_measure_table_on_onnxruntime_has_every_grid_point(model):
    coupling = build_coupling(model.graph)
    grid = dict(list(table_grid(build_layout(coupling, cuttable_groups(coupling)), 16).items())[:3])
    table = measure_table(model, "onnxruntime", 1, 64, grid, runs=3, model_runs=2)
    assert [t.layer for t in table.layers] == sorted(grid)
    assert all(len(t.ms) == len(grid[t.layer].in_widths) and len(t.ms[0]) == len(grid[t.layer].out_widths)
               for t in table.layers)
    assert table.key.runtime == "onnxruntime" and table.notes["clock"] == "process CPU time"


def test_layout_others_follow_routes_and_shortcuts(model):
    coupling = build_coupling(model.graph)
    layout = build_layout(coupling, cuttable_groups(coupling))
    full = list(layout.full)
    for j in layout.others:                                            # every non-conv block's width at full
        assert layout.out_width(j, full) == model.graph.channels[j]
    for i in layout.convs:
        assert layout.in_width(i, full) == model.graph.in_channels(i)


@pytest.mark.parametrize("act", ["leaky", "mish", "swish", "linear", "hardswish"])
def test_onnx_one_layer_model_computes_the_conv(act, tmp_path):
    """The ONNX graph written for onnxruntime/OpenVINO tables (run here by onnxruntime) computes what torch's
    conv (bias 0) + activation compute."""
    block = Block("convolutional", (("batch_normalize", "1"), ("filters", "24"), ("size", "3"), ("stride", "2"),
                                    ("pad", "1"), ("activation", act)), 1, "test")
    module = ConvBNAct(block, 16).eval()
    module.bn = None
    x = torch.rand(1, 16, 20, 20)
    out = LATENCY_RUNTIMES["onnxruntime"].layer(module, x, 1, tmp_path)()[0]
    with torch.no_grad():
        ref = module.act(module.conv(x)).numpy()
    assert out.shape == ref.shape and np.abs(out - ref).max() < 1e-4


def test_next_ratio_corrects_the_plan_from_measurement():
    from compress.prune.latency_target import _next_ratio
    # one round: predicted 0.5, measured 0.75 (half the saving) -> plan twice the saving asked (1.0), clamped
    assert _next_ratio([{"predicted_ratio": 0.5, "measured_ratio": 0.75}], 0.5) == pytest.approx(0.02)
    # predicted 0.6, measured 0.7 (3/4 of the saving): to measure 0.7, plan the saving 0.3 / 0.75 -> 0.6
    assert _next_ratio([{"predicted_ratio": 0.6, "measured_ratio": 0.7}], 0.7) == pytest.approx(0.6)
    # two rounds: the secant through (0.5, 0.75) and (0.3, 0.55) hits 0.5 at 0.25
    rounds = [{"predicted_ratio": 0.5, "measured_ratio": 0.75}, {"predicted_ratio": 0.3, "measured_ratio": 0.55}]
    assert _next_ratio(rounds, 0.5) == pytest.approx(0.25)
