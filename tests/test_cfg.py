"""cfg.py: parse -> format -> parse identity, canonical writer, CfgError with file:line."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compress.darknet.cfg import SUPPORTED_SECTIONS, Block, Cfg, format_cfg, parse_cfg, read_cfg, write_cfg
from compress.base.errors import CfgError
from compress.darknet.graph import build_graph

from conftest import ASSETS, DATA, DEMO_CFG

ASSET_CFGS = sorted((ASSETS / "cfg").glob("*.cfg")) + sorted((ASSETS / "weights").glob("*.cfg"))
LOCAL_CFGS = sorted(DATA.glob("*.cfg")) + [DEMO_CFG]


def _content(cfg: Cfg) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    return [(b.type, b.options) for b in (cfg.net, *cfg.blocks)]


def _check_round_trip(cfg: Cfg) -> None:
    text = format_cfg(cfg)
    again = parse_cfg(text, "<written>")
    assert _content(again) == _content(cfg)
    # The writer is canonical: writing the re-parsed cfg gives the same text, line numbers included.
    assert format_cfg(again) == text
    assert parse_cfg(text, "<written>") == again
    _check_canonical(text)


def _check_canonical(text: str) -> None:
    assert "\r" not in text and text.endswith("\n") and not text.endswith("\n\n")
    for line in text.split("\n"):
        if not line:
            continue
        assert not line.startswith(("#", ";")) and line == line.strip()
        if line.startswith("["):
            assert line.endswith("]")
        else:
            key, value = line.split("=", 1)
            assert key == key.strip() and value == value.strip() and " " not in key


@pytest.mark.parametrize("path", ASSET_CFGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_asset_cfgs_round_trip(assets: Path, path: Path) -> None:
    cfg = read_cfg(path)
    assert cfg.path == str(path)
    _check_round_trip(cfg)
    build_graph(cfg)


@pytest.mark.parametrize("path", LOCAL_CFGS, ids=lambda p: p.stem)
def test_local_cfgs_round_trip(path: Path) -> None:
    _check_round_trip(read_cfg(path))


def test_asset_cfg_known_contents(assets: Path) -> None:
    cfg = read_cfg(assets / "cfg" / "yolov4-tiny.cfg")
    assert (cfg.width, cfg.height, cfg.channels, cfg.classes) == (416, 416, 3, 80)
    assert len(cfg.blocks) == 38  # PROVENANCE.md: 38 layers
    route = cfg.blocks[3]
    assert route.type == "route" and route.get_ints("layers") == (-1,)
    assert (route.get_int("groups"), route.get_int("group_id")) == (2, 1)
    yolo = cfg.blocks[30]
    assert yolo.type == "yolo" and yolo.get_ints("mask") == (3, 4, 5)
    assert yolo.get_float("scale_x_y") == 1.05 and yolo.get("nms_kind") == "greedynms"  # unknown keys kept
    assert yolo.where() == f"{cfg.path}:{yolo.line}"
    lines = (assets / "cfg" / "yolov4-tiny.cfg").read_text().splitlines()
    assert lines[yolo.line - 1].strip() == "[yolo]"
    counts = {t: sum(b.type == t for b in read_cfg(assets / "cfg" / "yolov2-tiny.cfg").blocks)
              for t in ("convolutional", "maxpool", "region")}
    assert counts == {"convolutional": 9, "maxpool": 6, "region": 1}


def test_writer_is_canonical_and_atomic(tmp_path: Path) -> None:
    text = ("\ufeff[net]\r\n width = 64 \r\nheight=64\r\n\r\n# a comment\r\n; another\r\n"
            "[Convolutional]\r\nfilters=8   # inline comment\r\nsize=3;also a comment\r\nactivation=leaky\r\n")
    cfg = parse_cfg(text, "x.cfg")
    assert cfg.net.options == (("width", "64"), ("height", "64"))
    conv = cfg.blocks[0]
    assert conv.type == "convolutional" and conv.line == 7
    assert conv.options == (("filters", "8"), ("size", "3"), ("activation", "leaky"))
    out = tmp_path / "out.cfg"
    write_cfg(cfg, out)
    assert out.read_bytes() == b"[net]\nwidth=64\nheight=64\n\n[convolutional]\nfilters=8\nsize=3\nactivation=leaky\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.cfg"]  # no temp file left behind


def test_block_accessors_and_replace() -> None:
    b = Block("convolutional", (("filters", "16"), ("size", "3"), ("filters", "32"), ("x", "1.0")), 5, "f.cfg")
    assert b.get_int("filters") == 16  # the first one, as Darknet's option_find and OpenCV's reader take it
    assert b.get_int("x") == 1 and b.get_int("missing", 7) == 7
    assert b.get_floats("x") == (1.0,)
    r = b.replace(filters=8, size=None, stride=2, flag=True, anchors=(1, 2))
    assert r.options == (("filters", "8"), ("x", "1.0"), ("stride", "2"), ("flag", "1"), ("anchors", "1,2"))
    assert (r.line, r.source) == (5, "f.cfg") and b.get_int("size") == 3  # original untouched
    with pytest.raises(CfgError, match=r"^f\.cfg:5: \[convolutional\] needs `stride=`"):
        b.get_int("stride")
    cfg = parse_cfg("[net]\nwidth=32\n[maxpool]\nsize=2\n")
    assert cfg.with_net(width=64, height=48).width == 64 and cfg.with_net(height=48).height == 48
    assert cfg.with_blocks([]).blocks == () and cfg.classes == 0


# --- errors carry file:line ------------------------------------------------------------------------------

NET = "[net]\nwidth=64\nheight=64\n\n"
CONV = "[convolutional]\nbatch_normalize=1\nfilters=8\nsize=3\nstride=1\npad=1\nactivation=leaky\n\n"
HEAD = "[convolutional]\nfilters={f}\nsize=1\nactivation=linear\n\n[yolo]\nmask={mask}\nanchors=4,5, 8,10, 12,9\n" \
       "classes=2\nnum=3\n"


def _build(text: str, source: str = "bad.cfg") -> None:
    build_graph(parse_cfg(text, source))


def test_valid_minimal_cfg_builds() -> None:
    _build(NET + CONV + HEAD.format(f=21, mask="0,1,2"))


def test_unknown_section_lists_supported() -> None:
    text = NET + CONV + "[crnn]\noutput=2\n"
    with pytest.raises(CfgError) as err:
        parse_cfg(text, "bad.cfg")
    msg = str(err.value)
    assert msg.startswith("bad.cfg:13: unsupported section [crnn]")
    assert all(f"[{s}]" in msg for s in SUPPORTED_SECTIONS)
    for name in ("reorg", "reorg3d", "local_avgpool", "depthwise", "gaussian_yolo"):
        assert name in SUPPORTED_SECTIONS


def test_non_numeric_value() -> None:
    text = NET + CONV.replace("filters=8", "filters=abc")
    with pytest.raises(CfgError, match=r"^bad\.cfg:7: \[convolutional\] filters='abc' is not an integer"):
        _build(text)
    with pytest.raises(CfgError, match=r"^bad\.cfg:7: .*filters='2\.5' is not an integer"):
        _build(NET + CONV.replace("filters=8", "filters=2.5"))
    with pytest.raises(CfgError, match=r"^bad\.cfg:14: \[yolo\] anchors='4,x' is not a comma-separated list"):
        parse_cfg(NET + CONV + "[yolo]\nanchors=4,x\n", "bad.cfg")


def test_missing_value_and_key() -> None:
    with pytest.raises(CfgError, match=r"^bad\.cfg:7: 'filters=' has an empty key or value"):
        parse_cfg(NET + CONV.replace("filters=8", "filters="), "bad.cfg")
    with pytest.raises(CfgError, match=r"^bad\.cfg:13: \[route\] needs `layers=`"):
        _build(NET + CONV + "[route]\ngroups=1\n")
    with pytest.raises(CfgError, match=r"^bad\.cfg:2: expected key=value, got 'width'"):
        parse_cfg("[net]\nwidth\n", "bad.cfg")
    with pytest.raises(CfgError, match=r"^bad\.cfg:1: a Darknet cfg starts with a \[net\] section"):
        parse_cfg(CONV, "bad.cfg")
    with pytest.raises(CfgError, match=r"^bad\.cfg:13: a second \[net\]"):
        parse_cfg(NET + CONV + "[net]\n", "bad.cfg")
    with pytest.raises(CfgError, match=r"^bad\.cfg:5: malformed section header"):
        parse_cfg(NET + "[convolutional\n", "bad.cfg")


@pytest.mark.parametrize("section, ref, target", [
    ("route", "layers=-3", -1), ("route", "layers=5", 5), ("route", "layers=-1,2", 2),
    ("shortcut", "from=-4", -2), ("shortcut", "from=2", 2),
])
def test_index_out_of_range(section: str, ref: str, target: int) -> None:
    text = NET + CONV + CONV + f"[{section}]\n{ref}\n"  # the route/shortcut is layer 2, header on line 21
    with pytest.raises(CfgError, match=rf"^bad\.cfg:21: \[{section}\] .* points to layer {target}, but layer 2 "
                                       r"can only read layers 0\.\.1"):
        _build(text)


def test_shortcut_unequal_channels_is_darknets_overlap_add() -> None:
    """Darknet adds where the channels overlap; the output has the previous layer's channels."""
    text = NET + CONV + CONV.replace("filters=8", "filters=16") + "[shortcut]\nfrom=-2\n"
    assert build_graph(parse_cfg(text)).channels[2] == 16
    text = NET + CONV + CONV.replace("filters=8", "filters=16") + "[maxpool]\nsize=2\nstride=2\n[shortcut]\nfrom=-3\n"
    with pytest.raises(CfgError, match=r"^bad\.cfg:24: \[shortcut\] joins the previous layer \(32x32\) with from "):
        build_graph(parse_cfg(text, "bad.cfg")).shapes()


