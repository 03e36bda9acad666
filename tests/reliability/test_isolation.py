"""Isolation: what another local user can reach (nothing), and the modes of everything the
agent creates when it was started under umask 000. `other_user` is the real second local user
the cross-user cases of this directory run as (test_local_attacker.py uses it too)."""

from __future__ import annotations

import itertools
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mpagent import autostart, client, paths

from ..agentproc import status, wait_for
from ..conftest import PASSWORD, SCOPES, profile_for, run_cli, write_config
from .harness import alive, proc_status


@dataclass(frozen=True)
class OtherUser:
    """A real second local user (its own uid and group, no supplementary groups), made for
    the test session with useradd and removed after it."""

    name: str
    uid: int
    gid: int

    def python(self, code: str, *args: str, **popen: Any) -> subprocess.Popen[str]:
        """`code` as this user: an interpreter started as root imports the stdlib modules the
        scripts use, then drops to the uid, so it works where the interpreter lives in a
        directory the user cannot read (a pyenv under /root). Arguments carry no secrets."""
        drop = (
            "import encodings.idna, errno, json, os, select, socket, sys, time\n"
            f"os.setgroups([]); os.setgid({self.gid}); os.setuid({self.uid})\n"
        )
        command = [sys.executable, "-I", "-c", drop + code, *args]
        return subprocess.Popen(command, text=True, cwd="/", **popen)

    def run(self, code: str, *args: str, stdin: str = "") -> Any:
        """Run `code` as this user to the end; its stdout is one JSON document."""
        proc = self.python(
            code, *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = proc.communicate(stdin, timeout=60)
        assert proc.returncode == 0, err
        return json.loads(out)


_made = itertools.count()


@pytest.fixture(scope="session")
def other_user() -> Iterator[OtherUser]:
    """A second local user for the session; needs root (CI runs as root), skipped otherwise."""
    if os.getuid() != 0:
        pytest.skip("a second local user needs root to create and switch to (CI runs as root)")
    useradd, userdel = shutil.which("useradd"), shutil.which("userdel")
    if useradd is None or userdel is None:
        if os.environ.get("MPAGENT_REQUIRE_ALL") == "1":
            pytest.fail("useradd/userdel missing (MPAGENT_REQUIRE_ALL=1)", pytrace=False)
        pytest.skip("useradd/userdel missing: cannot make a second local user")
    # Unique per instance: a module that imports this fixture gets an instance of its own.
    name = f"mpatest{os.getpid()}x{next(_made)}"
    options = ["--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent"]
    made = subprocess.run(
        [useradd, *options, "--shell", "/usr/sbin/nologin", name],
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    try:
        entry = pwd.getpwnam(name)
        yield OtherUser(name, entry.pw_uid, entry.pw_gid)
    finally:
        subprocess.run([userdel, name], capture_output=True)


# Each way in that another user might try, as that user.
TRY_EVERYTHING = """
sock_path, env_file, log_file, agent_pid, scope = sys.argv[1:]

def attempt(action):
    try:
        return action()
    except OSError as exc:
        return errno.errorcode[exc.errno]

def ask():
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(sock_path)
        s.sendall(b"mpagent/1 get scope=" + scope.encode() + b"\\n")
        return "answered" if s.recv(65536) else "closed"

def read(path):
    with open(path, "rb") as f:
        return "read" if f.read(1) else "read"

print(json.dumps({
    "socket": attempt(ask),
    "env file": attempt(lambda: read(env_file)),
    "agent log": attempt(lambda: read(log_file)),
    "agent environ": attempt(lambda: read(f"/proc/{agent_pid}/environ")),
}))
"""


@pytest.fixture
def config(tmp_path: Path, home: Path, emulator: Any, p12: Path, monkeypatch: Any) -> Path:
    path = write_config(tmp_path / "config.toml", {"dev": profile_for(emulator, p12)})
    monkeypatch.setenv("MPAGENT_CONFIG", str(path))
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    return path


@pytest.fixture
def autostarted(config: Path) -> Iterator[int]:
    """An agent started the usual way, by a `get`; yields its pid."""
    first = run_cli("get", SCOPES[0])
    assert first.returncode == 0, first.stderr
    wait_for(lambda: Path(paths.default_env_file()).exists())
    pid = int(status()["pid"])
    yield pid
    client.call(paths.socket_path(), "stop")
    wait_for(lambda: not alive(pid))


def try_everything(user: OtherUser, agent_pid: int) -> dict[str, str]:
    args = [paths.socket_path(), paths.default_env_file(), str(autostart.log_path())]
    return dict(user.run(TRY_EVERYTHING, *args, str(agent_pid), SCOPES[0]))


def test_another_user_reaches_nothing(
    other_user: OtherUser, autostarted: int, home: Path, report: Any
) -> None:
    """A process of another user can neither get an answer on the socket nor read the env
    file, the agent's log or its environment: not through the private directories, not if a
    mistake opened the directories, and not if it also opened the socket, where the agent's
    peer-uid check is the last line."""
    runtime = Path(paths.socket_path()).parent
    layers = {}
    layers["private directories"] = try_everything(other_user, autostarted)
    log_dir = autostart.log_path().parent
    for directory in (home, runtime.parent, runtime, log_dir.parent, log_dir):
        directory.chmod(0o711)  # others may pass through, not list
    layers["directories opened"] = try_everything(other_user, autostarted)
    Path(paths.socket_path()).chmod(0o666)
    layers["socket opened too"] = try_everything(other_user, autostarted)
    report(**{k.replace(" ", "_"): v for k, v in layers.items()})
    assert layers["private directories"] == {
        "socket": "EACCES",
        "env file": "EACCES",
        "agent log": "EACCES",
        "agent environ": "EACCES",
    }
    assert layers["directories opened"] == layers["private directories"]
    # Cut off before or after its request was written: either way, no answer.
    assert layers["socket opened too"]["socket"] in ("closed", "ECONNRESET", "EPIPE")
    refused = f"refused a connection from uid {other_user.uid}"
    wait_for(lambda: refused in autostart.log_path().read_text())


@pytest.mark.parametrize("start", ["agent", "autostart"])
def test_private_modes_under_umask_000(
    start: str, config: Path, home: Path, monkeypatch: Any, report: Any
) -> None:
    """Started under umask 000 (directly, or autostarted by a `get` under umask 000), the
    agent creates its runtime directory (and a missing XDG_RUNTIME_DIR) 0700 and the socket,
    locks, env file, state directory and log with no access for group or others."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(home / "fresh-run"))  # missing: made by mpagent
    runtime = Path(paths.socket_path()).parent
    command = ["--config", str(config), "agent"] if start == "agent" else ["get", SCOPES[0]]
    log = (home / "umask-test.log").open("wb")
    proc = subprocess.Popen(
        ["sh", "-c", 'umask 000; exec "$0" -m mpagent "$@"', sys.executable, *command],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL if start == "autostart" else log,
        stderr=log,
    )
    try:
        if start == "autostart":
            assert proc.wait(60) == 0
        wait_for(lambda: Path(paths.default_env_file()).exists(), timeout=20)
        pid = int(status()["pid"])
        umask = proc_status(pid)["Umask"]
        modes = {
            str(p.relative_to(home)): stat.S_IMODE(p.lstat().st_mode)
            for top in (runtime.parent, runtime, autostart.log_path().parent)
            if top.exists()
            for p in [top, *top.iterdir()]
        }
        client.call(paths.socket_path(), "stop")
        wait_for(lambda: not alive(pid))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()
    report(agent_umask=umask, modes={k: f"{v:04o}" for k, v in sorted(modes.items())})
    assert umask == "0000"  # the test really ran the agent under umask 000
    assert modes[str(runtime.relative_to(home))] == 0o700
    assert modes[str(runtime.parent.relative_to(home))] == 0o700
    assert {"agent.sock", "agent.sock.lock", "tokens.env"} <= {Path(k).name for k in modes}
    if start == "autostart":
        assert modes[str(autostart.log_path().relative_to(home))] == 0o600
    opened = {k: f"{v:04o}" for k, v in modes.items() if v & 0o077}
    assert not opened, opened
