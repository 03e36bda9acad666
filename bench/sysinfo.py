"""The machine, the load on it, a process's CPU time and memory from /proc, and the two
statistics the bench reports. Stdlib only: run.py uses it before the venv exists."""

from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
import sys
import time

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> tuple[float, float, float]:
    with open("/proc/loadavg", encoding="ascii") as f:
        one, five, fifteen = f.read().split()[:3]
    return float(one), float(five), float(fifteen)


def load_text() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*loadavg())


def wait_until_quiet(limit: float, below: float = 0.5, every: float = 30.0) -> float:
    """Poll the 1-minute load until it is below `below` or `limit` seconds have passed;
    return the last load seen (the caller records it either way)."""
    deadline = time.monotonic() + limit
    while True:
        one = loadavg()[0]
        if one < below or time.monotonic() >= deadline:
            return one
        print(f"  1-minute load {one:.2f} ≥ {below}; waiting {every:.0f} s", file=sys.stderr)
        time.sleep(every)


def hyperfine_version() -> str | None:
    exe = shutil.which("hyperfine")
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip() or "hyperfine"


def machine(python: str) -> dict[str, str]:
    """What the numbers were measured on; `python` is the interpreter under test."""
    version = subprocess.run(
        [python, "-c", "import sys; print(sys.version.split()[0])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores": f"{os.cpu_count()} ({usable} usable by this process)",
        "python": f"{version} ({python})",
        "kernel": f"{platform.system()} {platform.release()}",
        "load at start": load_text(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


# -- one process, from /proc -------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (all its threads), in seconds; resolution 1/CLK_TCK."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        # The command name (field 2) may hold spaces; everything after its ')' is fixed.
        fields = f.read().rpartition(")")[2].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLOCK_TICKS


def oncpu_seconds(pid: int) -> float:
    """Time on CPU of `pid`'s live threads, from schedstat (nanoseconds): finer than
    utime+stime's 10 ms ticks, but blind to threads that exited in between."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", encoding="ascii") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / 1e9


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies over all CPUs since boot, from the first line of /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            name, _, value = line.partition(":")
            out[name] = value.strip()
    return out


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    return int(proc_status(pid)[field].split()[0]) / 1024


# -- statistics --------------------------------------------------------------------------


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    if n == 0:
        return math.nan
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile: the smallest value with at least p % of values at or below."""
    s = sorted(values)
    if not s:
        return math.nan
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]
