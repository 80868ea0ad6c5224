"""What the scripts measure about a process and the machine: resident memory, CPU seconds, how
busy other processes keep the cores, and the wall time of a call whose results are JAX arrays.

Standard library only at import (JAX is imported by `timed` alone): the transformers worker of
`bench.py` and the server benchmarks import this module without loading JAX.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, Protocol

SHARED_BUSY_CORES = 0.25  # above this, a section's timings are flagged as taken on a busy machine


class Rss(NamedTuple):
    """A process's resident set size, KiB: now (VmRSS) and its peak so far (VmHWM)."""

    current_kib: int
    peak_kib: int


def rss(pid: int | str = "self") -> Rss:
    """The resident set of process `pid` (default this one), from /proc/<pid>/status; zeros
    where it cannot be read (the process is gone, or the system is not Linux).

    A child's peak is its own here: `ru_maxrss` would carry its parent's pages from before the
    exec."""
    fields = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                fields[line.split(":")[0]] = int(line.split()[1])
    return Rss(fields.get("VmRSS", 0), fields.get("VmHWM", 0))


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM (Linux: write 5 to /proc/self/clear_refs); False where not
    allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def proc_cpu_seconds(pid: int | str = "self") -> float:
    """user + system CPU seconds of a process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def busy_cpu_seconds() -> float:
    """CPU seconds all processes on the machine have spent busy (from /proc/stat)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class Helpers(Protocol):
    """Processes a run starts (a worker, servers) whose CPU time is its own, not others'."""

    def cpu_seconds(self) -> float: ...


class LoadMeter:
    """How many cores *other* processes kept busy while a section ran (the machine may be shared);
    this process and `helpers` (None: no helper processes) do not count as others."""

    def __init__(self, helpers: Helpers | None):
        self.helpers = helpers
        self.t = time.perf_counter()
        self.busy = busy_cpu_seconds()
        self.mine = self._mine()

    def _mine(self) -> float:
        return proc_cpu_seconds() + (self.helpers.cpu_seconds() if self.helpers else 0.0)

    def result(self) -> dict:
        """{"seconds": wall seconds since the start, "others_busy_cores": their mean}."""
        wall = time.perf_counter() - self.t
        others = (busy_cpu_seconds() - self.busy) - (self._mine() - self.mine)
        return {"seconds": round(wall, 1), "others_busy_cores": round(max(others, 0.0) / wall, 2)}


def wait_quiet(max_s: float, helpers: Helpers | None, log: Callable[[str], None]) -> float:
    """Wait (up to max_s) until other processes keep fewer than SHARED_BUSY_CORES cores busy
    over a 2 s window; returns the seconds waited (`log` says when it gave up)."""
    start = time.perf_counter()
    while max_s > 0:
        meter = LoadMeter(helpers)
        time.sleep(2.0)
        if meter.result()["others_busy_cores"] < SHARED_BUSY_CORES:
            break
        if time.perf_counter() - start > max_s:
            log(f"the machine stayed busy for {max_s:.0f} s: going on anyway")
            break
    return time.perf_counter() - start


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def timed(fn: Callable, *args):
    """(fn(*args), its wall seconds): the clock stops once every array of the result is ready
    (`jax.block_until_ready`), so asynchronous dispatch is not mistaken for speed."""
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def seconds(fn: Callable, *args) -> float:
    """The wall seconds of one call `fn(*args)`, its results ready (`timed`)."""
    return timed(fn, *args)[1]
