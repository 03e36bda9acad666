"""Start-up race: many `mpagent get`s find no agent at the same instant; exactly one agent
must start and every one of them must get its token."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mpagent import autostart, client, paths

from ..agentproc import status, wait_for
from ..conftest import PASSWORD, SCOPES, profile_for, write_config
from .harness import agent_pids, alive

GETS = 20
# Each process imports the CLI first and then waits for the starting gun, so that all of
# them reach "no agent answers" within a few milliseconds of one another.
GATED_GET = """
import os, sys, time
from mpagent import cli
while not os.path.exists(sys.argv[1]):
    time.sleep(0.002)
sys.exit(cli.main(["get", sys.argv[2]]))
"""


def race(gun: Path) -> tuple[list[subprocess.CompletedProcess[str]], float]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", GATED_GET, str(gun), SCOPES[0]],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(GETS)
    ]
    time.sleep(1.5)  # every process imported and waiting
    began = time.monotonic()
    gun.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    elapsed = time.monotonic() - began
    gun.unlink()
    return results, elapsed


def test_simultaneous_gets_start_exactly_one_agent(
    tmp_path: Path, home: Path, emulator: Any, p12: Path, monkeypatch: Any, report: Any
) -> None:
    """20 `get`s released at once start exactly one agent and all print its token: with no
    agent ever started, and again after the agent was killed with SIGKILL (stale socket and
    lock files left behind)."""
    config = write_config(tmp_path / "config.toml", {"dev": profile_for(emulator, p12)})
    monkeypatch.setenv("MPAGENT_CONFIG", str(config))
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    log = autostart.log_path()
    runtime = os.environ["XDG_RUNTIME_DIR"]
    gun = tmp_path / "go"
    timings = []
    for round_ in ("cold", "after kill -9"):
        served_before = log.read_text().count("serving on") if log.exists() else 0
        results, elapsed = race(gun)
        timings.append(round(elapsed, 2))
        assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
        assert len({r.stdout for r in results}) == 1 and results[0].stdout.startswith("eyJ")
        time.sleep(1.0)  # a second agent, had one been spawned, would be up or gone by now
        text = log.read_text()
        assert text.count("serving on") == served_before + 1, (round_, text)
        assert "already running" not in text, (round_, text)
        running = agent_pids(runtime)
        assert running == [status()["pid"]], (round_, running)
        if round_ == "cold":
            os.kill(running[0], signal.SIGKILL)
            wait_for(lambda pid=running[0]: not alive(pid))
            assert Path(paths.socket_path()).exists()  # stale: nobody listens
    pid = status()["pid"]
    client.call(paths.socket_path(), "stop")
    wait_for(lambda: not alive(pid))
    report(rounds=2, gets_per_round=GETS, agents_started_per_round=1, round_seconds=timings)
