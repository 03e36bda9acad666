"""A real `mpagent agent` process for tests, with its log kept for inspection."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from mpagent import client, paths
from mpagent.errors import AgentNotRunning

from . import zygote


class AgentProcess:
    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.config, self.log_path = config, log
        self.socket = paths.socket_path()
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = zygote.start_mpagent(
            ["--config", str(config), "agent"], {**os.environ, **(env or {})}, self._log
        )

    def wait_ready(self, timeout: float = 15.0) -> AgentProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}: {self.log()}")
            try:
                client.call(self.socket, "status", timeout=2)
                return self
            except AgentNotRunning:  # not listening yet: a refused connect costs microseconds
                time.sleep(0.01)
        raise RuntimeError(f"agent not ready: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):
    """Poll until predicate() is truthy; return its value or fail the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting for a parent to reap it (an agent that `get`
    autostarted is init's child once it exits: init may take a second or more to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def status() -> dict[str, Any]:
    """The running agent's status document, asked over its socket."""
    return json.loads(dict(client.call(paths.socket_path(), "status"))["json"])
