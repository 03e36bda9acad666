"""The agent's own socket under load from its own user: a tight connect/close flood, 1,100
idle connections, more connections than the agent may hold, no file descriptors left to
accept with, and hundreds of on-demand scopes the issuer rejects. The agent runs at the usual
soft RLIMIT_NOFILE of 1,024 files, as a login session starts it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jwt
import pytest

from mpagent import client, paths, protocol, server
from mpagent.emulator import pki
from mpagent.errors import IssuerRejected, MpagentError, ProtocolError
from mpagent.logs import RateLimit

from ..agentproc import AgentProcess, wait_for
from ..conftest import CLIENT_ID, PASSWORD, SCOPES, profile_for, run_cli, write_config
from ..test_cli_get import assert_failed
from .harness import SCRIPTS, RecordingEmulator

SOFT_NOFILE = 1024  # what a login session gives a process
LIFETIME = 4  # seconds: the env file is rewritten every 2-2.4 s during the flood
FLOOD_SECONDS = 12.0
FLOOD_LOOPS = 2
FLOOD_MOST = 400_000  # connects per loop, at most
PROBE_INTERVAL = 0.02
SLOWEST_GET = 1.0  # seconds
LOG_GROWTH = 1 << 20  # bytes
IDLE = 1100
REJECTED = 500
BACKOFF_SPAN = 16.0  # past the longest first backoff after a rejection (7.5-15 s)

# One loop of the flood, run as a process of its own (so that it competes with the agent,
# not with the emulator in this process): connect, close, again; bounded in time and count.
FLOOD = """
import socket, sys, time
path, seconds, most = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
until, made, refused = time.monotonic() + seconds, 0, 0
while made + refused < most and time.monotonic() < until:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
        made += 1
    except OSError:
        refused += 1
    finally:
        s.close()
