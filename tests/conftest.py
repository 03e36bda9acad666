"""Shared fixtures: a throwaway PKI made per session, the emulator on an ephemeral loopback
port, an isolated user environment per test, and the real CLI as a subprocess.

Each test gets its own HOME, XDG dirs (so its own agent socket and lock), temp dir, emulator
port and environment, so the fast suite can run in parallel (`pytest -n auto`, pytest-xdist);
a Secret Service is started per worker (tests/secret_service.py)."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from mpagent.emulator import Emulator, pki

from . import zygote
from .agentproc import AgentProcess

CLIENT_ID = "6f2c1e8a-2a3b-4c5d-9e8f-0a1b2c3d4e5f"
SCOPES = ("idporten:dcr.read", "idporten:dcr.write", "altinn:serviceowner")
PASSWORD = "store-pw-Ægir-1"  # non-ASCII on purpose


SESSION_DIRS = pytest.StashKey[Path]()


def pytest_configure(config: pytest.Config) -> None:
    _cache_bytecode()
    # keytool (multi-key PKCS#12 fixtures) is a JVM start each time: the client compiler and
    # the serial collector halve its CPU for such short runs. A developer's own setting wins.
    os.environ.setdefault("JAVA_TOOL_OPTIONS", "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")
    # A test without `home` must still reach neither the developer's own agent nor another
    # xdist worker's: the session (each worker's) gets XDG dirs of its own. HOME stays, for
    # the tools' caches (pip, npm).
    root = _private_dir("mpa-s-")
    for name, value in _user_dirs(root).items():
        value.mkdir(mode=0o700)
        os.environ[name] = str(value)
    config.stash[SESSION_DIRS] = root
    zygote.configure(root)


def pytest_unconfigure(config: pytest.Config) -> None:
    zygote.shutdown()
    if SESSION_DIRS in config.stash:
        shutil.rmtree(config.stash[SESSION_DIRS], ignore_errors=True)


def _private_dir(prefix: str) -> Path:
    """Short, because socket paths are limited to ~104 bytes."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(root, 0o700)
    return root


def _user_dirs(root: Path) -> dict[str, Path]:
    return {
        "XDG_CONFIG_HOME": root / "config",
        "XDG_RUNTIME_DIR": root / "run",
        "XDG_STATE_HOME": root / "state",
        "XDG_DATA_HOME": root / "data",
    }


def _cache_bytecode() -> None:
    """Where PYTHONDONTWRITEBYTECODE is set (this machine's environment sets it), every
    `python -m mpagent` the tests start compiles mpagent from source again: an agent took
    2.4 s instead of 1.4 s to be ready here. The session and its subprocesses write bytecode
    to a private cache outside the work tree instead, kept across sessions (entries whose
    source is gone are dropped). A PYTHONPYCACHEPREFIX already set is used as it is."""
    if os.environ.get("PYTHONPYCACHEPREFIX") or not os.environ.get("PYTHONDONTWRITEBYTECODE"):
        return
    if os.name != "posix":
        return
    uid = os.getuid()
    cache = Path(tempfile.gettempdir()) / f"mpagent-test-pycache-{uid}"
    try:
        cache.mkdir(mode=0o700, exist_ok=True)
        info = cache.lstat()
    except OSError:
        return
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or info.st_mode & 0o077:
        return  # not ours alone: bytecode from it could run as us, so compile as before
    for pyc in cache.rglob("*.pyc"):  # bytecode of sources gone (temp venvs of past runs)
        source = Path("/", pyc.parent.relative_to(cache), pyc.name.split(".")[0] + ".py")
        if not source.exists():
            pyc.unlink(missing_ok=True)
    os.environ["PYTHONPYCACHEPREFIX"] = str(cache)
    del os.environ["PYTHONDONTWRITEBYTECODE"]
    sys.pycache_prefix, sys.dont_write_bytecode = str(cache), False


@functools.cache
def issuer_key() -> rsa.RSAPrivateKey:
    """The emulators' token-signing key, one per test process (`Emulator(signing_key=...)`):
    an RSA-2048 key made for each emulator cost ~80 ms of CPU each."""
    return pki.new_rsa_key()


@pytest.fixture(scope="session")
def ca() -> pki.Issued:
    return pki.make_ca()


@pytest.fixture(scope="session")
def other_ca() -> pki.Issued:
    """A CA that the emulators do not trust (unless a test says so)."""
    return pki.make_ca("mpagent throwaway other CA")


@pytest.fixture(scope="session")
def leaf(ca: pki.Issued) -> pki.Issued:
    return pki.make_leaf(ca)


