"""Shared by the benchmarks: hardware stamp, timers, CSV output."""

from __future__ import annotations

import csv
import datetime
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from teacache_kernels._hardware import describe

RESULTS = Path(__file__).resolve().parent / "results"


def hardware(device: str) -> str:
    return describe(device)


def versions() -> dict:
    import teacache_kernels

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    return {"torch": torch.__version__, "triton": triton_version, "teacache_kernels": teacache_kernels.__version__}


def time_cpu(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall seconds per call."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def time_cuda(fn: Callable[[], object], repeats: int, warmup: int = 3, flush_l2: bool = True) -> float:
    """Median device seconds per call, from CUDA events, with the L2 cache flushed before each call."""
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda") if flush_l2 else None
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples)


def time_host_cuda(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median wall seconds per call, the device drained after each call (what a host-synchronous step costs)."""
    def call():
        fn()
        torch.cuda.synchronize()

    return time_cpu(call, repeats, warmup)


def copy_bandwidth(device: str, nbytes: int = 2**30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second): the practical ceiling."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timer = time_cuda if device == "cuda" else time_cpu
    return 2 * nbytes / timer(lambda: dst.copy_(src), repeats)


def append_csv(name: str, rows: list[dict]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.csv"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows = [{"timestamp": stamp, **r} for r in rows]
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r[c]).rjust(widths[c]) for c in columns))
