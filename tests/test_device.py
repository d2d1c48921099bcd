"""--device specs: parsing, resolution on this machine and on a simulated 2-GPU machine, one-line errors."""
from __future__ import annotations

import pytest
import torch

from compress.base.device import DeviceSpec, parse_device, resolve_device
from compress.base.errors import DeviceError


@pytest.mark.parametrize("spec, parsed", [
    ("auto", DeviceSpec("auto")), (None, DeviceSpec("auto")), ("CPU", DeviceSpec("cpu")),
    ("cuda", DeviceSpec("cuda")), ("cuda:1", DeviceSpec("cuda", (1,))), ("0", DeviceSpec("cuda", (0,))),
    ("0,1", DeviceSpec("cuda", (0, 1))), (" 2, 3 ", DeviceSpec("cuda", (2, 3))), ("mps", DeviceSpec("mps")),
    (torch.device("cuda", 3), DeviceSpec("cuda", (3,))),
])
def test_parse(spec, parsed):
    assert parse_device(spec) == parsed


@pytest.mark.parametrize("spec", ["banana", "gpu", "cuda:", "cuda:x", "-1", "0,0", "1.5", "0;1"])
def test_parse_rejects(spec):
    with pytest.raises(DeviceError, match=f"--device {spec}"):
        parse_device(spec)


def test_this_machine():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    missing = torch.cuda.device_count()  # never a valid ordinal, with or without GPUs
    with pytest.raises(DeviceError, match=f"cuda:{missing}"):
        resolve_device(f"cuda:{missing}")


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_simulated_two_gpu_machine(two_gpus):
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("1") == torch.device("cuda", 1)
    assert resolve_device("0,1", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("1,0", local_rank=0) == torch.device("cuda", 1)  # the list's order, not sorted
    with pytest.raises(DeviceError, match="torchrun --nproc_per_node 2"):
        resolve_device("0,1")  # one process cannot use two GPUs
    with pytest.raises(DeviceError, match="GPU 2 does not exist; this machine has 2"):
        resolve_device("0,2", local_rank=0)
    with pytest.raises(DeviceError, match="local rank 2"):
        resolve_device("0,1", local_rank=2)


def test_cuda_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for spec in ("cuda", "0", "cuda:0"):
        with pytest.raises(DeviceError, match=f"--device {spec}: .*use --device cpu or auto"):
            resolve_device(spec)
