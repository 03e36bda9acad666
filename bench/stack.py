"""One emulator + config + keystore + agent in a private temp dir, as mpagent/demo.py does it.

The emulator runs in this process (so its counters and issue times can be read directly); the
agent is the installed `mpagent agent` console script, a separate process whose pid the bench
samples in /proc. Config and keystore sit in conf/, the socket and env file in run/, as they
do for a user (~/.config vs $XDG_RUNTIME_DIR): the agent watches the config's directory, and
an env file rewritten inside it would wake the watcher on every refresh.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from mpagent.emulator import Emulator, pki

CLIENT_ID = "0b8f3a52-8c0e-4d7a-9a4e-5f1f2d6c7e90"
PROFILE = "bench"


def scope_names(count: int) -> list[str]:
    return [f"bench:s{i:04d}" for i in range(count)]


class IssueLog(logging.Handler):
    """The emulator's issue time per scope: the `created` stamp of its "token issued" line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.times: dict[str, list[float]] = collections.defaultdict(list)

    def emit(self, record: logging.LogRecord) -> None:
        # log.info("token issued to client %s for scope %s", client, scope)
        if str(record.msg).startswith("token issued") and isinstance(record.args, tuple):
            self.times[str(record.args[1])].append(record.created)


def free_port() -> int:
    """A loopback TCP port free just now (the agent binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Stack:
    def __init__(
        self, bin_dir: Path, scopes: list[str], *, lifetime: int, http: bool = False
    ) -> None:
        """`http`: also serve the texas-compatible endpoint (`[http] listen`) on a free
        loopback port, `self.http_listen`."""
        self.bin_dir, self.scopes, self.lifetime = bin_dir, scopes, lifetime
        self.agent: subprocess.Popen[bytes] | None = None
        self.http_listen: tuple[str, int] | None = ("127.0.0.1", free_port()) if http else None

    def __enter__(self) -> Stack:
        self.dir = Path(tempfile.mkdtemp(prefix="mpb-"))  # short: the socket path is limited
        os.chmod(self.dir, 0o700)
        conf, run = self.dir / "conf", self.dir / "run"
        conf.mkdir(mode=0o700)
        run.mkdir(mode=0o700)
        password = secrets.token_urlsafe(16)
        ca = pki.make_ca()
        leaf = {"auth": pki.make_leaf(ca)}
        keystore = pki.write_pkcs12(conf / "virksomhet.p12", leaf, password, [ca.cert])
        self.issue_log = IssueLog()
        emulator_log = logging.getLogger("mpagent.emulator")
        emulator_log.setLevel(logging.INFO)
        emulator_log.propagate = False
        emulator_log.addHandler(self.issue_log)
        self.emulator = Emulator(
            clients={CLIENT_ID: self.scopes}, trust=[ca.cert], token_lifetime=self.lifetime
        ).start()
        self.config = conf / "config.toml"
        self.env_file = run / "tokens.env"
        self.socket = run / "agent.sock"
        self.log_path = self.dir / "agent.log"
        scope_list = ", ".join(json.dumps(s) for s in self.scopes)
        http = ""
        if self.http_listen is not None:
            http = f'[http]\nlisten = "{self.http_listen[0]}:{self.http_listen[1]}"\n\n'
        self.config.write_text(
            f'[agent]\nenv_file = "{self.env_file}"\n\n{http}[profiles.{PROFILE}]\n'
            f'environment = "{self.emulator.issuer}"\nclient_id = "{CLIENT_ID}"\n'
            f"scopes = [{scope_list}]\n"
            f'keystore = "{keystore}"\n',
            encoding="utf-8",
        )
        self.env = dict(
            os.environ,
            MPAGENT_CONFIG=str(self.config),
            MPAGENT_SOCKET=str(self.socket),
            MPAGENT_KEYSTORE_PASSWORD=password,
            MPAGENT_NO_AUTOSTART="1",  # a missing agent must fail the bench, not be started
            XDG_STATE_HOME=str(self.dir / "state"),
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_agent()
        self.emulator.stop()
        logging.getLogger("mpagent.emulator").removeHandler(self.issue_log)
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- the agent -----------------------------------------------------------------------

    def start_agent(self, timeout: float = 180.0) -> float:
        """Start `mpagent agent` and wait until every configured scope has a valid token;
        return how long that took."""
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.agent = subprocess.Popen(
                [str(self.bin_dir / "mpagent"), "agent"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.agent.poll() is not None:
                raise RuntimeError(f"the agent exited early; see its log:\n{self.agent_log()}")
            if self.socket.exists():
                tokens = self.status()["tokens"]
                if len(tokens) == len(self.scopes) and all(t["valid"] for t in tokens):
                    return time.monotonic() - started
            time.sleep(0.3)
        raise RuntimeError(f"the agent had no tokens after {timeout:.0f} s:\n{self.agent_log()}")

    @property
    def pid(self) -> int:
        assert self.agent is not None
        return self.agent.pid

    def status(self) -> dict:
        """`mpagent status --json`, as a user would read it."""
        out = subprocess.run(
            [str(self.bin_dir / "mpagent"), "status", "--json"],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"mpagent status failed: {out.stderr.strip()}")
        return json.loads(out.stdout)

    def stop_agent(self) -> None:
        if self.agent is None or self.agent.poll() is not None:
            return
        self.agent.send_signal(signal.SIGTERM)
        try:
            self.agent.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.agent.kill()
            self.agent.wait()

    def agent_log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
