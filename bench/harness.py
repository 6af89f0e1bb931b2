"""The small harness every bench script shares: timing, tables, and JSON results.

A benchmark's numbers mean little without the machine that made them, so `machine()`
describes it and `write_json` writes the results atomically (a run cut short never
leaves half a file). Timings are wall-clock seconds from `time.perf_counter`, with the
GPU synchronised around each run so that queued kernels are counted; `best_of` suits
short runs where noise only ever adds time, `median_of` longer ones that vary both ways.
Benchmarks are run by hand and never asserted on in tests. torch is imported only
where needed, so a script can still choose its thread settings before torch loads.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

from minigpt.atomic import write_json_atomic


def sync(device) -> None:
    """Wait for the GPU's queued work, so a timer around it measures the work itself."""
    if device is not None and str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def timings(fn: Callable[[], object], repeats: int, device=None, warmup: int = 0) -> list[float]:
    """Seconds of `repeats` calls of fn, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def best_of(fn: Callable[[], object], repeats: int, device=None, warmup: int = 0) -> float:
    """The fastest of `repeats` calls, in seconds."""
    return min(timings(fn, repeats, device, warmup))


def median_of(fn: Callable[[], object], repeats: int, device=None, warmup: int = 0) -> float:
    """The median of `repeats` calls, in seconds."""
    return statistics.median(timings(fn, repeats, device, warmup))


def cpu_name() -> str:
    """The CPU's model name (Linux), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    """The GPU's name for a CUDA device, else the CPU's."""
    if not str(device).startswith("cuda"):
        return cpu_name()
    import torch

    return torch.cuda.get_device_name(device)


def machine(**extra) -> dict:
    """What made the numbers: CPU, cores, threads, versions, load, the command, the time."""
    import torch

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "command": " ".join(["python", *sys.argv]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }


def write_json(path: str | Path, data: object) -> Path:
    """Write results as indented JSON (folders made, the file replaced atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)
    return path


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], right: Collection[int] = ()
) -> str:
    """A Markdown table; the columns numbered in `right` (from 0) are right-aligned."""
    rule = "|" + "|".join("---:" if i in right else "---" for i in range(len(headers))) + "|"
    lines = ["| " + " | ".join(map(str, line)) + " |" for line in (headers, *rows)]
    return "\n".join([lines[0], rule, *lines[1:]])


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], right: Collection[int] = ()
) -> None:
    print(markdown_table(headers, rows, right))
