"""Soak: 32 clients call `get` for a minute while the issuer's tokens live 6 s and 30 % of its
token requests fail (HTTP 503, a hang past the agent's read timeout, a body that is not JSON,
a dropped connection). Every reply is checked against what the emulator really issued."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mpagent import client, paths
from mpagent.emulator import Emulator, pki
from mpagent.errors import IssuerRejected

from ..agentproc import AgentProcess, wait_for
from ..conftest import CLIENT_ID, PASSWORD, SCOPES, profile_for, write_config
from .harness import SCRIPTS, Issued, RecordingEmulator, Seen, rss_kib

LIFETIME = 6
MIN_TTL = min(10.0, LIFETIME / 4)  # the policy's least remaining life for 6 s tokens
SOFT = (0.5, 0.6)  # the soft deadline's span, as fractions of the lifetime
READ_TIMEOUT = 1.0  # [http] read_timeout; the emulator hangs longer, so a hang is a timeout
HANG_SECONDS = 2.0
FAIL_RATIO, SEED = 0.3, 1
CLIENTS, PROCESSES = 32, 4
DURATION = 60.0
INTERVAL = 0.005  # each client's pause between calls
# Besides the random faults, one long outage: four hangs in a row, queued right after the
# first token issued OUTAGE_AT seconds into the run. A `get` waits out transient failures
# for up to 10 s (refresher.GET_WAIT). The hangs start at the soft deadline S; the gets that
# began waiting at the hard deadline (S + 0.9 to 1.5 s) give up by S + 11.5 s, and the
# fifth attempt comes at S + 11.5 s at the earliest (four 1 s read timeouts plus backoffs of
# at least 0.5, 1, 2 and 4 s). So some gets must fail, and the check that each failure had
# no valid token to serve has something to check.
OUTAGE_AT, OUTAGE = 30.0, ("hang", 4)
# The agent has a token at most this long after the emulator finished issuing it, and its
# own expiry clock starts at most this long before the emulator saw the request.
SLACK = 0.25
EARLY = 0.05  # timer and clock granularity when a request must not come before a moment
LATE = 1.0  # scheduling delay allowed past the moment a request is due (loaded CI)


@dataclass(frozen=True)
class Reply:
    sent: float
    received: float
    latency_ms: float
    token: str | None
    expires_at: float | None
    kind: str | None = None  # the error kind of a failed get


def test_soak(ca: pki.Issued, p12: Path, tmp_path: Path, home: Path, report: Any) -> None:
    """32 clients for 60 s, tokens living 6 s, 30 % of issuer requests failing: no get fails
    while a valid token exists, no expired or short-lived token is served, and the issuer
    sees requests only as the refresh and backoff policy allows."""
    emulator = RecordingEmulator(
        clients={CLIENT_ID: SCOPES},
        trust=[ca.cert],
        token_lifetime=LIFETIME,
        fail_ratio=FAIL_RATIO,
        seed=SEED,
        hang_seconds=HANG_SECONDS,
    )
    with emulator:
        config = write_config(
            tmp_path / "config.toml",
            {"dev": profile_for(emulator, p12)},
            http={"read_timeout": READ_TIMEOUT},
        )
        agent = AgentProcess(
            config, home / "agent.log", env={"MPAGENT_KEYSTORE_PASSWORD": PASSWORD}
        ).wait_ready()
        try:
            wait_for(lambda: emulator.issued, timeout=20)
            rss_before = rss_kib(agent.proc.pid)
            start = time.time() + 2.0
            replies = run_clients(tmp_path, start, outage=lambda: after_a_token(emulator))
            rss_after = rss_kib(agent.proc.pid)
        finally:
            agent.stop()
        requests = sorted(emulator.requests, key=lambda r: r.arrived)
        assert len(requests) == emulator.token_requests  # the recording hook saw every one
        issued = emulator.issued_by_token()
        claims = {t: emulator.verify(t) for t in {r.token for r in replies if r.token}}

    served = [r for r in replies if r.token]
    failed = [r for r in replies if not r.token]
    inexcusable = [r for r in failed if valid_token_throughout(r, issued.values())]
    problems, lateness = backoff_problems(requests)
    faults = emulator.faults_served
    successes = sum(r.fault is None for r in requests)
    latencies = sorted(r.latency_ms for r in served)
    report(
        gets_served=len(served),
        gets_failed=len(failed),
        failures_with_valid_token=len(inexcusable),
        outage_s=round(outage(issued.values(), start, start + DURATION), 2),
        latency_p50_ms=latencies[len(latencies) // 2],
        latency_p99_ms=latencies[int(len(latencies) * 0.99)],
        latency_max_ms=latencies[-1],
        least_life_left_s=round(min(r.expires_at - r.sent for r in served), 3),  # type: ignore[operator]
        issuer_requests=len(requests),
        tokens_issued=successes,
        faults=faults,
        worst_lateness_s=round(lateness, 3),
        agent_rss_kib=(rss_before, rss_after),
    )
    assert len(served) > CLIENTS * DURATION, "the clients barely ran"
    assert not served_problems(served, issued, claims)
    assert failed, f"the long outage made no get fail; the issuer saw: {timeline(requests)}"
    assert not inexcusable, inexcusable[:5]
    assert {r.kind for r in failed} <= {"unavailable"}, {r.kind for r in failed}
    assert not problems, problems
    assert successes == emulator.tokens_issued
    assert len(requests) == successes + sum(faults.values())
    span = requests[-1].arrived - requests[0].arrived
    assert successes <= span / (SOFT[0] * LIFETIME) + 1  # never refreshed before a soft deadline


def after_a_token(emulator: RecordingEmulator) -> None:
    """Queue the outage as soon as the emulator issues its next token."""
    issued = emulator.tokens_issued
    wait_for(lambda: emulator.tokens_issued > issued, timeout=30, interval=0.02)
    emulator.inject(*OUTAGE)


def run_clients(tmp_path: Path, start: float, outage: Callable[[], None]) -> list[Reply]:
    """CLIENTS threads spread over PROCESSES processes, all starting at `start`; `outage`
    is called OUTAGE_AT seconds in."""
    socket = paths.socket_path()
    outs = [tmp_path / f"clients-{i}.json" for i in range(PROCESSES)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(SCRIPTS / "load_client.py"),
                socket,
                SCOPES[0],
                str(CLIENTS // PROCESSES),
                repr(start),
                repr(DURATION),
                repr(INTERVAL),
                str(out),
            ]
        )
        for out in outs
    ]
    timer = threading.Timer(start + OUTAGE_AT - time.time(), outage)
    timer.start()
    try:
        for proc in procs:
            assert proc.wait(timeout=DURATION + 60) == 0
    finally:
        timer.cancel()
    replies = []
    for out in outs:
        data = json.loads(out.read_text())
        tokens = data["tokens"]
        replies += [Reply(s, r, lat, tokens[i], exp) for s, r, lat, i, exp in data["ok"]]
        replies += [Reply(s, r, lat, None, None, kind) for s, r, lat, kind, _ in data["errors"]]
    return replies


def served_problems(
    served: list[Reply], issued: dict[str, Issued], claims: dict[str, dict[str, Any]]
) -> list[str]:
    """Every served token was issued by the emulator, is whole, was not expired when it
    arrived, and had the policy's least remaining life when the agent chose to serve it."""
    problems = []
    for token in claims.keys() - issued.keys():
        problems.append(f"served a token the emulator never issued: …{token[-8:]}")
    for r in served:
        assert r.token is not None and r.expires_at is not None
        if r.token not in issued:
            continue  # reported above
        exp = claims[r.token]["exp"]
        if exp <= r.received:
            problems.append(f"served at {r.received:.3f} a token expired at {exp}")
        # The agent decides after the request was sent, so its choice left more than MIN_TTL
        # (less the rounding of expires_at to the millisecond on the wire).
        if r.expires_at - r.sent <= MIN_TTL - 0.0005:
            problems.append(f"served a token with {r.expires_at - r.sent:.3f} s left")
        # The agent dates expiry from before its request, so never later than the issuer's.
        if r.expires_at > issued[r.token].started + LIFETIME + 0.0005:
            problems.append(f"expires_at {r.expires_at:.3f} later than the issuer allows")
        # The issuer's exp is whole seconds (iat rounded down): up to 1 s before expires_at.
        if exp - r.sent <= MIN_TTL - 1:
            problems.append(f"served a token whose exp claim left {exp - r.sent:.3f} s")
        if len(problems) > 20:
            break
    return problems