def test_anchors_mask_mismatch() -> None:
    # a mask past num= builds as Darknet runs it (0.5 anchors; tests/test_rough_edges.py); odd counts are refused
    with pytest.raises(CfgError, match=r"^bad\.cfg:20: \[yolo\] anchors has an odd count \(5\)"):
        parse_cfg(NET + CONV + HEAD.format(f=21, mask="0").replace("12,9", "12").replace("num=3\n", ""), "bad.cfg")


def test_anchors_are_read_like_darknet() -> None:
    """num= larger than the listed pairs: the rest are 0.5 (Darknet's initial biases); spaces, a trailing comma
    and an odd count with num= are accepted as Darknet accepts them."""
    from compress.darknet.sections.heads import yolo_anchors
    cfg = parse_cfg(NET + CONV + HEAD.format(f=21, mask="0,1,2").replace("num=3", "num=4"))
    assert yolo_anchors(cfg.blocks[-1]) == [(4, 5), (8, 10), (12, 9), (0.5, 0.5)]
    cfg = parse_cfg(NET + CONV + HEAD.format(f=21, mask="0,1,2").replace("anchors=4,5, 8,10, 12,9",
                                                                       "anchors = 4 , 5,8,10,\t12,9,"))
    assert yolo_anchors(cfg.blocks[-1]) == [(4, 5), (8, 10), (12, 9)]
    cfg = parse_cfg(NET + CONV + HEAD.format(f=21, mask="0,1,2").replace("12,9", "12"))
    assert yolo_anchors(cfg.blocks[-1])[2] == (12, 0.5)


