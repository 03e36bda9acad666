"""Start an agent for a client that found none: under a lock, so that any number of
simultaneous `mpagent get`s start exactly one, with a bounded wait for it to answer.

The agent runs detached (its own session, no terminal), logging to the state directory.
When `mpagent service install` has set up a service, the service manager is the one owner
of start-up and this module never spawns: two owners could race to two agents. Nor for a
configuration with [agent] mode = "server": there the container or CI job owns the agent
(`mpagent agent --foreground-only`), and one started behind its back, detached, would
outlive the job and log where no collector looks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mpagent import client, paths, private, service
from mpagent.errors import EX_CONFIG, AgentNotRunning, ConfigError

START_TIMEOUT = 15.0


def log_path() -> Path:
    import platformdirs

    return Path(platformdirs.user_state_dir(paths.APP, appauthor=False)) / "agent.log"


def answers(socket_path: str) -> bool:
    try:
        client.connect(socket_path, 2.0).close()
    except AgentNotRunning as exc:
        return bool(exc.details.get("connected"))  # busy counts as there
    return True


def ensure_agent(socket_path: str, config_path: str | None, timeout: float = START_TIMEOUT) -> None:
    """Return once an agent answers on socket_path, starting one if needed."""
    manager = service.installed()
    if manager is not None:
        _wait_for_service(manager, socket_path, time.monotonic() + timeout)
        return
    _refuse_in_server_mode(socket_path, config_path)
    lock_path = Path(paths.start_lock_file())
    private.ensure_private_dir(lock_path.parent)
    deadline = time.monotonic() + timeout
    lock = private.lock(lock_path, deadline)
    if lock is None:
        raise AgentNotRunning("timed out waiting for another client to start the agent")
    try:
        if answers(socket_path):
            return  # another client started it while we waited for the lock
        _spawn_and_wait(socket_path, config_path, deadline)
    finally:
        os.close(lock)


def _refuse_in_server_mode(socket_path: str, config_path: str | None) -> None:
    from mpagent import config

    try:
        mode = config.load(config_path).agent.mode
    except ConfigError:
        return  # the agent started below says what is wrong, as it always has
    if mode == "server":
        raise AgentNotRunning(
            f"no agent is running on {socket_path}, and this configuration's agent runs in "
            '[agent] mode = "server", which clients do not start: start it with `mpagent '
            "agent --foreground-only` (the container's or job's own process), or use "
            "`mpagent get --no-agent` / `mpagent exec --no-agent`",
            in_process=True,  # get, env and exec then run in the client's process (fullcli)
        )


def _wait_for_service(manager: service.Manager, socket_path: str, deadline: float) -> None:
    """systemd: its socket accepts as soon as the socket unit runs, so one try tells.
    launchd: ask it to start the job, then wait (it may be throttling a restart)."""
    if isinstance(manager, service.Launchd):
        started = subprocess.run(
            manager.kickstart(), stdin=subprocess.DEVNULL, capture_output=True, check=False
        )
        while started.returncode == 0 and time.monotonic() < deadline:
            if answers(socket_path):
                return
            time.sleep(0.05)
    elif answers(socket_path):
        return
    hint = manager.not_running(socket_path)
    if socket_path != service.socket_path():
        hint += f"; MPAGENT_SOCKET points away from the service's {service.socket_path()}"
    raise AgentNotRunning(hint)


def _spawn_and_wait(socket_path: str, config_path: str | None, deadline: float) -> None:
    log = log_path()
    private.ensure_private_dir(log.parent)
    log_fd = private.open_private(log)
    command = [sys.executable, "-m", "mpagent"]
    if config_path:
        command += ["--config", config_path]
    try:
        agent = subprocess.Popen(
            [*command, "agent"],
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            env=dict(os.environ, MPAGENT_SOCKET=socket_path),
            **_detached(),
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


def _detached() -> dict[str, Any]:
    """No terminal, no job control: the agent outlives the shell that started it."""
    if sys.platform == "win32":
        flags = subprocess.DETACHED_PROCESS | subprocess.CREATE_NEW_PROCESS_GROUP
        return {"creationflags": flags | subprocess.CREATE_NO_WINDOW}
    return {"start_new_session": True}


def _last_line(log: Path) -> str:
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1].removeprefix("mpagent: ") if lines else "no log"
