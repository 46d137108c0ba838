"""One line naming the machine, stamped on every measurement the package and the benchmarks record."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def describe(device: str = "cpu") -> str:
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
