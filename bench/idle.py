"""Measurement 4: the agent's CPU and memory while nobody asks it anything, by token keys.

For each key count a fresh emulator and agent with that many configured scopes and 120 s
tokens (Maskinporten's own lifetime). After every key has its first token and a warm-up,
the agent's utime+stime (/proc/PID/stat) is sampled at both ends of the window and VmRSS /
VmHWM (/proc/PID/status) at its end. `mpagent status --json` is read just outside the
window (it costs the agent CPU) to count the refreshes that fell inside it: with 120 s tokens
the policy refreshes each key 60-72 s after it was fetched, so a 60 s window holds some.
"""

from __future__ import annotations

import time
from pathlib import Path

from stack import Stack, scope_names
from sysinfo import cpu_seconds, oncpu_seconds, proc_status, rss_mb

LIFETIME = 120


def level(bin_dir: Path, keys: int, *, seconds: float, warmup: float) -> dict:
    with Stack(bin_dir, scope_names(keys), lifetime=LIFETIME) as st:
        ready = st.start_agent()
        time.sleep(warmup)
        before = sum(t["refreshes"] for t in st.status()["tokens"])
        cpu0, ns0, t0 = cpu_seconds(st.pid), oncpu_seconds(st.pid), time.monotonic()
        time.sleep(seconds)
        cpu1, ns1, t1 = cpu_seconds(st.pid), oncpu_seconds(st.pid), time.monotonic()
        rss, hwm = rss_mb(st.pid), rss_mb(st.pid, "VmHWM")
        threads = int(proc_status(st.pid)["Threads"])
        after = sum(t["refreshes"] for t in st.status()["tokens"])
        env_bytes = st.env_file.stat().st_size
    return {
        "keys": keys,
        "startup_fetch_s": ready,
        "window_s": t1 - t0,
        "cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0),  # of one core
        "cpu_s": cpu1 - cpu0,
        "oncpu_pct": 100 * (ns1 - ns0) / (t1 - t0),  # schedstat, ns resolution
        "refreshes_in_window": after - before,
        "rss_mb": rss,
        "hwm_mb": hwm,
        "threads": threads,
        "env_file_kb": env_bytes / 1024,
    }


def measure(bin_dir: Path, *, levels: list[int], seconds: float, warmup: float) -> list[dict]:
    return [level(bin_dir, n, seconds=seconds, warmup=warmup) for n in levels]