def valid_token_throughout(failure: Reply, issued: Any) -> bool:
    """True if, for the whole time the failed get was in flight, the agent held a token with
    at least the policy's least remaining life: such a failure has no excuse."""
    for token in issued:
        held_from = token.finished + SLACK
        usable_until = token.started + LIFETIME - MIN_TTL - SLACK
        if held_from <= failure.sent and failure.received <= usable_until:
            return True
    return False


def backoff_problems(requests: list[Seen]) -> tuple[list[str], float]:
    """One token key, so the issuer's requests form one sequence. After a success the next
    request comes at the soft deadline (50-60 % of the lifetime); after the n-th failure in a
    row, after the failure is known (at once, or the read timeout for a hang) plus a wait
    between half and all of min(60, 2^(n-1)) s. Returns the violations and the worst delay
    past the latest allowed moment."""
    problems, lateness, failures = [], 0.0, 0
    for prev, nxt in itertools.pairwise(requests):
        gap = nxt.arrived - prev.arrived
        if prev.fault is None:
            failures = 0
            low, high = SOFT[0] * LIFETIME, SOFT[1] * LIFETIME
        else:
            failures += 1
            nominal = min(60.0, 2.0 ** (failures - 1))
            known = READ_TIMEOUT if prev.fault == "hang" else 0.0
            low, high = known + nominal / 2, known + nominal
        lateness = max(lateness, gap - high)
        if not low - EARLY <= gap <= high + LATE:
            problems.append(
                f"{gap:.3f} s after a {prev.fault or 'success'} (failure {failures} in a row); "
                f"allowed {low:.2f}-{high:.2f} s"
            )
    return problems, lateness