print(made, refused)
"""


@contextlib.contextmanager
def soft_nofile(limit: int) -> Iterator[None]:
    """This process's soft RLIMIT_NOFILE lowered while it starts a child, which inherits it.
    (AgentProcess takes no preexec_fn; lowering the soft limit here and raising it back is
    the same for the child, and this process opens nothing meanwhile.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def nofile_limits(pid: int) -> tuple[int, int]:
    """A process's soft and hard RLIMIT_NOFILE, from /proc/<pid>/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no 'Max open files' line")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


@pytest.fixture
def emulator(ca: pki.Issued) -> Iterator[RecordingEmulator]:
    emu = RecordingEmulator(clients={CLIENT_ID: SCOPES}, trust=[ca.cert], token_lifetime=LIFETIME)
    with emu:
        yield emu


@pytest.fixture
def agent(
    tmp_path: Path, home: Path, emulator: RecordingEmulator, p12: Path
) -> Iterator[AgentProcess]:
    """A real agent started at a soft RLIMIT_NOFILE of 1,024, serving one configured scope."""
    if sys.platform != "linux":
        pytest.skip("reads the agent's limits and descriptors from /proc")
    config = write_config(tmp_path / "config.toml", {"dev": profile_for(emulator, p12)})
    with soft_nofile(SOFT_NOFILE):
        proc = AgentProcess(config, home / "agent.log", env={"MPAGENT_KEYSTORE_PASSWORD": PASSWORD})
    proc.wait_ready()
    wait_for(lambda: Path(paths.default_env_file()).exists(), timeout=20)
    yield proc
    proc.stop()


def log_size(agent: AgentProcess) -> int:
    return agent.log_path.stat().st_size


# -- item 1: file descriptors -------------------------------------------------------------


class Sampler:
    """Every 50 ms while running: the agent's open descriptors, and the env file's content."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_fds = pid, 0
        self.env_contents: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        env = Path(paths.default_env_file())
        while not self._stop.wait(0.05):
            self.peak_fds = max(self.peak_fds, open_fds(self.pid))
            with contextlib.suppress(OSError):
                self.env_contents.add(env.read_text())


def test_connect_close_flood_leaves_get_fast_and_the_log_small(
    agent: AgentProcess, emulator: RecordingEmulator, tmp_path: Path, report: Any
) -> None:
    """During a 12 s connect/close flood from two loops, every `get` of a probe succeeds and
    the slowest takes under 1 s, refreshes go on (the env file gets new tokens), and the
    agent's log grows by less than 1 MB."""
    log_before = log_size(agent)
    issued_before = emulator.tokens_issued
    start = time.time() + 1.0
    out = tmp_path / "probe.json"
    probe = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPTS / "load_client.py"),
            paths.socket_path(),
            SCOPES[0],
            "1",
            repr(start),
            repr(FLOOD_SECONDS),
            repr(PROBE_INTERVAL),
            str(out),
        ]
    )
    with Sampler(agent.proc.pid) as sampler:
        time.sleep(max(0.0, start - time.time()))
        cpu_before = cpu_seconds(agent.proc.pid)
        loops = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    FLOOD,
                    paths.socket_path(),
                    repr(FLOOD_SECONDS),
                    str(FLOOD_MOST),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(FLOOD_LOOPS)
        ]
        counts = [loop.communicate(timeout=FLOOD_SECONDS + 30)[0].split() for loop in loops]
        agent_cpu = cpu_seconds(agent.proc.pid) - cpu_before
        assert probe.wait(FLOOD_SECONDS + 60) == 0
    time.sleep(1.0)
    log_growth = log_size(agent) - log_before
    result = json.loads(out.read_text())
    latencies = sorted(r[2] for r in result["ok"])
    log = agent.log()
    report(
        connects=sum(int(c[0]) for c in counts),
        connects_refused=sum(int(c[1]) for c in counts),
        probe_gets=len(latencies),
        probe_failures=len(result["errors"]),
        slowest_get_ms=round(latencies[-1], 1) if latencies else None,
        log_growth_bytes=log_growth,
        agent_peak_fds=sampler.peak_fds,
        agent_cpu_s=round(agent_cpu, 1),
        agent_nofile=nofile_limits(agent.proc.pid),
        tokens_issued=emulator.tokens_issued - issued_before,
        env_file_versions=len(sampler.env_contents),
        emfile_lines=log.count("Too many open files"),
    )
    assert not result["errors"], result["errors"][:3]
    assert latencies and latencies[-1] < SLOWEST_GET * 1000
    assert log_growth < LOG_GROWTH
    assert len(sampler.env_contents) >= 3  # a refresh every 2-2.4 s reached the env file
    assert "cannot write the env file" not in log
    assert client.call(paths.socket_path(), "get", [("scope", SCOPES[0])])


def hold_idle(count: int) -> list[socket.socket]:
    """`count` connections to the agent that send nothing (within 5 s)."""
    held: list[socket.socket] = []
    deadline = time.monotonic() + 5
    while len(held) < count and time.monotonic() < deadline:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(paths.socket_path())
        except BlockingIOError:  # the listen backlog is full: the agent is behind
            s.close()
            time.sleep(0.01)
            continue
        held.append(s)
    return held


def gets_beside_idle(agent: AgentProcess) -> dict[str, Any]:
    """Hold 1,100 idle connections; meanwhile `get` through the library for 2 s (inside the
    agent's 5 s read timeout), then once through the real CLI. What each saw."""
    log_before = log_size(agent)
    held = hold_idle(IDLE)
    try:
        opened, slowest, gets = time.monotonic(), 0.0, 0
        while time.monotonic() - opened < 2.0:
            begun = time.perf_counter()
            reply = dict(
                client.call(paths.socket_path(), "get", [("scope", SCOPES[0])], timeout=30)
            )
            slowest = max(slowest, time.perf_counter() - begun)
            gets += 1
            assert reply["token"].startswith("eyJ")
        begun = time.perf_counter()
        cli = run_cli("get", SCOPES[0])
        cli_seconds = time.perf_counter() - begun
        fds = open_fds(agent.proc.pid)
        closed = sum(has_reply(s) for s in held)
    finally:
        for s in held:
            s.close()
    return {
        "idle_open": len(held),
        "idle_closed_by_agent": closed,
        "gets": gets,
        "slowest_get_ms": round(slowest * 1000, 1),
        "cli": cli,
        "cli_get_s": round(cli_seconds, 2),
        "agent_fds": fds,
        "agent_nofile": nofile_limits(agent.proc.pid),
        "log_growth_bytes": log_size(agent) - log_before,
    }


def test_1100_idle_connections_leave_get_answering(agent: AgentProcess, report: Any) -> None:
    """With 1,100 idle connections open to an agent started at a soft limit of 1,024 files,
    `get` answers within 1 s (through the library and the real CLI), and the agent has raised
    its soft RLIMIT_NOFILE to the hard limit."""
    seen = gets_beside_idle(agent)
    cli = seen.pop("cli")
    report(**seen)
    assert seen["idle_open"] == IDLE
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.startswith("eyJ") and cli.stderr == ""
    assert seen["slowest_get_ms"] < SLOWEST_GET * 1000
    soft, hard = nofile_limits(agent.proc.pid)
    assert soft == hard, (soft, hard)


def test_idle_connections_past_a_lowered_limit(agent: AgentProcess, report: Any) -> None:
    """With the agent's limit cut to 1,024 files under it (prlimit: the connection cap it
    chose at start assumed more), 1,100 idle connections make it close the oldest idle ones
    instead of wedging accept: `get` answers within 1 s and the log grows by under 1 MB."""
    resource.prlimit(agent.proc.pid, resource.RLIMIT_NOFILE, (SOFT_NOFILE, SOFT_NOFILE))
    seen = gets_beside_idle(agent)
    cli = seen.pop("cli")
    report(**seen)
    assert seen["agent_nofile"] == (SOFT_NOFILE, SOFT_NOFILE)
    assert seen["idle_open"] == IDLE
    assert seen["idle_closed_by_agent"] > 0
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.startswith("eyJ") and cli.stderr == ""
    assert seen["slowest_get_ms"] < SLOWEST_GET * 1000
    assert seen["log_growth_bytes"] < LOG_GROWTH
    assert "Traceback" not in agent.log()


# -- the listener itself, in this process: the cap, and no descriptors left ---------------


def echo(words: list[str], fields: protocol.Fields) -> bytes:
    """A toy agent that answers `echo` with its fields."""
    if words != ["echo"]:
        raise ProtocolError(f"unknown request {words}")
    return protocol.encode(["ok"], fields)


