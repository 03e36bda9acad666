"""Measurements 3 and 5, from one run with short-lived tokens and several configured scopes.

3. Issuer requests per token key against what the lifetimes require. The agent's own count
   (`mpagent status --json`: `issuer_requests`, `refreshes`) and the emulator's
   (`token_requests`) are read together at the end; each key's issue times (from the
   emulator's log records) give the interval between refreshes as a fraction of the lifetime,
   to check against the soft-deadline policy (50-60 %). A light `get` load runs throughout,
   to show that serving does not cause issuer requests.
5. Time from a refresh to the env file holding the new token. A separate process polls the
   file every 1 ms (stat for a new inode or mtime, then read it) and notes when each
   variable's value changes; that is compared with the emulator's issue time (same clock,
   sub-millisecond) and with the agent's "refreshed" log line (millisecond stamps) that names
   the same token (by its fingerprint: the agent rate-limits repeated log lines, so some
   refreshes have no line, and those are left out of that row).
"""

from __future__ import annotations

import _socket
import itertools
import math
import multiprocessing as mp
import os
import re
import time
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path

from stack import PROFILE, Stack, scope_names
from sysinfo import cpu_seconds, median

from mpagent.envfile import PREFIX, name_part
from mpagent.tokens import fingerprint

SOFT_LOW, SOFT_HIGH = 0.5, 0.6  # mpagent.tokens: SOFT_FRACTION, + SOFT_JITTER
LOG_LINE = re.compile(r"^(\S+ \S+),(\d{3}) .* token (\S+) refreshed: (\S+),")


def poll_env_file(path: str, names: list[str], stop: Event, out: Connection) -> None:
    """Note (wall time, variable, value) whenever a variable's value in the env file changes."""
    last_id: tuple[int, int] | None = None
    values: dict[str, str] = {}
    seen: list[tuple[float, str, str]] = []
    wanted = set(names)
    while not stop.is_set():
        try:
            st = os.stat(path)
        except FileNotFoundError:
            time.sleep(0.001)
            continue
        if (st.st_ino, st.st_mtime_ns) != last_id:
            now = time.time()
            last_id = (st.st_ino, st.st_mtime_ns)
            with open(path, encoding="utf-8") as f:
                for line in f:
                    name, _, value = line.rstrip("\n").partition("=")
                    if name in wanted and values.get(name) != value:
                        values[name] = value
                        seen.append((now, name, value))
        time.sleep(0.001)
    out.send(seen)


def get_load(path: str, scopes: list[str], stop: Event, out: Connection) -> None:
    """About 50 `get`s a second, round-robin over the scopes; counts answers and failures."""
    served = failed = 0
    i = 0
    while not stop.is_set():
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.connect(path)
            sock.sendall(f"mpagent/1 get scope={scopes[i % len(scopes)]}\n".encode())
            reply = b""
            while not reply.endswith(b"\n"):
                more = sock.recv(65536)
                if not more:
                    break
                reply += more
            if reply.startswith(b"ok "):
                served += 1
            else:
                failed += 1
        except OSError:
            failed += 1
        finally:
            sock.close()
        i += 1
        time.sleep(0.02)
    out.send((served, failed))


def agent_refresh_times(log_text: str) -> dict[str, float]:
    """Token fingerprint → wall time of the agent's "token PROFILE:SCOPE refreshed: FP" line."""
    times: dict[str, float] = {}
    for line in log_text.splitlines():
        m = LOG_LINE.match(line)
        if m:
            stamp = (
                time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1e3
            )
            times[m.group(4)] = stamp
    return times


def latest_before(times: list[float], t: float) -> float | None:
    earlier = [x for x in times if x <= t]
    return max(earlier) if earlier else None


def consistent_counts(st: Stack, tries: int = 40) -> tuple[dict, int]:
    """Status and emulator count at one moment: retried while a refresh is in flight (its
    `next_refresh` is null) or the emulator's count moved during the status call."""
    for _ in range(tries):
        before = st.emulator.token_requests
        status = st.status()
        after = st.emulator.token_requests
        if before == after and all(t["next_refresh"] is not None for t in status["tokens"]):
            return status, after
        time.sleep(0.05)
    return status, after


