"""Shared fixtures: a throwaway PKI made per session, the emulator on an ephemeral loopback
port, an isolated user environment per test, and the real CLI as a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mpagent import pki
from mpagent.emulator import Emulator

CLIENT_ID = "6f2c1e8a-2a3b-4c5d-9e8f-0a1b2c3d4e5f"
SCOPES = ("idporten:dcr.read", "idporten:dcr.write", "altinn:serviceowner")
PASSWORD = "store-pw-Ægir-1"  # non-ASCII on purpose


@pytest.fixture(scope="session")
def ca() -> pki.Issued:
    return pki.make_ca()


@pytest.fixture(scope="session")
def leaf(ca: pki.Issued) -> pki.Issued:
    return pki.make_leaf(ca)


@pytest.fixture
def emulator(ca: pki.Issued) -> Iterator[Emulator]:
    with Emulator(clients={CLIENT_ID: SCOPES}, trust=[ca.cert], hang_seconds=3) as emu:
        yield emu


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private HOME with XDG dirs; short, because socket paths are limited to ~104 bytes."""
    root = Path(tempfile.mkdtemp(prefix="mpa-", dir="/tmp"))
    os.chmod(root, 0o700)
    env = {
        "HOME": root,
        "XDG_CONFIG_HOME": root / "config",
        "XDG_RUNTIME_DIR": root / "run",
        "XDG_STATE_HOME": root / "state",
        "XDG_DATA_HOME": root / "data",
    }
    for name, value in env.items():
        value.mkdir(mode=0o700, exist_ok=True)
        monkeypatch.setenv(name, str(value))
    for name in list(os.environ):
        if name.startswith("MPAGENT_") and name != "MPAGENT_REQUIRE_ALL":
            monkeypatch.delenv(name)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def p12(tmp_path: Path, leaf: pki.Issued, ca: pki.Issued) -> Path:
    return pki.write_pkcs12(tmp_path / "virksomhet.p12", leaf, ca, PASSWORD)


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
    """The real CLI as a subprocess, with the current (test-isolated) environment."""
    return subprocess.run(
        [sys.executable, "-m", "mpagent", *args],
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )
