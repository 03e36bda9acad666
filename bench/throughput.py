"""Measurement 2: the agent's throughput and latency for cached `get`s under concurrency.

Each concurrent client is its own process (forked), looping: new Unix socket, connect, send
`mpagent/1 get scope=X`, read the reply line, close — the real protocol with raw `_socket`,
so the client side costs little. All clients start requesting at once, run for a warm-up,
then for the measured window; only requests that complete inside the window count. The
agent's own CPU use over the window shows whether it, rather than the load generator or the
machine, was the limit.
"""

from __future__ import annotations

import _socket
import array
import multiprocessing as mp
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from stack import Stack
from sysinfo import cpu_seconds, machine_busy, median, percentile

WARMUP = 1.0  # seconds of unmeasured load before the window


def client(path: str, request: bytes, start_at: float, stop_at: float, out: Connection) -> None:
    """One client process. Sends back (latencies in seconds, error count) for the window."""
    run_client(_unix_get, path, request, start_at, stop_at, out)


def _unix_get(path: str, request: bytes) -> bool:
    """One `get` over a new Unix-socket connection: the reply line starts with "ok "."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(path)
        sock.sendall(request)
        reply = sock.recv(65536)
        while reply and not reply.endswith(b"\n"):
            more = sock.recv(65536)
            if not more:
                break
            reply += more
        return reply.startswith(b"ok ")
    except OSError:
        return False
    finally:
        sock.close()


def run_client(
    once: Callable[[Any, bytes], bool],
    address: Any,
    request: bytes,
    start_at: float,
    stop_at: float,
    out: Connection,
) -> None:
    """The loop of one client process: `once(address, request)` until `stop_at`; sends back
    (latencies in seconds, error count) of the requests that ended inside the window."""
    latencies = array.array("d")
    errors = 0
    while True:
        t0 = time.perf_counter()
        if t0 >= stop_at:
            break
        ok = once(address, request)
        t1 = time.perf_counter()
        if start_at <= t1 < stop_at:
            if ok:
                latencies.append(t1 - t0)
            else:
                errors += 1
    out.send_bytes(latencies.tobytes())
    out.send(errors)
    out.close()


def level(
    socket_path: Any,
    scope: str,
    clients: int,
    seconds: float,
    agent_pid: int,
    *,
    worker: Callable[..., None] = client,
    request: bytes | None = None,
) -> dict:
    """`clients` processes running `worker(address, request, ...)` at once (default: the
    Unix-socket `get` of `scope`), measured over `seconds` after the warm-up."""
    request = request or f"mpagent/1 get scope={scope}\n".encode()
    ctx = mp.get_context("fork")
    start_at = time.perf_counter() + WARMUP + 0.2 + 0.01 * clients  # after every fork is done
    stop_at = start_at + seconds
    procs, pipes = [], []
    for _ in range(clients):
        receive, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=worker, args=(socket_path, request, start_at, stop_at, send))
        p.start()
        send.close()
        procs.append(p)
        pipes.append(receive)
    time.sleep(max(0.0, start_at - time.perf_counter()))
    cpu0, busy0 = cpu_seconds(agent_pid), machine_busy()
    time.sleep(max(0.0, stop_at - time.perf_counter()))
    cpu1, busy1 = cpu_seconds(agent_pid), machine_busy()
    latencies: list[float] = []
    errors = 0
    for receive in pipes:
        chunk = array.array("d")
        chunk.frombytes(receive.recv_bytes())
        latencies.extend(chunk)
        errors += receive.recv()
    for p in procs:
        p.join()
    machine_cpu = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1])
    return {
        "clients": clients,
        "seconds": seconds,
        "requests": len(latencies),
        "errors": errors,
        "per_second": len(latencies) / seconds,
        "p50_ms": median(latencies) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "max_ms": max(latencies, default=float("nan")) * 1e3,
        "agent_cpu_pct": 100 * (cpu1 - cpu0) / seconds,  # of one core
        "machine_busy_pct": 100 * machine_cpu,  # of all cores
    }


def measure(bin_dir: Path, *, levels: list[int], seconds: float) -> list[dict]:
    scope = "bench:s0000"
    with Stack(bin_dir, [scope], lifetime=3600) as st:
        st.start_agent()
        return [level(str(st.socket), scope, n, seconds, st.pid) for n in levels]
