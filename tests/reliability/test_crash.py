"""Crash: the agent killed with SIGKILL at random moments while it rewrites the env file,
with a reader polling the file all along; then the next `get` must bring a new agent."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mpagent import client, envfile, paths, private
from mpagent.emulator import pki

from ..agentproc import AgentProcess, wait_for
from ..conftest import CLIENT_ID, PASSWORD, SCOPES, profile_for, run_cli, write_config
from .harness import SCRIPTS, DirectoryEvents, RecordingEmulator, alive, env_file_problems

KILLS = 10
LIFETIME = 1  # three keys refreshed about twice a second: several rewrites a second
KILL_DELAY = (0.0, 0.003)  # after the temp file appears; a write takes about this long
NAMES = {n for scope in SCOPES for n in envfile.variable_names("dev", scope, {}, short=True)}


@pytest.fixture
def emulator(ca: pki.Issued) -> Any:
    with RecordingEmulator(
        clients={CLIENT_ID: SCOPES}, trust=[ca.cert], token_lifetime=LIFETIME
    ) as emu:
        yield emu


@pytest.fixture
def config(
    tmp_path: Path, home: Path, emulator: RecordingEmulator, p12: Path, monkeypatch: Any
) -> Path:
    path = write_config(
        tmp_path / "config.toml", {"dev": profile_for(emulator, p12, scopes=list(SCOPES))}
    )
    monkeypatch.setenv("MPAGENT_CONFIG", str(path))
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    return path


def agent_pid() -> int:
    return int(json.loads(dict(client.call(paths.socket_path(), "status"))["json"])["pid"])


def test_kill_9_during_env_file_rewrites(
    config: Path, emulator: RecordingEmulator, tmp_path: Path, report: Any
) -> None:
    """SIGKILL while the env file is rewritten: a reader polling it never finds it partial,
    empty or missing, the temp files a crash leaves are 0600, and the next `get` autostarts
    a new agent."""
    env_file = Path(paths.default_env_file())
    temp_prefix = f".{env_file.name}."
    rng = random.Random(7)

    def is_temp(name: str) -> bool:
        return name.startswith(temp_prefix) and name.endswith(private.TEMP_SUFFIX)

    first = run_cli("get", SCOPES[0])
    assert first.returncode == 0, first.stderr
    wait_for(env_file.exists)
    stop, out = tmp_path / "stop-reader", tmp_path / "reader.json"
    reader = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "env_reader.py"), str(env_file), str(stop), str(out)]
    )
    killed, mid_write, recovery = [], 0, []
    try:
        for _ in range(KILLS):
            pid = agent_pid()
            with DirectoryEvents(env_file.parent) as events:
                assert events.wait(is_temp, timeout=10), "no rewrite"
                time.sleep(rng.uniform(*KILL_DELAY))
                os.kill(pid, signal.SIGKILL)
            wait_for(lambda p=pid: not alive(p))
            killed.append(pid)
            mid_write += any(is_temp(p.name) for p in env_file.parent.iterdir())
            began = time.monotonic()
            again = run_cli("get", SCOPES[0])
            recovery.append(time.monotonic() - began)
            assert again.returncode == 0 and again.stdout.startswith("eyJ"), again.stderr
            assert agent_pid() not in killed
    finally:
        stop.touch()
        reader.wait(30)
        final = agent_pid()
        client.call(paths.socket_path(), "stop")
        wait_for(lambda: not alive(final))
    seen = json.loads(out.read_text())
    assert seen["reads"] > 1000 and seen["missing"] == 0 and seen["empty"] == 0, seen["reads"]
    for content, _ in seen["contents"]:
        assert not env_file_problems(content, NAMES, emulator.verify), content
    leftovers = [p for p in env_file.parent.iterdir() if p.name.startswith(temp_prefix)]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in leftovers)
    header_only = sum(n for c, n in seen["contents"] if c == envfile.HEADER + "\n")
    report(
        kills=len(killed),
        killed_mid_write=mid_write,
        reader_reads=seen["reads"],
        distinct_contents=len(seen["contents"]),
        header_only_reads=header_only,
        leftover_temp_files=len(leftovers),
        recovery_max_s=round(max(recovery), 2),
    )


def test_temp_file_of_a_crashed_agent_with_the_same_pid(
    config: Path, home: Path, report: Any
) -> None:
    """A temp file left by a killed agent whose pid the next agent happens to get (pids are
    reused; in a container the agent often gets the same small pid on every start) does not
    stop the new agent from writing the env file."""
    env_file = Path(paths.default_env_file())
    env_file.parent.mkdir(mode=0o700, exist_ok=True)
    agent = AgentProcess(config, home / "agent.log")
    try:
        # What SIGKILL mid-write leaves, named as the new agent will name its own temp file.
        stale = env_file.parent / f".{env_file.name}.{agent.proc.pid}.tmp"
        stale.write_text(envfile.HEADER + "\nMASKINPORTEN_TOKEN_IDPORTEN_DCR_R")
        stale.chmod(0o600)
        agent.wait_ready()
        written = _eventually(lambda: env_file.exists() and "TOKEN" in env_file.read_text(), 5)
        report(env_file_written=written, agent_log_errors=agent.log().count("cannot write"))
        assert written, agent.log()[-400:]
    finally:
        agent.stop()


def _eventually(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False