@contextlib.contextmanager
def serving(
    listener: server.UnixListener, *, started: bool = True
) -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop of its own, in a thread, for `listener` to serve `echo` on; `started`:
    already serving (else `start(listener, loop)` does it)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    if started:
        start(listener, loop)
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(listener.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def start(listener: server.UnixListener, loop: asyncio.AbstractEventLoop) -> None:
    asyncio.run_coroutine_threadsafe(listener.start(echo), loop).result(10)


@pytest.fixture
def socket_path() -> Iterator[Path]:
    """A socket path in a short private directory (socket paths are limited to ~104 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="mpf-", dir="/tmp"))
    yield directory / "run" / "t.sock"
    shutil.rmtree(directory, ignore_errors=True)


def idle_client(path: Path) -> socket.socket:
    """A connected client that sends nothing (blocking, so MSG_DONTWAIT peeks at once)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(os.fspath(path))
    s.settimeout(None)
    return s


def has_reply(s: socket.socket) -> bool:
    """Whether the listener has sent this client something, or closed it."""
    try:
        s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def reply_message(s: socket.socket) -> str:
    reply = b""
    while chunk := s.recv(65536):
        reply += chunk
    words, fields = protocol.decode(reply)
    assert words == ["error"], reply
    return protocol.first(fields, "message") or ""


def test_connection_cap_closes_the_oldest_idle_connection(socket_path: Path) -> None:
    """A listener holding its most connections (here 50) closes the oldest idle one for each
    new client, telling it why, keeps the newer ones, and still answers a request."""
    listener = server.UnixListener(server.bind_private(socket_path), owned=True, max_connections=50)
    with serving(listener):
        held = []
        for _ in range(60):
            held.append(idle_client(socket_path))
            wait_for(lambda: len(listener.live) == min(50, len(held)), timeout=5, interval=0.005)
        reply = dict(client.call(os.fspath(socket_path), "echo", [("x", "1")], timeout=5))
        wait_for(lambda: all(has_reply(s) for s in held[:10]), timeout=5)
        messages = [reply_message(s) for s in held[:10]]
        still_open = [not has_reply(s) for s in held[11:]]
        for s in held:
            s.close()
        wait_for(lambda: not listener.live, timeout=5)
    assert reply == {"x": "1"}
    assert all(
        m.startswith("closed: the agent holds 50 connections, its most, and this one had sent")
        for m in messages
    ), messages
    assert all(still_open), still_open.count(False)


def test_out_of_descriptors_the_listener_pauses_instead_of_spinning(
    socket_path: Path, caplog: pytest.LogCaptureFixture, report: Any
) -> None:
    """When accept fails for want of descriptors (EMFILE), the listener pauses and logs a
    line per pause, not a traceback per attempt, and once descriptors are free again it
    answers the clients that waited."""
    sock = server.bind_private(socket_path)
    waiting = [idle_client(socket_path) for _ in range(5)]
    for s in waiting:
        s.sendall(f"{protocol.VERSION} echo n=1\n".encode())
    listener = server.UnixListener(sock, owned=True, max_connections=50)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    spare: list[int] = []
    with caplog.at_level(logging.WARNING), serving(listener, started=False) as loop:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 4096), hard))
        try:
            with contextlib.suppress(OSError):
                while True:  # every descriptor this process may have, taken
                    spare.append(os.open(os.devnull, os.O_RDONLY))
            start(listener, loop)  # needs no new descriptor
            time.sleep(2.0)
            during = list(caplog.records)
            answered_during = sum(has_reply(s) for s in waiting)
        finally:
            for fd in spare:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        wait_for(lambda: all(has_reply(s) for s in waiting), timeout=3)
        replies = [s.recv(65536) for s in waiting]
        for s in waiting:
            s.close()
        wait_for(lambda: not listener.live, timeout=5)
    report(descriptors_taken=len(spare), log_lines_in_2s=len(during))
    assert spare, "no descriptor was taken"
    assert answered_during == 0
    assert 1 <= len(during) <= 10, len(during)
    assert not any(r.exc_info for r in during), during[0].exc_info
    assert all("Too many open files" in r.getMessage() for r in during), during[0].getMessage()
    assert replies == [b"ok n=1\n"] * 5


def test_connection_cap_follows_the_open_files_limit() -> None:
    """The cap leaves 256 descriptors for everything else, holds at most 4,096 clients and
    never fewer than 16."""
    assert server.connection_cap(1024) == 768
    assert server.connection_cap(20_000) == 4096
    assert server.connection_cap(100) == 16


# -- repeated log lines -------------------------------------------------------------------


FLOODING = "mpagent.test-flood"  # the logger the records below come from


