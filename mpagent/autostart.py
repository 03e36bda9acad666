"""Start an agent for a client that found none: under a lock, so that any number of
simultaneous `mpagent get`s start exactly one, with a bounded wait for it to answer.

The agent runs detached (its own session, no terminal), logging to the state directory.
"""

from __future__ import annotations

import _socket
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

from mpagent import paths
from mpagent.errors import EX_CONFIG, AgentNotRunning, ConfigError
from mpagent.private import ensure_private_dir, open_private

START_TIMEOUT = 15.0


def log_path() -> Path:
    import platformdirs

    return Path(platformdirs.user_state_dir(paths.APP, appauthor=False)) / "agent.log"


def answers(socket_path: str) -> bool:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(2.0)
        sock.connect(socket_path)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def ensure_agent(socket_path: str, config_path: str | None, timeout: float = START_TIMEOUT) -> None:
    """Return once an agent answers on socket_path, starting one if needed."""
    ensure_private_dir(Path(socket_path).parent)
    deadline = time.monotonic() + timeout
    lock = open_private(Path(socket_path + ".start"), os.O_RDWR | os.O_CREAT)
    try:
        _flock(lock, deadline)
        if answers(socket_path):
            return  # another client started it while we waited for the lock
        _spawn_and_wait(socket_path, config_path, deadline)
    finally:
        os.close(lock)


def _flock(fd: int, deadline: float) -> None:
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise AgentNotRunning(
                    "timed out waiting for another client to start the agent"
                ) from None
            time.sleep(0.02)


def _spawn_and_wait(socket_path: str, config_path: str | None, deadline: float) -> None:
    log = log_path()
    ensure_private_dir(log.parent)
    log_fd = open_private(log)
    command = [sys.executable, "-m", "mpagent"]
    if config_path:
        command += ["--config", config_path]
    try:
        agent = subprocess.Popen(
            [*command, "agent"],
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            start_new_session=True,
            env=dict(os.environ, MPAGENT_SOCKET=socket_path),
        )
    finally:
        os.close(log_fd)
    while time.monotonic() < deadline:
        if answers(socket_path):
            return
        status = agent.poll()
        if status is not None:
            last = _last_line(log)
            error = ConfigError if status == EX_CONFIG else AgentNotRunning
            raise error(f"the agent could not start (exit status {status}): {last} (log: {log})")
        time.sleep(0.02)
    raise AgentNotRunning(f"the agent did not answer within {START_TIMEOUT:g} s; see {log}")


def _last_line(log: Path) -> str:
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1].removeprefix("mpagent: ") if lines else "no log"
