"""Socket activation as systemd does it, without systemd: the test binds the agent's socket,
passes it as fd 3 with LISTEN_FDS/LISTEN_PID, and listens on a real NOTIFY_SOCKET."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpagent import paths, protocol
from mpagent.emulator import Emulator

from .conftest import PASSWORD, SCOPES, profile_for, run_cli, write_config

# Stands in for systemd between fork and exec: the socket becomes fd 3 and LISTEN_PID names
# the process that will read it (exec keeps the pid).
WRAPPER = """\
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "mpagent", *sys.argv[2:]])
"""


@pytest.fixture
def config(tmp_path: Path, home: Path, emulator: Emulator, p12: Path) -> Path:
    return write_config(tmp_path / "config.toml", {"dev": profile_for(emulator, p12)})


@pytest.fixture
def listener(home: Path) -> Iterator[socket.socket]:
    """What mpagent.socket makes: %t/mpagent/ at 0700, agent.sock at 0600, listening."""
    path = Path(paths.socket_path())
    path.parent.mkdir(mode=0o700)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(16)
    yield sock
    sock.close()


@pytest.fixture
def notify(home: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(home / "notify"))
    sock.settimeout(20)
    yield sock
    sock.close()


@pytest.fixture
def agents() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def activate(
    agents: list[subprocess.Popen[bytes]],
    listener: socket.socket,
    config: Path,
    notify: socket.socket,
    log: Path,
    **env: str,
) -> subprocess.Popen[bytes]:
    fd = listener.fileno()
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", WRAPPER, str(fd), "--config", str(config), "agent"],
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env={
                **os.environ,
                "LISTEN_FDS": "1",
                "NOTIFY_SOCKET": notify.getsockname(),
                "MPAGENT_KEYSTORE_PASSWORD": PASSWORD,
                "MPAGENT_NO_AUTOSTART": "1",
                **env,
            },
        )
    agents.append(proc)
    return proc


def waiting_get() -> subprocess.Popen[str]:
    """A `get` connected to the socket before any agent runs: it must still be waiting."""
    early = subprocess.Popen(
        [sys.executable, "-m", "mpagent", "get", SCOPES[0], "--no-start"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = early.communicate(timeout=0.5)
        pytest.fail(f"get finished before any agent ran: {out!r} {err!r}")
    except subprocess.TimeoutExpired:
        pass
    return early


def test_ready_then_serves_on_the_inherited_socket(
    agents: list, listener: socket.socket, config: Path, notify: socket.socket, tmp_path: Path
) -> None:
    """READY=1 reaches NOTIFY_SOCKET once the agent serves, and `get` works over fd 3."""
    activate(agents, listener, config, notify, tmp_path / "agent.log")
    assert notify.recv(4096) == b"READY=1"
    got = run_cli("get", SCOPES[0], env={"MPAGENT_NO_AUTOSTART": "1"})
    assert got.returncode == 0, got.stderr
    assert got.stdout.startswith("eyJ")
    assert "using the socket passed by the service manager" in (tmp_path / "agent.log").read_text()


def test_sigterm_leaves_the_socket_to_systemd(
    agents: list, listener: socket.socket, config: Path, notify: socket.socket, tmp_path: Path
) -> None:
    """On SIGTERM the agent says STOPPING=1 and exits 0 without removing the socket file,
    which keeps accepting: the next agent started on it serves again."""
    first = activate(agents, listener, config, notify, tmp_path / "agent.log")
    assert notify.recv(4096) == b"READY=1"
    first.send_signal(signal.SIGTERM)
    assert notify.recv(4096) == b"STOPPING=1"
    assert first.wait(15) == 0
    assert Path(paths.socket_path()).exists()
    activate(agents, listener, config, notify, tmp_path / "agent.log")
    assert notify.recv(4096) == b"READY=1"
    assert run_cli("get", SCOPES[0], env={"MPAGENT_NO_AUTOSTART": "1"}).returncode == 0


def test_client_connected_before_the_agent_is_served(
    agents: list, listener: socket.socket, config: Path, notify: socket.socket, tmp_path: Path
) -> None:
    """A `get` that connects while only the socket exists is answered once the agent starts:
    with socket activation, connecting is enough."""
    early = waiting_get()
    activate(agents, listener, config, notify, tmp_path / "agent.log")
    out, err = early.communicate(timeout=30)
    assert early.returncode == 0, err
    assert out.startswith("eyJ")


def test_listen_pid_of_another_process_is_ignored(
    agents: list, listener: socket.socket, config: Path, notify: socket.socket, tmp_path: Path
) -> None:
    """LISTEN_FDS meant for another process is not taken: the agent binds its own socket."""
    own = str(Path(os.environ["XDG_RUNTIME_DIR"]) / "own.sock")
    fd = listener.fileno()
    with open(tmp_path / "agent.log", "ab") as out:
        agents.append(
            subprocess.Popen(
                [sys.executable, "-m", "mpagent", "--config", str(config), "agent"],
                pass_fds=(fd,),
                stdout=out,
                stderr=out,
                env={
                    **os.environ,
                    "LISTEN_FDS": "1",
                    "LISTEN_PID": "1",
                    "MPAGENT_SOCKET": own,
                    "NOTIFY_SOCKET": notify.getsockname(),
                    "MPAGENT_KEYSTORE_PASSWORD": PASSWORD,
                },
            )
        )
    assert notify.recv(4096) == b"READY=1"
    got = run_cli("get", SCOPES[0], env={"MPAGENT_SOCKET": own, "MPAGENT_NO_AUTOSTART": "1"})
    assert got.returncode == 0, got.stderr
    assert "passed by the service manager" not in (tmp_path / "agent.log").read_text()


def test_bad_config_answers_the_waiting_clients(
    agents: list, listener: socket.socket, notify: socket.socket, tmp_path: Path
) -> None:
    """An agent started by the socket with a broken config answers the `get`s waiting in the
    queue with the config error (exit 78) at once, then exits 78, rather than leaving them to
    their 30 s timeout."""
    broken = tmp_path / "broken.toml"
    broken.write_text('[profiles.dev]\nenvironment = "test"\n[agent]\nidle_timeout = "soon"\n')
    early = waiting_get()
    agent = activate(agents, listener, broken, notify, tmp_path / "agent.log")
    out, err = early.communicate(timeout=10)
    assert early.returncode == 78 and out == ""
    assert "[agent] idle_timeout is 'soon'" in err, err
    assert agent.wait(10) == 78


def test_bad_config_waits_for_a_trickling_request(
    listener: socket.socket, agents: list, notify: socket.socket, tmp_path: Path
) -> None:
    """A queued client whose request arrives a byte at a time is answered with the config
    error once its whole line is there, not cut off after the first bytes (which would break
    its next write)."""
    broken = tmp_path / "broken.toml"
    broken.write_text('[profiles.dev]\nenvironment = "test"\n[agent]\nidle_timeout = "soon"\n')
    request = b"mpagent/1 get scope=" + b"s" * 100 + b"\n"
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(20)
        client.connect(listener.getsockname())
        client.sendall(request[:10])
        agent = activate(agents, listener, broken, notify, tmp_path / "agent.log")
        for i in range(10, len(request)):  # about 3 s, longer than the agent takes to start
            time.sleep(0.03)
            client.sendall(request[i : i + 1])
        reply = b"".join(iter(lambda: client.recv(65536), b""))
    words, fields = protocol.decode(reply)
    assert words == ["error"] and protocol.first(fields, "kind") == "config", reply
    assert "[agent] idle_timeout is 'soon'" in (protocol.first(fields, "message") or ""), reply
    assert agent.wait(10) == 78
