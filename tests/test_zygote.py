"""tests/zygote.py starts `mpagent` as exec does: the same command, forked or exec'd, exits
with the same status and prints the same bytes, and a forked process is one of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mpagent.emulator import Emulator

from . import zygote
from .agentproc import AgentProcess
from .conftest import PASSWORD, SCOPES, profile_for, run_cli, write_config


def execd(
    args: list[str], stdin: str | None = None, **popen: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mpagent", *args],
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        **popen,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--version"],
        ["no-such-command"],  # argparse's usage and exit 2 (prog named from sys.argv)
        ["get"],
        ["get", SCOPES[0], "--no-agent"],  # no config: exit 78 naming the file
        ["doctor"],  # stdout and stderr both
        ["status", "--json"],  # no agent
    ],
)
def test_forked_and_execd_agree(home: Path, args: list[str]) -> None:
    # Forked unless the developer asked for exec: not a silent fallback (a variable the
    # zygote does not share would make this compare exec with exec).
    assert zygote.forks(os.environ) != (zygote.EXEC_ONLY or not hasattr(os, "pidfd_open"))
    forked = zygote.run_mpagent(args, dict(os.environ), timeout=60)
    assert isinstance(forked.args, list) and forked.args[:3] == [sys.executable, "-m", "mpagent"]
    expected = execd(args)
    assert (forked.returncode, forked.stdout, forked.stderr) == (
        expected.returncode,
        expected.stdout,
        expected.stderr,
    )
    assert expected.stdout or expected.stderr  # the comparison compared something


@pytest.mark.parametrize(
    ("stdin", "says"),
    [("\n", "an empty password; nothing sent"), ("pw\n", "k.p12: no such file")],
)
def test_stdin_and_cwd_reach_the_child(home: Path, tmp_path: Path, stdin: str, says: str) -> None:
    """`unlock --stdin` reads the line piped to it (empty: refused; else the relative
    keystore path is tried, in the cwd given), forked as exec'd."""
    (tmp_path / "config.toml").write_text(
        '[profiles.dev]\nenvironment = "test"\nclient_id = "x"\nscopes = ["a:b"]\n'
        'keystore = "k.p12"\n'
    )
    args = ["--config", "config.toml", "unlock", "--stdin", "dev"]
    env = {**os.environ, "MPAGENT_NO_AUTOSTART": "1"}
    forked = zygote.run_mpagent(args, env, timeout=60, cwd=tmp_path, input=stdin)
    expected = execd(args, stdin, cwd=tmp_path, env=env)
    assert (forked.returncode, forked.stderr) == (expected.returncode, expected.stderr)
    assert forked.returncode == 78 and says in forked.stderr


def test_a_forked_agent_is_a_process_of_its_own(
    home: Path, tmp_path: Path, emulator: Emulator, p12: Path
) -> None:
    """Forked (unless MPAGENT_TEST_EXEC=1), it is a child of the zygote (which holds no
    test's variables) with a pid of its own, signalled directly; it serves; SIGTERM ends it with exit 0 as it ends an exec'd
    agent, the status arriving through wait()."""
    config = write_config(tmp_path / "config.toml", {"dev": profile_for(emulator, p12)})
    env = {"MPAGENT_KEYSTORE_PASSWORD": PASSWORD}
    agent = AgentProcess(config, tmp_path / "agent.log", env).wait_ready()
    if isinstance(agent.proc, zygote.Forked):
        status = Path(f"/proc/{agent.proc.pid}/status").read_text()
        parent = int(status.split("\nPPid:\t")[1].split()[0])
        assert agent.proc.pid != os.getpid() != parent
        # The zygote started with the interpreter's variables and PATH only: no HOME, no
        # MPAGENT_KEYSTORE_PASSWORD, nothing a /proc scan for secrets would find.
        names = {
            v.split(b"=")[0] for v in Path(f"/proc/{parent}/environ").read_bytes().split(b"\0")
        }
        assert b"MPAGENT_KEYSTORE_PASSWORD" not in names and b"HOME" not in names
    assert run_cli("get", SCOPES[0]).stdout.count(".") == 2
    agent.signal(signal.SIGTERM)
    assert agent.proc.wait(15) == 0 and agent.stop() == 0