def outage(issued: Any, start: float, end: float) -> float:
    """Seconds in [start, end] in which no issued token had its least remaining life."""
    spans = sorted(
        (max(start, t.finished), min(end, t.started + LIFETIME - MIN_TTL)) for t in issued
    )
    covered, reach = 0.0, start
    for lo, hi in spans:
        lo = max(lo, reach)
        if hi > lo:
            covered += hi - lo
            reach = hi
    return (end - start) - covered


def timeline(requests: list[Seen]) -> list[tuple[float, str]]:
    """The issuer's requests as (seconds since the first, fault or "ok"), for messages."""
    return [(round(r.arrived - requests[0].arrived, 2), r.fault or "ok") for r in requests]


HAMMER_SECONDS = 3.0  # well inside the 7.5-15 s backoff after a rejection
FAILED_GETS_GROWTH_KIB = 4 * 1024


def hammer(tmp_path: Path, scope: str) -> tuple[int, int]:
    """8 clients calling `get` for SCOPE without pause; returns (served, failed)."""
    out = tmp_path / "hammer.json"
    args = [paths.socket_path(), scope, "8", repr(time.time()), repr(HAMMER_SECONDS), "0"]
    subprocess.run([sys.executable, str(SCRIPTS / "load_client.py"), *args, str(out)], check=True)
    data = json.loads(out.read_text())
    return len(data["ok"]), len(data["errors"])


def test_failed_gets_leave_memory_as_they_found_it(
    tmp_path: Path, home: Path, emulator: Emulator, p12: Path, report: Any
) -> None:
    """Gets refused at once (a rejected scope, during its backoff) cost the agent no more
    lasting memory than gets served from the cache: under 4 MiB for three seconds of either."""
    config = write_config(tmp_path / "config.toml", {"dev": profile_for(emulator, p12)})
    agent = AgentProcess(
        config, home / "agent.log", env={"MPAGENT_KEYSTORE_PASSWORD": PASSWORD}
    ).wait_ready()
    try:
        with pytest.raises(IssuerRejected):  # the backoff starts: 7.5-15 s
            client.call(paths.socket_path(), "get", [("scope", "not:registered")])
        before = rss_kib(agent.proc.pid)
        served, _ = hammer(tmp_path, SCOPES[0])
        after_served = rss_kib(agent.proc.pid)
        _, failed = hammer(tmp_path, "not:registered")
        after_failed = rss_kib(agent.proc.pid)
    finally:
        agent.stop()
    report(
        gets_served=served,
        rss_growth_served_kib=after_served - before,
        gets_failed=failed,
        rss_growth_failed_kib=after_failed - after_served,
    )
    assert after_served - before <= FAILED_GETS_GROWTH_KIB
    assert after_failed - after_served <= FAILED_GETS_GROWTH_KIB