@pytest.fixture
def emulator(ca: pki.Issued) -> Iterator[Emulator]:
    with Emulator(
        clients={CLIENT_ID: SCOPES}, trust=[ca.cert], hang_seconds=3, signing_key=issuer_key()
    ) as emu:
        yield emu


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private HOME with XDG dirs (so this test's own agent socket, lock and env file)."""
    root = private_home(monkeypatch)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def private_home(monkeypatch: pytest.MonkeyPatch) -> Path:
    """A new private HOME with XDG dirs in the environment, and no MPAGENT_ variables; the
    caller removes it. For fixtures of a wider scope than `home` (with MonkeyPatch.context)."""
    root = _private_dir("mpa-")
    for name, value in {"HOME": root, **_user_dirs(root)}.items():
        value.mkdir(mode=0o700, exist_ok=True)
        monkeypatch.setenv(name, str(value))
    for name in list(os.environ):
        if name.startswith("MPAGENT_") and name != "MPAGENT_REQUIRE_ALL":
            monkeypatch.delenv(name)
    return root


@pytest.fixture
def agent(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[AgentProcess]:
    """A running agent for the module's own `config` fixture, with the keystore password in
    the environment and autostart off (so a test never starts a second one by accident)."""
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    monkeypatch.setenv("MPAGENT_NO_AUTOSTART", "1")
    proc = AgentProcess(config, tmp_path / "agent.log").wait_ready()
    yield proc
    proc.stop()


@contextlib.contextmanager
def shared_agent(
    ca: pki.Issued,
    p12_bytes: bytes,
    make_config: Callable[[Path, Emulator, Path], Path],
    clients: Mapping[str, Iterable[str]] | None = None,
    **env: str,
) -> Iterator[AgentProcess]:
    """A running agent for a module's tests that only ask it (an agent start is ~0.6 s of
    CPU), with a HOME, emulator (knowing `clients`, else CLIENT_ID) and keystore of its own;
    `make_config(dir, emulator, p12)` writes its config. Its tokens live an hour, so no
    refresh lands inside a test; a test that changes the agent's state, or needs a token
    just issued, starts its own."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        root = private_home(monkeypatch)
        for name, value in {
            "MPAGENT_KEYSTORE_PASSWORD": PASSWORD,
            "MPAGENT_NO_AUTOSTART": "1",
            **env,
        }.items():
            monkeypatch.setenv(name, value)
        try:
            with Emulator(
                clients=clients or {CLIENT_ID: SCOPES},
                trust=[ca.cert],
                token_lifetime=3600,
                signing_key=issuer_key(),
            ) as emulator:
                p12 = root / "virksomhet.p12"
                p12.write_bytes(p12_bytes)
                config = make_config(root, emulator, p12)
                proc = AgentProcess(config, root / "agent.log").wait_ready()
                try:
                    yield proc
                finally:
                    proc.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def p12_bytes(leaf: pki.Issued, ca: pki.Issued, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The PKCS#12 of `leaf`, made once: its key derivation costs ~50 ms a file."""
    path = tmp_path_factory.mktemp("p12") / "virksomhet.p12"
    return pki.write_pkcs12(path, {"auth": leaf}, PASSWORD, [ca.cert]).read_bytes()


@pytest.fixture
def p12(tmp_path: Path, p12_bytes: bytes) -> Path:
    """This test's own copy of the PKCS#12 of `leaf` (store password PASSWORD)."""
    path = tmp_path / "virksomhet.p12"
    path.write_bytes(p12_bytes)
    return path


def write_config(path: Path, profiles: dict[str, dict[str, Any]], **top: Any) -> Path:
    """A config.toml from plain values (strings, lists, numbers, nested dicts)."""
    lines = [f"{k} = {_toml(v)}" for k, v in top.items() if not isinstance(v, dict)]
    for table, values in top.items():
        if isinstance(values, dict):
            lines.append(f"[{table}]")
            lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    for name, values in profiles.items():
        lines.append(f"[profiles.{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}" = {_toml(v)}' for k, v in value.items()) + "}"
    raise TypeError(value)


def profile_for(emulator: Emulator, keystore: Path, **extra: Any) -> dict[str, Any]:
    return {
        "environment": emulator.issuer,
        "client_id": CLIENT_ID,
        "scopes": [SCOPES[0]],
        "keystore": keystore,
        **extra,
    }


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """The real CLI as a process of its own (forked by tests/zygote.py where it can be), with
    the current (test-isolated) environment."""
    return zygote.run_mpagent(args, {**os.environ, **(env or {})}, timeout, **kwargs)