def measure(bin_dir: Path, *, key_count: int, lifetime: int, seconds: float) -> dict:
    scopes = scope_names(key_count)
    names = {PREFIX + name_part(s): s for s in scopes}  # the default profile's short names
    ctx = mp.get_context("fork")
    with Stack(bin_dir, scopes, lifetime=lifetime) as st:
        stop = ctx.Event()
        poll_rx, poll_tx = ctx.Pipe(duplex=False)
        load_rx, load_tx = ctx.Pipe(duplex=False)
        poller = ctx.Process(
            target=poll_env_file, args=(str(st.env_file), list(names), stop, poll_tx)
        )
        poller.start()
        started = time.time()
        st.start_agent()
        cpu0 = cpu_seconds(st.pid)
        loader = ctx.Process(target=get_load, args=(str(st.socket), scopes, stop, load_tx))
        loader.start()
        time.sleep(max(0.0, started + seconds - time.time()))
        cpu1 = cpu_seconds(st.pid)
        status, emulator_requests = consistent_counts(st)
        ended = time.time()
        stop.set()
        seen = poll_rx.recv()
        served, failed = load_rx.recv()
        poller.join()
        loader.join()
        issued = {s: sorted(st.issue_log.times.get(s, [])) for s in scopes}
        logged = agent_refresh_times(st.agent_log())

    keys = []
    intervals: list[float] = []
    for token in status["tokens"]:
        scope = token["scope"]
        times = [t for t in issued[scope] if t <= ended]
        span = ended - times[0]  # from this key's first token to the end of the run
        gaps = [(b - a) / lifetime for a, b in itertools.pairwise(times)]
        intervals.extend(gaps)
        keys.append(
            {
                "scope": scope,
                "issuer_requests": token["issuer_requests"],
                "refreshes": token["refreshes"],
                "issued_by_emulator": len(times),
                "lifetime_minimum": math.ceil(span / lifetime),
                "policy_min": 1 + math.floor(span / (SOFT_HIGH * lifetime + 0.1)),
                "policy_max": 1 + math.floor(span / (SOFT_LOW * lifetime)),
            }
        )

    # 5: every change of a variable after its first appearance is a refresh reaching the file.
    first_seen: set[str] = set()
    from_issue, from_log = [], []
    for t, name, value in seen:
        if name not in first_seen:
            first_seen.add(name)
            continue
        scope = names[name]
        issue = latest_before(issued[scope], t)
        line = logged.get(fingerprint(value))
        if issue is not None:
            from_issue.append(t - issue)
        if line is not None:
            from_log.append(t - line)

    return {
        "run_seconds": ended - started,
        "lifetime": lifetime,
        "keys": keys,
        "issuer_requests": sum(k["issuer_requests"] for k in keys),
        "refreshes": sum(k["refreshes"] for k in keys),
        "emulator_token_requests": emulator_requests,
        "policy_min": sum(k["policy_min"] for k in keys),
        "policy_max": sum(k["policy_max"] for k in keys),
        "lifetime_minimum": sum(k["lifetime_minimum"] for k in keys),
        "interval_fraction_min": min(intervals, default=math.nan),
        "interval_fraction_max": max(intervals, default=math.nan),
        "gets_served": served,
        "gets_failed": failed,
        "agent_cpu_seconds": cpu1 - cpu0,
        "env_refreshes_seen": len(from_issue),
        "issue_to_file_ms": {
            "n": len(from_issue),
            "median": median(from_issue) * 1e3,
            "max": max(from_issue, default=math.nan) * 1e3,
        },
        "log_to_file_ms": {
            "n": len(from_log),
            "median": median(from_log) * 1e3,
            "max": max(from_log, default=math.nan) * 1e3,
        },
        "profile": PROFILE,
    }