def test_yolo_filters_mismatch() -> None:
    with pytest.raises(CfgError, match=r"^bad\.cfg:18: \[yolo\] expects 21 input channels .* layer 1 gives 24; "
                                       r"set filters=21"):
        _build(NET + CONV + HEAD.format(f=24, mask="0,1,2"))
    with pytest.raises(CfgError, match=r"expects 14 input channels"):
        _build(NET + CONV + HEAD.format(f=21, mask="0,2"))


def test_inline_comments_do_not_change_values() -> None:
    plain = parse_cfg(NET + CONV + HEAD.format(f=21, mask="0,1,2"))
    commented = parse_cfg((NET + CONV + HEAD.format(f=21, mask="0,1,2"))
                          .replace("filters=8\n", "filters=8 # eight\n")
                          .replace("mask=0,1,2\n", "mask = 0,1,2   ; first three\n")
                          .replace("[yolo]\n", "[yolo]  # head\n"))
    assert _content(commented) == _content(plain)


def test_read_cfg_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CfgError, match="cfg file not found"):
        read_cfg(tmp_path / "nope.cfg")


# --- hypothesis: random block lists round-trip ---------------------------------------------------------------

_KEYS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.]{0,11}", fullmatch=True)
_VALUE_CHARS = st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters="#;")
_VALUES = st.one_of(
    st.integers(-1000, 1000).map(str),
    st.floats(-1e3, 1e3, allow_nan=False).map(lambda f: f"{f:g}"),
    st.lists(st.integers(-5, 600), min_size=1, max_size=6).map(lambda v: ",".join(map(str, v))),
    st.text(_VALUE_CHARS, min_size=1, max_size=12),
    st.text(st.sampled_from("ab c,=.-"), min_size=1, max_size=12).map(str.strip).filter(bool),
)
_OPTIONS = st.lists(st.tuples(_KEYS, _VALUES), max_size=6)


@st.composite
def _yolo_block(draw) -> Block:
    n = draw(st.integers(1, 6))
    anchors = draw(st.lists(st.integers(1, 500), min_size=2 * n, max_size=2 * n))
    mask = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    opts = [("mask", ",".join(map(str, mask))), ("anchors", ", ".join(map(str, anchors))),
            ("classes", str(draw(st.integers(1, 80)))), ("num", str(n))]
    extra = [(k, v) for k, v in draw(_OPTIONS) if k not in ("mask", "anchors", "classes", "num")]
    return Block("yolo", tuple(opts + extra))


_BLOCKS = st.one_of(
    st.builds(Block, st.sampled_from([s for s in SUPPORTED_SECTIONS if s != "yolo"]), _OPTIONS.map(tuple)),
    _yolo_block(),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(net=_OPTIONS, blocks=st.lists(_BLOCKS, max_size=8))
def test_random_block_lists_round_trip(net, blocks) -> None:
    cfg = Cfg(Block("net", tuple(net)), tuple(blocks))
    text = format_cfg(cfg)
    _check_canonical(text)
    parsed = parse_cfg(text, "<random>")
    assert _content(parsed) == _content(cfg)
    assert format_cfg(parsed) == text
