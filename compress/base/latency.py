"""THE latency measurement: warm-up, then the median and spread of N timed calls, with torch's threads pinned.

`benchmark` (every format), the stage figures of model-producing commands and the recipe's stage table all time
through `measure`, so their figures mean the same thing: batch 1, model forward only (no NMS, no decoding of
images), `threads` intra-op threads. Pinning matters on a shared machine: torch's default is every core, and
a forward that races other processes for them spreads 2-3x between runs (see issue #26).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["Latency", "measure", "DEFAULT_THREADS", "DEFAULT_RUNS", "DEFAULT_WARMUP", "pinned_threads", "timed_runs",
           "quantile_ms", "clock_for", "clock_name"]

DEFAULT_THREADS = 1   # one intra-op thread: comparable across machines and runs; --threads for more
DEFAULT_RUNS = 20
DEFAULT_WARMUP = 3


@dataclass(frozen=True)
class Latency:
    """Milliseconds per call over `runs` timed calls (after `warmup` untimed ones)."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    min_ms: float
    max_ms: float
    runs: int
    warmup: int
    threads: int

    @property
    def iqr_ms(self) -> float:
        """The spread: interquartile range (robust to the odd slow run a busy machine produces)."""
        return self.p75_ms - self.p25_ms

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()} \
            | {"iqr_ms": round(self.iqr_ms, 3)}


class pinned_threads:
    """Context manager: torch's intra-op thread count set to `threads`, restored on exit."""

    def __init__(self, threads: int) -> None:
        self.threads, self.before = max(1, int(threads)), torch.get_num_threads()

    def __enter__(self) -> "pinned_threads":
        torch.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.before)


def measure(fn: Callable[[], Any], runs: int = DEFAULT_RUNS, warmup: int = DEFAULT_WARMUP,
            threads: int = DEFAULT_THREADS, sync: Callable[[], None] | None = None) -> Latency:
    """Time `fn()` (one batch-1 forward) `runs` times after `warmup` calls, torch pinned to `threads` threads.
    `sync` runs after each call before the clock stops (e.g. `torch.cuda.synchronize`). A runtime with its own
    thread pool (onnxruntime, OpenVINO, ncnn) gets `threads` when it is loaded; pinning torch too keeps the
    process's other work off the remaining cores."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    with pinned_threads(threads), torch.no_grad():
        times = timed_runs(fn, runs, warmup, time.perf_counter, sync)
    p25, p50, p75 = np.percentile(times, [25, 50, 75])
    return Latency(float(p50), float(p25), float(p75), float(min(times)), float(max(times)), runs, warmup,
                   max(1, int(threads)))


def timed_runs(fn: Callable[[], Any], runs: int, warmup: int, clock: Callable[[], float] = time.perf_counter,
               sync: Callable[[], None] | None = None) -> list[float]:
    """Milliseconds of `runs` calls of `fn` on `clock`, after `warmup` untimed calls (the one timing loop)."""
    for _ in range(warmup):
        fn()
        if sync is not None:
            sync()
    times = []
    for _ in range(runs):
        t0 = clock()
        fn()
        if sync is not None:
            sync()
        times.append((clock() - t0) * 1e3)
    return times


def clock_for(threads: int) -> Callable[[], float]:
    """One thread: the process's CPU time (a one-thread run computes in the calling thread, so time spent waiting
    for a core on a shared machine is not counted); more threads: wall time (CPU time would add them up)."""
    return time.process_time if threads == 1 else time.perf_counter


def clock_name(threads: int) -> str:
    return "process CPU time" if threads == 1 else "wall time"


def quantile_ms(fn: Callable[[], Any], runs: int, warmup: int = 5, q: float = 0.25, threads: int = 1) -> float:
    """The q-quantile of `runs` timed calls of `fn` (ms, on `clock_for(threads)`), after `warmup` untimed ones:
    on a shared machine a run is only ever made slower, so a low quantile is the steadier estimate (the latency
    tables of pruning to a target use it)."""
    return float(np.quantile(timed_runs(fn, runs, warmup, clock_for(threads)), q))