def record(msg: str, at: float, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    """A record of FLOODING's logged at wall time `at`."""
    r = logging.LogRecord(FLOODING, level, __file__, 1, msg, args, None)
    r.created = at
    return r


@pytest.fixture
def written(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Captures the lines the filter writes itself (through FLOODING's logger)."""
    with caplog.at_level(logging.DEBUG, logger=FLOODING):
        yield caplog


def test_repeated_log_lines_are_counted_not_written(written: pytest.LogCaptureFixture) -> None:
    """Of one kind of line (same logger, level and message before its arguments), 10 a
    minute are written; the rest are counted, and once the minute has ended the next line
    logged says how many were left out."""
    limit = RateLimit()
    kept = [limit.filter(record("cannot accept: %s", 100 + i / 1000, i)) for i in range(12_355)]
    assert kept.count(True) == 10 and kept[:10] == [True] * 10
    assert not written.records
    assert limit.filter(record("cannot accept: %s", 159.0, "within the minute")) is False
    assert limit.filter(record("cannot accept: %s", 161.0, "again"))
    [summary] = written.records
    assert summary.levelno == logging.ERROR
    assert summary.getMessage() == (
        "cannot accept: within the minute (… 12,346 more like this in the last 61 s)"
    )
    assert limit.filter(record("cannot accept: %s", 162.0, "once more"))
    assert len(written.records) == 1


def test_a_flood_that_stops_is_counted_at_the_next_line_of_any_kind(
    written: pytest.LogCaptureFixture,
) -> None:
    """When a flood of one kind stops, the count of its left-out lines is written with the
    next line of any other kind after its minute; other kinds, the same message at another
    level, and DEBUG lines (asked for to see every one) are never held back by it."""
    limit = RateLimit()
    for i in range(100):
        limit.filter(record("flood %d", 10.0 + i / 100, i))
    assert limit.filter(record("refreshed %s", 11.0, "dev"))
    assert limit.filter(record("flood %d", 11.0, 1, level=logging.WARNING))
    assert all(limit.filter(record("flood %d", 11.0, i, level=logging.DEBUG)) for i in range(50))
    assert not limit.filter(record("flood %d", 11.5, 101))
    assert not written.records
    assert limit.filter(record("refreshed %s", 75.0, "dev"))
    assert [s.getMessage() for s in written.records] == [
        "flood 101 (… 91 more like this in the last 65 s)"
    ]


# -- item 2: on-demand scopes the issuer rejects -----------------------------------------


def ask(scopes: list[str], threads: int = 4) -> list[MpagentError | None]:
    """`get` each scope once through the real socket; the error each one got, or None."""

    def one(scope: str) -> MpagentError | None:
        try:
            client.call(paths.socket_path(), "get", [("scope", scope)], timeout=30)
        except MpagentError as exc:
            return exc
        return None

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, scopes))


def requests_for(emulator: RecordingEmulator, scopes: list[str]) -> int:
    """Token requests the emulator received for any of `scopes` (read from their grants)."""
    wanted = set(scopes)
    with emulator._record_lock:
        grants = list(emulator.grants)
    claims = (jwt.decode(g, options={"verify_signature": False}) for g in grants)
    return sum(c.get("scope") in wanted for c in claims)


def test_rejected_on_demand_scopes_wait_for_a_client(
    agent: AgentProcess, emulator: RecordingEmulator, report: Any
) -> None:
    """500 distinct on-demand scopes the issuer rejects cost one issuer request each and none
    in the background in the 16 s after (longer than any first backoff); a client asking for
    one again costs one more request and gets the rejection (the CLI exits 77)."""
    scopes = [f"flood:rejected{i}" for i in range(REJECTED)]
    begun = time.monotonic()
    errors = ask(scopes)
    asking = time.monotonic() - begun
    assert all(isinstance(e, IssuerRejected) for e in errors), {repr(e) for e in errors}
    asked = requests_for(emulator, scopes)
    time.sleep(BACKOFF_SPAN)
    after_span = requests_for(emulator, scopes)
    cli = run_cli("get", scopes[0])
    again = requests_for(emulator, scopes)
    report(
        scopes=REJECTED,
        asking_s=round(asking, 1),
        issuer_requests_while_asking=asked,
        issuer_requests_after_16s=after_span,
        issuer_requests_after_asking_again=again,
    )
    assert asked == REJECTED
    assert after_span == REJECTED
    assert_failed(cli, 77, "invalid scopes", scopes[0])
    assert again == REJECTED + 1


def test_on_demand_keys_are_capped(agent: AgentProcess, emulator: RecordingEmulator) -> None:
    """The agent keeps at most 1,000 on-demand token keys: a new scope beyond them fails
    through the CLI (exit 1) with a message naming the cap and what to do, while the keys it
    holds and the configured scopes still answer; the log holds 10 lines of each kind the
    1,000 keys caused, not 1,000."""
    scopes = [f"flood:capped{i}" for i in range(1000)]
    assert all(isinstance(e, IssuerRejected) for e in ask(scopes, threads=8))
    over = run_cli("get", "flood:one-too-many")
    assert_failed(over, 1, "1000 on-demand token keys", "idle_timeout", "scopes")
    assert requests_for(emulator, ["flood:one-too-many"]) == 0
    held = run_cli("get", scopes[-1])
    assert_failed(held, 77, "invalid scopes")
    configured = run_cli("get", SCOPES[0])
    assert configured.returncode == 0 and configured.stdout.startswith("eyJ"), configured.stderr
    # 1,000 new keys and 1,000 rejections, each a line of one kind: 10 of each are written.
    log = agent.log()
    assert log.count("new on-demand token key") == 10
    assert log.count("Token request contains invalid scopes") == 10
