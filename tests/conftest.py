"""Shared fixtures. Real assets live in ../shared/assets (never copied into the repo).

Tests that need them use the `assets` fixture: it skips locally when they are absent, but fails
under CI=true, where a missing asset means a broken checkout rather than an optional extra.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from compress.darknet.cfg import parse_cfg
from compress.darknet.model import DarknetModel, build_model

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
ASSETS = Path(os.environ.get("YOLO_COMPRESS_ASSETS", ROOT.parent / "shared" / "assets"))
TINY_CFGS = sorted(DATA.glob("tiny-*.cfg"))
DEMO_CFG = ROOT / "recipes" / "demo.cfg"
# a 3-class tiny model with a shortcut: the trainers' tests (train, DDP, fine-tune)
TINY3_CFG_TEXT = (DATA / "tiny-shortcut.cfg").read_text().replace("classes=2", "classes=3").replace("filters=21",
                                                                                                     "filters=24")


def require_assets() -> Path:
    if not (ASSETS / "PROVENANCE.md").is_file():
        msg = f"shared test assets not found at {ASSETS}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + " (CI=true: assets are required)")
        pytest.skip(msg)
    return ASSETS


@pytest.fixture
def assets() -> Path:
    return require_assets()


@pytest.fixture(params=TINY_CFGS, ids=lambda p: p.stem)
def tiny_cfg(request) -> Path:
    return request.param


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)  # pytest-xdist runs one worker per core
    yield


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give BN layers non-trivial statistics so equivalence tests exercise them."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.1
            m.running_mean.data = torch.randn(n, generator=g) * 0.1
            m.running_var.data = torch.rand(n, generator=g) + 0.5
    return model


def free_port() -> int:
    """A free localhost TCP port for a test's process group (MASTER_PORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]



def tiny3_model(seed: int = 0) -> DarknetModel:
    """The 3-class tiny model, its weights drawn from `seed`."""
    torch.manual_seed(seed)
    return build_model(parse_cfg(TINY3_CFG_TEXT, "tiny-3cls.cfg"))
