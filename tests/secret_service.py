"""A real, throwaway Secret Service for the keyring tests: a private D-Bus session bus and
gnome-keyring-daemon unlocked with a random password, HOME and XDG dirs in a temp dir.

The bus gets its own minimal configuration instead of `--session`: the standard one lists
the system's D-Bus service files, so the first keyring call could auto-start a second,
locked gnome-keyring-daemon with the developer's HOME. Here only the daemon started below
can own org.freedesktop.secrets, and nothing outside the temp dir is touched.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

APT_PACKAGES = "the apt packages gnome-keyring and dbus (apt-get install gnome-keyring dbus)"
READY_TIMEOUT = 15.0

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""

# Asks through keyring's SecretService backend only, so "ready" means the whole path works:
# bus, daemon, default collection, unlocked.
PROBE = "import keyring; keyring.get_password('mpagent-probe', 'ready')"


class SecretService:
    """The running bus and daemon. `address` goes into DBUS_SESSION_BUS_ADDRESS."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.address = ""
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.daemon: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> SecretService:
        for name in ("home", "data", "config", "cache", "run"):
            (self.root / name).mkdir(mode=0o700)
        conf = self.root / "bus.conf"
        conf.write_text(BUS_CONFIG.format(socket=self.root / "bus"), encoding="utf-8")
        bus = self._spawn(
            "dbus",
            [
                "dbus-daemon",
                f"--config-file={conf}",
                "--nofork",
                "--nopidfile",
                "--print-address=1",
            ],
        )
        assert bus.stdout is not None
        self.address = bus.stdout.readline().decode().strip()
        if not self.address:
            raise RuntimeError(f"dbus-daemon printed no address: {self.logs()}")
        env = {
            **os.environ,
            "DBUS_SESSION_BUS_ADDRESS": self.address,
            "HOME": str(self.root / "home"),
            "XDG_DATA_HOME": str(self.root / "data"),
            "XDG_CONFIG_HOME": str(self.root / "config"),
            "XDG_CACHE_HOME": str(self.root / "cache"),
            "XDG_RUNTIME_DIR": str(self.root / "run"),
        }
        self.daemon = self._spawn(
            "keyring",
            ["gnome-keyring-daemon", "--foreground", "--unlock", "--components=secrets"],
            env=env,
            stdin=subprocess.PIPE,
        )
        assert self.daemon.stdin is not None
        # --unlock reads the password up to EOF and creates the "login" collection with it.
        self.daemon.stdin.write(secrets.token_urlsafe(24).encode())
        self.daemon.stdin.close()
        self._wait_ready()
        return self

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # in case a test left it frozen
                proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()

    def _spawn(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        with open(self.root / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                argv,
                cwd=self.root,
                stdout=subprocess.PIPE if name == "dbus" else log,
                stderr=log,
                **kwargs,
            )
        self.procs.append((name, proc))
        return proc

    def _wait_ready(self) -> None:
        env = {
            **os.environ,
            "DBUS_SESSION_BUS_ADDRESS": self.address,
            "PYTHON_KEYRING_BACKEND": "keyring.backends.SecretService.Keyring",
        }
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            probe = subprocess.run(
                [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=False
            )
            if probe.returncode == 0:
                return
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited {proc.returncode}: {self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no Secret Service answered: {probe.stderr}\n{self.logs()}")
            time.sleep(0.1)

    def logs(self) -> str:
        return "\n".join(
            f"{log.name}: {log.read_text(errors='replace')}" for log in self.root.glob("*.log")
        )

    # -- the test's own view of the store (not through mpagent) -------------------------

    def stored(self, username: str, service: str = "mpagent") -> str | None:
        """The secret keyring's SecretService backend would find, read independently."""
        with self._collection() as collection:
            for item in collection.search_items({"service": service, "username": username}):
                return item.get_secret().decode("utf-8")
        return None

    def usernames(self, service: str = "mpagent") -> set[str]:
        with self._collection() as collection:
            return {
                item.get_attributes()["username"]
                for item in collection.search_items({"service": service})
            }

    def clear(self, service: str = "mpagent") -> None:
        with self._collection() as collection:
            for item in list(collection.search_items({"service": service})):
                item.delete()

    @contextlib.contextmanager
    def _collection(self) -> Iterator[Any]:
        import secretstorage
        from jeepney.io.blocking import open_dbus_connection

        connection = open_dbus_connection(bus=self.address)
        try:
            yield secretstorage.get_default_collection(connection)
        finally:
            connection.close()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The daemon stopped (SIGSTOP): keyring calls block as on a hung D-Bus service."""
        assert self.daemon is not None
        self.daemon.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.daemon.send_signal(signal.SIGCONT)


def _unavailable(reason: str) -> None:
    """Skip where the tools are missing, but fail in CI (MPAGENT_REQUIRE_ALL=1)."""
    if os.environ.get("MPAGENT_REQUIRE_ALL") == "1":
        pytest.fail(f"{reason} (MPAGENT_REQUIRE_ALL=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def secret_service() -> Iterator[SecretService]:
    """A Secret Service on a private session bus for the whole test session."""
    missing = [tool for tool in ("dbus-daemon", "gnome-keyring-daemon") if not shutil.which(tool)]
    if missing:
        _unavailable(f"the keyring tests need {', '.join(missing)}: install {APT_PACKAGES}")
    try:
        import jeepney  # noqa: F401
        import secretstorage  # noqa: F401
    except ImportError as exc:
        _unavailable(f"the keyring tests need secretstorage and jeepney (keyring's deps): {exc}")
    # Short: the bus socket path must fit in sun_path (~104 bytes).
    root = Path(tempfile.mkdtemp(prefix="mpa-ss-", dir="/tmp"))
    service = SecretService(root)
    try:
        service.start()
        yield service
    finally:
        service.stop()
        shutil.rmtree(root, ignore_errors=True)
