"""Secrets stay where the user put them: a whole session at debug log level (autostart,
issuer faults, a rejection, every token-printing command, `exec`, a reload), then every log
line, every CLI stderr, `status`, the argv of every process seen on the machine during the
run, and the environment of every process the run started, are searched for each token the
emulator issued, each grant it was sent, the private key and the keystore password."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from mpagent import autostart, client, paths, protocol
from mpagent.emulator import pki

from ..agentproc import wait_for
from ..conftest import CLIENT_ID, PASSWORD, SCOPES, profile_for, run_cli, write_config
from ..secret_service import SecretService, secret_service  # noqa: F401
from .harness import ProcWatcher, RecordingEmulator, alive

LIFETIME = 4
FAULTS = ("503", "garbage", "drop", "hang")
PASSWORD_VAR = "MPAGENT_KEYSTORE_PASSWORD"
# `exec` runs this: it writes its environment to argv[1], then lingers to be seen in /proc.
DUMP_ENV = "import json, os, sys, time; open(sys.argv[1], 'w').write(json.dumps(dict(os.environ))); time.sleep(0.5)"


def password_forms() -> list[str]:
    """The password as it could appear in text: raw, escaped, percent-encoded, base64."""
    raw = PASSWORD.encode()
    return [
        PASSWORD,
        ascii(PASSWORD)[1:-1],
        json.dumps(PASSWORD)[1:-1],
        protocol.quote(PASSWORD),
        base64.b64encode(raw).decode(),
    ]


def key_forms(leaf: pki.Issued, keystore: Path) -> list[str]:
    """Long enough slices of the private key (PKCS#8 and traditional PEM) and the keystore."""
    forms = ["PRIVATE KEY"]
    for fmt in (serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL):
        pem = leaf.key.private_bytes(
            serialization.Encoding.PEM, fmt, serialization.NoEncryption()
        ).decode()
        forms += [line for line in pem.splitlines() if len(line) == 64][1:-1]
    forms += [base64.b64encode(keystore.read_bytes()).decode()[64:128]]
    forms.append(format(leaf.key.private_numbers().d, "x")[:48])
    return forms


def jwt_forms(jwts: list[str]) -> list[str]:
    """Each JWT whole, and its body and signature alone (the header holds no secret)."""
    forms = []
    for token in jwts:
        _, body, signature = token.split(".")
        forms += [token, body, signature]
    return forms


def found(text: str, secrets: dict[str, list[str]]) -> list[str]:
    return [kind for kind, forms in secrets.items() if any(f in text for f in forms)]


@pytest.fixture(params=["environment", "keyring"])
def password_source(
    request: pytest.FixtureRequest, config: Path, home: Path, monkeypatch: Any
) -> dict[str, str]:
    """Where the agent finds the keystore password: MPAGENT_KEYSTORE_PASSWORD in the
    environment of the `get` that autostarts it (documented and chosen by the user), or the
    OS keyring (a real Secret Service), stored through `mpagent secret set --stdin`. Returns
    the environment to add to that first `get`."""
    if request.param == "environment":
        monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.fail.Keyring")
        return {PASSWORD_VAR: PASSWORD}
    service: SecretService = request.getfixturevalue("secret_service")
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", service.address)
    monkeypatch.delenv("PYTHON_KEYRING_BACKEND", raising=False)
    service.clear()
    stored = subprocess.run(
        [sys.executable, "-m", "mpagent", "secret", "set", "dev", "--stdin"],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        check=False,
    )
    assert stored.returncode == 0, stored.stderr
    assert service.stored("dev/keystore") == PASSWORD
    return {}


@pytest.fixture
def emulator(ca: pki.Issued) -> Any:
    with RecordingEmulator(
        clients={CLIENT_ID: SCOPES}, trust=[ca.cert], token_lifetime=LIFETIME, hang_seconds=2
    ) as emu:
        yield emu


@pytest.fixture
def config(tmp_path: Path, home: Path, emulator: Any, p12: Path, monkeypatch: Any) -> Path:
    path = write_config(
        tmp_path / "config.toml",
        {"dev": profile_for(emulator, p12, scopes=[SCOPES[0], SCOPES[1]])},
        agent={"log_level": "debug"},
        http={"read_timeout": 1},
    )
    monkeypatch.setenv("MPAGENT_CONFIG", str(path))
    return path


def test_secrets_only_where_the_user_asked(
    password_source: dict[str, str],
    emulator: RecordingEmulator,
    leaf: pki.Issued,
    p12: Path,
    home: Path,
    tmp_path: Path,
    report: Any,
) -> None:
    """After a full session at debug level no token, grant, key or password is in any log
    line, CLI stderr, status output or process argv; tokens are in the environment only of
    `exec`'s child, as its MASKINPORTEN_TOKEN_* variables, and the password only as the
    MPAGENT_KEYSTORE_PASSWORD the user gave the agent."""
    dump = tmp_path / "exec-env.json"
    runs: list[subprocess.CompletedProcess[str]] = []

    def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        runs.append(run_cli(*args, env=env))
        return runs[-1]

    with ProcWatcher(marker=str(home)) as watcher:
        assert cli("get", SCOPES[0], env=password_source).returncode == 0, runs[-1].stderr
        agent_pid = int(json.loads(cli("status", "--json").stdout)["pid"])
        for fault in FAULTS:  # every error path the issuer can cause, logged at debug
            emulator.inject(fault)
        wait_for(lambda: sum(emulator.faults_served.values()) == len(FAULTS), timeout=30)
        wait_for(lambda: cli("get", SCOPES[2]).returncode == 0, timeout=30, interval=0.3)
        assert cli("get", "not:registered").returncode == 77
        assert cli("get", "--json", SCOPES[0]).returncode == 0
        assert cli("header", SCOPES[0]).returncode == 0
        assert cli("env").returncode == 0
        assert cli("exec", "--", sys.executable, "-c", DUMP_ENV, str(dump)).returncode == 0
        assert cli("reload").returncode == 0
        issued = emulator.tokens_issued
        wait_for(lambda: emulator.tokens_issued >= issued + 2, timeout=3 * LIFETIME)
        env_file = Path(paths.default_env_file()).read_text()
        status = cli("status").stdout + cli("status", "--json").stdout
        client.call(paths.socket_path(), "stop")
        wait_for(lambda: not alive(agent_pid))

    tokens = [i.token for i in emulator.issued]
    secrets = {
        "token": jwt_forms(tokens),
        "grant": jwt_forms(emulator.grants),
        "key": key_forms(leaf, p12),
        "password": password_forms(),
    }
    log = autostart.log_path().read_text()
    leaks: dict[str, list[str]] = {}
    for line in log.splitlines():
        if kinds := found(line, secrets) + (["a JWT"] if "eyJ" in line else []):
            leaks.setdefault("agent log", []).append(f"{kinds}: {line[:120]}")
    for run in runs:
        if kinds := found(run.stderr, secrets):
            leaks.setdefault("stderr", []).append(f"{kinds}: {run.args[3:6]}")
    if kinds := found(status, secrets):
        leaks["status"] = kinds
    for pid, argvs in watcher.cmdlines.items():
        for argv in argvs:
            if kinds := found(argv.decode(errors="replace"), secrets):
                leaks.setdefault("argv", []).append(f"{kinds}: pid {pid}")
    child_env = json.loads(dump.read_text())
    environ_leaks = environment_leaks(watcher.environs, str(dump), secrets, password_source)
    if environ_leaks:
        leaks["environ"] = environ_leaks
    if kinds := [k for k, v in child_env.items() if found(v, secrets) and not allowed(k, v)]:
        leaks["exec child"] = kinds
    agent_environs = [e for (pid, _), e in watcher.environs.items() if pid == agent_pid]
    exec_environs = [e for (_, argv), e in watcher.environs.items() if str(dump).encode() in argv]
    report(
        password_source=next(iter(password_source), "keyring"),
        log_lines=len(log.splitlines()),
        tokens_issued=len(tokens),
        grants_sent=len(emulator.grants),
        cli_runs=len(runs),
        processes_seen=len(watcher.cmdlines),
        environments_checked=len(watcher.environs),
        proc_scans=watcher.scans,
        leaks=sum(len(v) for v in leaks.values()),
    )
    assert not leaks, leaks
    # The scans looked where the secrets would have been:
    assert "refreshed" in log and "DEBUG" in log and "answered HTTP 503" in log
    assert agent_environs, "the agent's environment was never read"
    assert exec_environs, "the environment of exec's child was never read from /proc"
    assert any(t in env_file for t in tokens)  # the env file is where tokens belong
    assert any(v in tokens for k, v in child_env.items() if k.startswith("MASKINPORTEN_TOKEN_"))


def allowed(name: str, value: str) -> bool:
    """In `exec`'s child a token is expected, as a MASKINPORTEN_TOKEN_* variable."""
    return name.startswith("MASKINPORTEN_TOKEN_") and value.count(".") == 2


def environment_leaks(
    environs: dict[tuple[int, bytes], bytes],
    exec_marker: str,
    secrets: dict[str, list[str]],
    password_env: dict[str, str],
) -> list[str]:
    """Secrets in the environment of processes this run started. `exec`'s child may hold
    tokens (checked separately); the agent and the `get` that started it may hold the
    password as MPAGENT_KEYSTORE_PASSWORD when the user chose that source."""
    leaks = []
    for (pid, argv), environ in environs.items():
        is_exec_child = exec_marker.encode() in argv
        for entry in environ.decode(errors="replace").split("\0"):
            name, _, value = entry.partition("=")
            kinds = found(value, secrets) + found(name, secrets)
            if is_exec_child and allowed(name, value):
                kinds = [k for k in kinds if k != "token"]
            if name == PASSWORD_VAR and password_env.get(PASSWORD_VAR) == value:
                kinds = [k for k in kinds if k != "password"]
            if kinds:
                leaks.append(f"{kinds} in {name} of pid {pid} ({argv[:60]!r})")
    return leaks
