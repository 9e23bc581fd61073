"""Helpers shared by the benchmarks: machine facts and how busy the machine was meanwhile."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path
from typing import Any

import torch
import transformers

PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_counters() -> tuple[int, int]:
    """(busy clock ticks of the whole machine, clock ticks used by this process) from /proc."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
        own = [int(v) for v in Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[11:13]]
        return busy, sum(own)
    except (OSError, ValueError, IndexError):
        return 0, 0


def foreign_share(before: tuple[int, int], after: tuple[int, int], seconds: float) -> float:
    """Share of the machine's CPU capacity used by other processes between two `cpu_counters()`."""
    ticks = os.sysconf("SC_CLK_TCK") * seconds * (os.cpu_count() or 1)
    other = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, other / ticks) if ticks > 0 else 0.0


def machine_facts(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
