"""Broken and hostile files: a config or keystore that is a link to /dev/zero, a FIFO or huge;
an env file left by an agent killed with SIGKILL; an env file that cannot be written. Each is
a clear error naming the file, and none wedges or crashes the agent."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from mpagent import paths
from mpagent.emulator import Emulator, pki

from ..agentproc import AgentProcess, status, wait_for
from ..conftest import CLIENT_ID, PASSWORD, SCOPES, profile_for, run_cli, write_config

LIFETIME = 2


@pytest.fixture
def emulator(ca: pki.Issued) -> Any:
    with Emulator(clients={CLIENT_ID: SCOPES}, trust=[ca.cert], token_lifetime=LIFETIME) as emu:
        yield emu


def timed_cli(*args: str, timeout: float = 20) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = run_cli(*args, timeout=timeout)
    return result, time.monotonic() - started


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "huge"])
def test_config_that_is_no_regular_file(tmp_path: Path, home: Path, kind: str, report: Any) -> None:
    """A config that is a link to /dev/zero, a FIFO or 2 MiB: exit 78 at once, naming the
    file and what it is (before: read until MemoryError, or blocked forever on the FIFO)."""
    config = tmp_path / "config.toml"
    if kind == "dev-zero":
        config.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(config)
    else:
        config.write_text("# " + "x" * (2 * 1024 * 1024) + "\n")
    expected = {"dev-zero": "a character device", "fifo": "a FIFO", "huge": "larger than 1024 KiB"}
    for command in (["get", "--no-agent", SCOPES[0]], ["agent"]):
        result, seconds = timed_cli("--config", str(config), *command)
        assert result.returncode == 78, result.stderr
        assert f"{config}: cannot read the configuration: " in result.stderr
        assert expected[kind] in result.stderr and seconds < 10
    report(kind=kind, exit=78, seconds=round(seconds, 2))


def test_keystore_fifo_does_not_wedge_the_agent(
    tmp_path: Path, home: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A keystore that is a FIFO: that profile is unusable with an error naming the file,
    the agent keeps serving (status answers) and `stop` stops it."""
    keystore = tmp_path / "ks.p12"
    os.mkfifo(keystore)
    config = write_config(tmp_path / "config.toml", {"dev": profile_for(emulator, keystore)})
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    agent = AgentProcess(config, tmp_path / "agent.log").wait_ready()
    try:
        assert (
            "a FIFO" in status()["profiles"]["dev"] and str(keystore) in status()["profiles"]["dev"]
        )
        failed = run_cli("get", SCOPES[0], "--no-start")
        assert failed.returncode == 78 and str(keystore) in failed.stderr
        stopped, seconds = timed_cli("stop")
        assert stopped.returncode == 0 and seconds < 10
        assert agent.proc.wait(10) == 0
    finally:
        agent.stop()


def test_restart_after_kill_9_drops_expired_tokens(
    tmp_path: Path,
    home: Path,
    emulator: Emulator,
    p12: Path,
    monkeypatch: pytest.MonkeyPatch,
    report: Any,
) -> None:
    """SIGKILL, the issuer then down, and a new agent: the env file loses the dead agent's
    tokens once they have expired (before: it kept them, expired, for as long as the issuer
    was down)."""
    config = write_config(tmp_path / "config.toml", {"dev": profile_for(emulator, p12)})
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    env_file = Path(paths.default_env_file())
    first = AgentProcess(config, tmp_path / "first.log").wait_ready()
    wait_for(lambda: env_file.exists() and "MASKINPORTEN_TOKEN_" in env_file.read_text())
    first.signal(signal.SIGKILL)
    first.stop()
    emulator.inject("503", 10_000)
    time.sleep(LIFETIME + 0.5)  # the dead agent's token has expired
    second = AgentProcess(config, tmp_path / "second.log").wait_ready()
    try:
        content = wait_for(lambda: (c := env_file.read_text()) and "TOKEN_" not in c and c)
        assert content.startswith("# Maskinporten access tokens")
        assert "removed the expired tokens" in second.log()
    finally:
        second.stop()
    report(tokens_left_expired_before=1, after=0)


def test_env_file_write_failure_shows_in_status(
    tmp_path: Path, home: Path, emulator: Emulator, p12: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An env file that cannot be written (its directory is missing) is shown by `status`,
    human and JSON, not only in the log; tokens are still served."""
    missing = tmp_path / "no-such-dir" / "tokens.env"
    config = write_config(
        tmp_path / "config.toml", {"dev": profile_for(emulator, p12)}, agent={"env_file": missing}
    )
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    agent = AgentProcess(config, tmp_path / "agent.log").wait_ready()
    try:
        assert run_cli("get", SCOPES[0], "--no-start").returncode == 0
        error = wait_for(lambda: status()["env_file_error"])
        assert str(missing) in error and "No such file or directory" in error
        human = run_cli("status").stdout
        assert "NOT WRITTEN" in human and str(missing) in human
    finally:
        agent.stop()
