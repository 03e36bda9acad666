"""The token bridge: a real agent with [bridge] on an ephemeral loopback port, the real
`mpagent bridge secret` CLI, the emulator behind it, and plain `requests` and raw sockets in
front of it. The keyring is the "fail" backend here (never the developer's own keyring), so
the secret lives in its 0600 file; one test uses a throwaway Secret Service instead."""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import os
import re
import secrets
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from mpagent import bridge, config
from mpagent.agent import load_sources
from mpagent.config import BridgeSettings
from mpagent.emulator import Emulator, pki
from mpagent.errors import ConfigError
from mpagent.private import ensure_private_dir, write_atomic
from mpagent.refresher import Refresher

from .agentproc import AgentProcess, wait_for
from .conftest import PASSWORD, SCOPES, profile_for, run_cli, shared_agent, write_config
from .secret_service import SecretService, secret_service  # noqa: F401

FAIL_KEYRING = "keyring.backends.fail.Keyring"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Running:
    agent: AgentProcess
    port: int
    secret: str
    config: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def post(self, form: dict[str, str], **kwargs: object) -> requests.Response:
        return requests.post(self.url, data=form, timeout=10, **kwargs)  # type: ignore[arg-type]

    def form(self, **extra: str) -> dict[str, str]:
        base = {"grant_type": "client_credentials", "scope": SCOPES[0]}
        return {**base, "client_id": "dev", "client_secret": self.secret, **extra}

    def raw(self, data: bytes, *, wait: float = 10) -> bytes:
        """Send bytes as they are; return everything the bridge answers until it closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=wait) as s:
            s.sendall(data)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


@pytest.fixture
def bridge_env(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Processes of this test use no real keyring, the keystore password, no autostart."""
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", FAIL_KEYRING)
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    monkeypatch.setenv("MPAGENT_NO_AUTOSTART", "1")


def bridge_config(path: Path, emulator: Emulator, p12: Path, port: int, **agent: object) -> Path:
    profiles = {
        "dev": profile_for(emulator, p12),
        "multi": profile_for(emulator, p12, scopes=[SCOPES[1], SCOPES[2]]),
    }
    return write_config(
        path,
        profiles,
        default_profile="dev",
        agent={"log_level": "debug", **agent},
        bridge={"listen": f"127.0.0.1:{port}"},
    )


def make_secret(cfg: Path) -> str:
    """A new secret in the 0600 bridge secret file, as `mpagent bridge secret --file` makes it
    (that command has tests of its own): in-process, sparing each test a CLI start."""
    path = bridge.SecretStore(config.load(cfg).bridge.secret_file).path
    secret = secrets.token_urlsafe(32)
    ensure_private_dir(path.parent)
    write_atomic(path, secret + "\n")
    return secret


def start_agent(cfg: Path, log: Path, port: int, secret: str = "") -> Running:
    agent = AgentProcess(cfg, log).wait_ready()
    wait_for(lambda: "token bridge for HTTP tools on" in agent.log())
    return Running(agent, port, secret, cfg)


@pytest.fixture
def running(bridge_env: None, tmp_path: Path, emulator: Emulator, p12: Path) -> Iterator[Running]:
    port = free_port()
    cfg = bridge_config(tmp_path / "config.toml", emulator, p12, port)
    run = start_agent(cfg, tmp_path / "agent.log", port, make_secret(cfg))
    yield run
    run.agent.stop()
    assert run.secret not in run.agent.log() and "eyJ" not in run.agent.log()


@pytest.fixture(scope="module")
def served(ca: pki.Issued, p12_bytes: bytes) -> Iterator[Running]:
    """One bridge agent for the tests that only send requests and read the answers; the
    tests that change its state, or need a token just issued, get their own (`running`)."""
    port = free_port()
    secret: list[str] = []

    def make_config(root: Path, emulator: Emulator, p12: Path) -> Path:
        cfg = bridge_config(root / "config.toml", emulator, p12, port)
        secret.append(make_secret(cfg))
        return cfg

    with shared_agent(ca, p12_bytes, make_config, PYTHON_KEYRING_BACKEND=FAIL_KEYRING) as agent:
        wait_for(lambda: "token bridge for HTTP tools on" in agent.log())
        yield Running(agent, port, secret[0], agent.config)
        log = agent.log()
    assert secret[0] not in log and "eyJ" not in log


def error_of(response: requests.Response) -> tuple[int, str, str]:
    body = response.json()
    return response.status_code, body["error"], body["error_description"]


def test_basic_auth_gets_the_agents_token(running: Running) -> None:
    """HTTP Basic gets the agent's cached token as RFC 6749 JSON with Cache-Control: no-store."""
    token = run_cli("get", SCOPES[0]).stdout.strip()
    form = {"grant_type": "client_credentials", "scope": SCOPES[0]}
    response = running.post(form, auth=("dev", running.secret))
    assert response.status_code == 200, response.text
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["access_token"] == token and body["token_type"] == "Bearer"
    assert body["scope"] == SCOPES[0] and 100 <= body["expires_in"] <= 120


def test_form_auth_gets_the_same_token(served: Running) -> None:
    """client_id and client_secret as form fields get the same token as HTTP Basic."""
    basic = served.post({"grant_type": "client_credentials"}, auth=("dev", served.secret))
    form = served.post(served.form())
    assert form.status_code == 200 and basic.status_code == 200  # no scope: the one configured
    assert form.json()["access_token"] == basic.json()["access_token"]


def test_basic_and_form_credentials_must_agree(served: Running) -> None:
    """Credentials repeated in the form next to HTTP Basic work if equal, else get 400."""
    basic = ("dev", served.secret)
    assert served.post(served.form(), auth=basic).status_code == 200
    other = served.post(served.form(client_id="multi"), auth=basic)
    assert error_of(other)[:2] == (400, "invalid_request")


def test_wrong_secret_is_invalid_client(served: Running) -> None:
    """A wrong secret, by Basic or by form, gets 401 invalid_client with a Basic challenge."""
    for response in (
        served.post(served.form(client_secret=served.secret[:-1] + "x")),
        served.post({"grant_type": "client_credentials"}, auth=("dev", "nope")),
    ):
        assert error_of(response)[:2] == (401, "invalid_client")
        assert response.headers["WWW-Authenticate"].startswith("Basic")
        assert "access_token" not in response.text


def test_missing_authentication_is_invalid_client(served: Running) -> None:
    """No credentials, or a Bearer header instead of Basic, get 401 invalid_client."""
    assert error_of(served.post({"grant_type": "client_credentials"}))[:2] == (
        401,
        "invalid_client",
    )
    bearer = served.post(
        {"grant_type": "client_credentials"}, headers={"Authorization": "Bearer x"}
    )
    assert error_of(bearer)[:2] == (401, "invalid_client")


def test_unknown_profile_is_invalid_client(served: Running) -> None:
    """A client_id that names no profile gets 401 invalid_client naming the profiles."""
    status, error, description = error_of(served.post(served.form(client_id="nope")))
    assert (status, error) == (401, "invalid_client") and "dev" in description


def test_host_that_is_not_loopback_is_refused(served: Running) -> None:
    """DNS rebinding: a Host that is not localhost, 127.x or [::1] (any port) gets 421."""
    for host in ("evil.example", f"evil.example:{served.port}", "127.0.0.1.nip.io", "0.0.0.0"):  # noqa: S104
        response = served.post(served.form(), headers={"Host": host})
        assert response.status_code == 421 and "access_token" not in response.text, host
    for host in (f"localhost:{served.port}", "127.0.0.1", f"127.0.0.2:{served.port}"):
        assert served.post(served.form(), headers={"Host": host}).status_code == 200, host


def test_browser_requests_are_refused(served: Running) -> None:
    """Any Origin or Sec-Fetch-* header means a browser: 403, even with the right secret."""
    for headers in ({"Origin": "http://127.0.0.1"}, {"Origin": "null"}, {"Sec-Fetch-Mode": "cors"}):
        response = served.post(served.form(), headers=headers)
        assert response.status_code == 403 and "access_token" not in response.text
        assert "Access-Control-Allow-Origin" not in response.headers


def test_unsupported_grant_type(served: Running) -> None:
    """Another grant_type is unsupported_grant_type; no grant_type is invalid_request."""
    jwt_bearer = served.post(served.form(grant_type="urn:ietf:params:oauth:grant-type:jwt-bearer"))
    assert error_of(jwt_bearer)[:2] == (400, "unsupported_grant_type")
    form = served.form()
    del form["grant_type"]
    assert error_of(served.post(form))[:2] == (400, "invalid_request")


def test_unknown_scope_carries_maskinporten_description(served: Running) -> None:
    """A scope Maskinporten refuses is 400 invalid_scope with its description and code."""
    status, error, description = error_of(served.post(served.form(scope="not:registered")))
    assert (status, error) == (400, "invalid_scope")
    assert "MP-200" in description and "not:registered" in description


def test_no_scope_with_several_configured_is_invalid_scope(served: Running) -> None:
    """No scope, and the profile configures several: 400 invalid_scope listing them."""
    status, error, description = error_of(served.post(served.form(client_id="multi", scope="")))
    assert (status, error) == (400, "invalid_scope") and SCOPES[1] in description


def test_issuer_down_serves_the_cached_token(running: Running, emulator: Emulator) -> None:
    """Maskinporten down: a cached token is still served, a cold scope gets 503."""
    cached = running.post(running.form()).json()["access_token"]
    emulator.inject("503", 1000)
    again = running.post(running.form())
    assert again.status_code == 200 and again.json()["access_token"] == cached
    cold = running.post(running.form(client_id="multi", scope=SCOPES[2] + " " + SCOPES[1]))
    assert error_of(cold)[:2] == (503, "temporarily_unavailable")
    assert "503" in error_of(cold)[2]


def test_wrong_method_and_path(served: Running) -> None:
    """GET /token is 405 with Allow: POST; other paths are 404; a query string is 400."""
    get = requests.get(served.url, timeout=10)
    assert get.status_code == 405 and get.headers["Allow"] == "POST"
    assert (
        requests.post(served.url[:-5] + "/other", data=served.form(), timeout=10).status_code == 404
    )
    assert served.post(served.form(), params={"scope": "x"}).status_code == 400


def test_oversized_requests_are_refused(served: Running) -> None:
    """A body over 64 KiB is 413 and a head over 16 KiB 431; the agent keeps serving."""
    big = served.raw(
        b"POST /token HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 70000\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n\r\n"
    )
    assert big.startswith(b"HTTP/1.1 413 ")
    huge = served.raw(b"POST /token HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 20000)
    assert huge.startswith(b"HTTP/1.1 431 ")
    assert served.post(served.form(pad="a" * 60_000)).status_code == 200  # under the cap
    assert run_cli("get", SCOPES[0]).returncode == 0


def test_malformed_requests_get_400s(served: Running) -> None:
    """Malformed, chunked or truncated requests get a 4xx, never a token; serving goes on."""
    head = b"POST /token HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    form = b"Content-Type: application/x-www-form-urlencoded\r\n"
    cases = {
        b"\xff\xfe garbage\r\n\r\n": b"400",
        head + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n": b"411",
        head + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\nab": b"400",
        head + form + b"Content-Length: 1000\r\n\r\nshort": b"400",
        head + b"Content-Length: 4\r\nContent-Type: application/json\r\n\r\n{}{}": b"400",
        head + b"Bad Header: x\r\n\r\n": b"400",
    }
    for request, status in cases.items():
        data = served.raw(request) if b"short" not in request else _half_closed(served, request)
        assert data.startswith(b"HTTP/1.1 " + status), (request, data)
        assert b"access_token" not in data
    assert served.post(served.form()).status_code == 200


def _half_closed(running: Running, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        return s.recv(65536)


def test_no_secret_every_request_is_refused_until_bridge_secret_makes_one(
    bridge_env: None, tmp_path: Path, emulator: Emulator, p12: Path
) -> None:
    """No secret: requests get 401 naming `bridge secret`; that makes one the agent takes at once."""
    port = free_port()
    cfg = bridge_config(tmp_path / "config.toml", emulator, p12, port)
    run = start_agent(cfg, tmp_path / "agent.log", port)
    try:
        response = run.post(run.form(client_secret="anything"))
        status, error, description = error_of(response)
        assert (status, error) == (401, "invalid_client") and "mpagent bridge secret" in description
        assert "ERROR" in run.agent.log() and "mpagent bridge secret" in run.agent.log()
        assert run_cli("get", SCOPES[0]).returncode == 0  # the agent itself is fine
        made = run_cli("--config", str(cfg), "bridge", "secret")
        assert made.returncode == 0, made.stderr
        assert stderr_lines(made) == [
            f"mpagent: no bridge secret yet: made one, kept in {secret_file()} (mode 0600); "
            "the OS keyring is not usable here",
            f"mpagent: the running agent took it: the bridge on {run.url} accepts it",
        ]
        run.secret = made.stdout.strip()
        assert run.post(run.form()).status_code == 200
        assert run.agent.proc.poll() is None  # no restart
    finally:
        run.agent.stop()


def test_secret_file_is_read_privately(tmp_path: Path) -> None:
    """The secret file is read when it is a 0600 file of ours; a symlink in its place is
    refused (ELOOP) rather than followed, and a file open to others names its mode and fix."""
    real = tmp_path / "real.secret"
    real.write_text("s3cret\n")
    real.chmod(0o600)
    assert bridge.SecretStore(real).read_file() == "s3cret"
    link = tmp_path / "bridge.secret"
    link.symlink_to(real)
    with pytest.raises(OSError) as raised:
        bridge.SecretStore(link).read_file()
    assert raised.value.errno == errno.ELOOP
    real.chmod(0o604)
    with pytest.raises(ConfigError) as refused:
        bridge.SecretStore(real).read_file()
    assert str(refused.value) == (
        f"{real} is not a private file of yours (mode 604); `chmod 600 {real}` if it is, "
        "else `mpagent bridge secret --rotate`"
    )


def test_secret_file_open_to_others_is_refused_and_rotate_replaces_it(
    bridge_env: None, tmp_path: Path, emulator: Emulator, p12: Path
) -> None:
    """A secret file others can read is not used (401, exit 78 naming it); --rotate replaces it."""
    port = free_port()
    cfg = bridge_config(tmp_path / "config.toml", emulator, p12, port)
    secret = make_secret(cfg)
    secret_file().chmod(0o644)
    run = start_agent(cfg, tmp_path / "agent.log", port, secret)
    try:
        assert run.post(run.form()).status_code == 401
        assert "not a private file" in run.agent.log()
        shown = run_cli("--config", str(cfg), "bridge", "secret")
        assert shown.returncode == 78 and shown.stdout == ""
        assert f"{secret_file()} is not a private file of yours (mode 644)" in shown.stderr
        assert f"chmod 600 {secret_file()}" in shown.stderr and "--rotate" in shown.stderr
        rotated = run_cli("--config", str(cfg), "bridge", "secret", "--rotate")
        assert rotated.returncode == 0, rotated.stderr
        assert "the running agent took it" in rotated.stderr
        assert stat.S_IMODE(secret_file().stat().st_mode) == 0o600
        run.secret = rotated.stdout.strip()
        assert run.secret != secret and run.post(run.form()).status_code == 200
    finally:
        run.agent.stop()


def secret_file() -> Path:
    return Path(os.environ["XDG_CONFIG_HOME"]) / "mpagent" / "bridge.secret"


def stderr_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return result.stderr.splitlines()


def test_bridge_secret_shows_the_current_one(bridge_env: None, tmp_path: Path) -> None:
    """`bridge secret` makes a secret once (0600 file, no keyring), then shows that same one."""
    cfg = write_config(
        tmp_path / "config.toml",
        {"dev": {"environment": "test", "client_id": "x", "scopes": ["s"], "keystore": "k.p12"}},
    )
    first = run_cli("--config", str(cfg), "bridge", "secret")
    where = f"{secret_file()} (mode 0600)"
    assert first.returncode == 0, first.stderr
    assert stderr_lines(first) == [
        f"mpagent: no bridge secret yet: made one, kept in {where}; "
        "the OS keyring is not usable here",
        f'mpagent: the bridge is off; add [bridge] listen = "127.0.0.1:8765" to {cfg}',
    ]
    secret = first.stdout.strip()
    assert first.stdout == secret + "\n" and len(secret) >= 43
    assert secret.replace("-", "").replace("_", "").isalnum()
    assert stat.S_IMODE(secret_file().stat().st_mode) == 0o600
    for argv in (["bridge", "secret"], ["bridge", "secret", "--file"]):
        again = run_cli("--config", str(cfg), *argv)
        assert again.returncode == 0 and again.stdout == first.stdout, again.stderr
        assert stderr_lines(again)[0] == f"mpagent: the bridge secret, kept in {where}"
    assert secret_file().read_text() == first.stdout


def test_rotate_without_an_agent(
    bridge_env: None, tmp_path: Path, emulator: Emulator, p12: Path
) -> None:
    """--rotate makes a new secret where the old one was; with no agent running, it says so."""
    cfg = bridge_config(tmp_path / "config.toml", emulator, p12, free_port())
    old = make_secret(cfg)
    rotated = run_cli("--config", str(cfg), "bridge", "secret", "--rotate")
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip()
    assert new != old and secret_file().read_text() == new + "\n"
    assert stderr_lines(rotated) == [
        f"mpagent: made a new bridge secret, kept in {secret_file()} (mode 0600); tools "
        "holding the old one need this",
        "mpagent: no agent is running; the next one to start uses it",
    ]


def test_rotate_reaches_the_running_agent_without_a_restart(running: Running) -> None:
    """--rotate: the running agent reloads, the new secret works and the old one gets 401."""
    before = json.loads(run_cli("status", "--json").stdout)["pid"]
    rotated = run_cli("--config", str(running.config), "bridge", "secret", "--rotate")
    assert rotated.returncode == 0, rotated.stderr
    assert stderr_lines(rotated)[1] == (
        f"mpagent: the running agent took it: the bridge on {running.url} accepts it"
    )
    old, running.secret = running.secret, rotated.stdout.strip()
    assert running.post(running.form()).status_code == 200
    refused = running.post(running.form(client_secret=old))
    assert error_of(refused)[:2] == (401, "invalid_client")
    assert "mpagent bridge secret` shows the current one" in error_of(refused)[2]
    assert json.loads(run_cli("status", "--json").stdout)["pid"] == before  # no restart
    assert old not in running.agent.log()


def test_rotate_when_the_bridge_listens_elsewhere(
    bridge_env: None, tmp_path: Path, emulator: Emulator, p12: Path
) -> None:
    """Config says another port than the agent listens on: --rotate says no bridge answers there."""
    port, other = free_port(), free_port()
    cfg = bridge_config(tmp_path / "config.toml", emulator, p12, port)
    run = start_agent(cfg, tmp_path / "agent.log", port, make_secret(cfg))
    try:
        bridge_config(cfg, emulator, p12, other)
        rotated = run_cli("--config", str(cfg), "bridge", "secret", "--rotate")
        assert rotated.returncode == 0, rotated.stderr
        line = stderr_lines(rotated)[1]
        assert line.startswith(
            f"mpagent: the running agent reloaded, but no token bridge answers on "
            f"http://127.0.0.1:{other}/token"
        )
        assert "`mpagent stop`, then start it again" in line
        wait_for(lambda: "[bridge] listen changes when the agent restarts" in run.agent.log())
        run.secret = rotated.stdout.strip()
        assert run.post(run.form()).status_code == 200  # the old port, the new secret
    finally:
        run.agent.stop()


@pytest.mark.keyring
def test_bridge_secret_in_the_keyring(
    secret_service: SecretService,  # noqa: F811
    bridge_env: None,
    tmp_path: Path,
    emulator: Emulator,
    p12: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kept in the keyring, shown again from there; `--file` moves the same secret to the file."""
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", secret_service.address)
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.SecretService.Keyring")
    secret_service.clear()
    port = free_port()
    cfg = bridge_config(tmp_path / "config.toml", emulator, p12, port)
    made = run_cli("--config", str(cfg), "bridge", "secret")
    keyring = 'the OS keyring (service "mpagent", username "bridge")'
    assert made.returncode == 0, made.stderr
    assert stderr_lines(made)[0] == f"mpagent: no bridge secret yet: made one, kept in {keyring}"
    secret = made.stdout.strip()
    assert secret_service.stored("bridge") == secret and not secret_file().exists()
    shown = run_cli("--config", str(cfg), "bridge", "secret")
    assert shown.stdout == made.stdout
    assert stderr_lines(shown) == [f"mpagent: the bridge secret, kept in {keyring}"]
    run = start_agent(cfg, tmp_path / "agent.log", port, secret)
    try:
        assert run.post(run.form()).status_code == 200
        assert f"using the secret in {keyring}" in run.agent.log()
        moved = run_cli("--config", str(cfg), "bridge", "secret", "--file")
        assert moved.returncode == 0 and moved.stdout == made.stdout, moved.stderr
        assert stderr_lines(moved) == [
            f"mpagent: moved the bridge secret, unchanged, to {secret_file()} (mode 0600)",
            f"mpagent: the running agent took it: the bridge on {run.url} accepts it",
        ]
        assert secret_service.stored("bridge") is None
        assert secret_file().read_text() == made.stdout
        assert run.post(run.form()).status_code == 200
    finally:
        run.agent.stop()
    secret_service.clear()


@pytest.mark.keyring
def test_rotate_says_when_the_agent_cannot_read_the_keyring(
    secret_service: SecretService,  # noqa: F811
    bridge_env: None,
    tmp_path: Path,
    emulator: Emulator,
    p12: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An agent without the keyring keeps its secret; the CLI says so and how to fix it."""
    port = free_port()
    cfg = bridge_config(tmp_path / "config.toml", emulator, p12, port)
    old = make_secret(cfg)
    run = start_agent(cfg, tmp_path / "agent.log", port, old)  # the "fail" keyring backend
    try:
        monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", secret_service.address)
        monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.SecretService.Keyring")
        secret_service.clear()
        secret_file().unlink()
        made = run_cli("--config", str(cfg), "bridge", "secret")
        assert made.returncode == 0, made.stderr
        assert stderr_lines(made)[1] == (
            f"mpagent: the running agent's bridge on {run.url} still refuses it: the agent "
            "cannot read it (its log says why; an agent outside your desktop session may have "
            "no OS keyring); `mpagent bridge secret --file` moves it to a file the agent can read"
        )
        assert run.post(run.form()).status_code == 200  # the previous secret keeps working
        assert "the previous secret keeps working" in run.agent.log()
        moved = run_cli("--config", str(cfg), "bridge", "secret", "--file")
        assert "the running agent took it" in stderr_lines(moved)[1], moved.stderr
        run.secret = moved.stdout.strip()
        assert run.post(run.form()).status_code == 200
        assert run.post(run.form(client_secret=old)).status_code == 401
    finally:
        run.agent.stop()
    secret_service.clear()


def test_secret_and_tokens_never_logged(running: Running) -> None:
    """At debug level the agent log holds neither the bridge secret nor any token."""
    tokens = [running.post(running.form()).json()["access_token"] for _ in range(3)]
    running.post(running.form(client_secret="wrong-" + running.secret))
    basic = base64.b64encode(f"dev:{running.secret}".encode()).decode()
    running.post({"grant_type": "password"}, headers={"Authorization": f"Basic {basic}"})
    log = running.agent.log()
    assert "bridge: 401 invalid_client" in log and "bridge: token …" in log
    for secret in (running.secret, running.secret[:12], running.secret[-12:], basic, *tokens):
        assert secret not in log
    assert "eyJ" not in log


def test_start_refuses_a_non_loopback_address() -> None:
    """bridge.start checks again: a non-loopback listen address is a ConfigError."""
    for host in ("0.0.0.0", "192.0.2.1", "example.org"):  # noqa: S104
        with pytest.raises(ConfigError, match="listen"):
            asyncio.run(bridge.start(BridgeSettings((host, 8765)), None, None))  # type: ignore[arg-type]


def test_slow_client_times_out_and_others_are_served(
    bridge_env: None, tmp_path: Path, emulator: Emulator, p12: Path
) -> None:
    """A client that never finishes gets 408 after the read timeout; others are served meanwhile."""
    port = free_port()
    cfg = config.load(bridge_config(tmp_path / "config.toml", emulator, p12, port))
    secret = make_secret(cfg.path)
    done: dict[str, object] = {}

    def clients() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            slow.sendall(b"POST /token HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n")
            started = time.monotonic()
            form = {"grant_type": "client_credentials", "client_id": "dev", "client_secret": secret}
            done["other"] = requests.post(f"http://127.0.0.1:{port}/token", data=form, timeout=5)
            done["slow"] = slow.recv(65536)
            done["waited"] = time.monotonic() - started

    async def main() -> None:
        with ThreadPoolExecutor(2) as pool, ThreadPoolExecutor(1) as io:
            refresher = Refresher(pool)
            loaded = load_sources(cfg)
            refresher.set_sources(loaded.sources, cfg.default_profile, loaded.unusable)
            server = await bridge.start(cfg.bridge, refresher, io, read_timeout=1.0)
            try:
                await asyncio.to_thread(clients)
            finally:
                server.close()

    asyncio.run(main())
    assert done["other"].status_code == 200  # type: ignore[attr-defined]
    assert done["slow"].startswith(b"HTTP/1.1 408 ")  # type: ignore[attr-defined]
    assert 0.8 < done["waited"] < 5  # type: ignore[operator]


def test_postman_files(running: Running, tmp_path: Path, emulator: Emulator, p12: Path) -> None:
    """`mpagent postman` writes an environment and a v2.1 collection with both bridge variants,
    each 0600 (the secret may be pasted into the environment)."""
    cfg, port = running.config, running.port
    out = tmp_path / "postman"
    result = run_cli("--config", str(cfg), "postman", "--profile", "dev", "--out", str(out))
    assert result.returncode == 0, result.stderr
    env_file = out / "mpagent-dev.postman_environment.json"
    coll_file = out / "mpagent-dev.postman_collection.json"
    assert f"wrote {env_file}" in result.stdout and f"wrote {coll_file}" in result.stdout
    assert {stat.S_IMODE(f.stat().st_mode) for f in (env_file, coll_file)} == {0o600}
    assert f"-e <(mpagent --config {cfg} postman --profile dev --with-secret)" in result.stdout
    env = {v["key"]: v for v in json.loads(env_file.read_text())["values"]}
    assert env["token_url"]["value"] == f"http://127.0.0.1:{port}/token"
    assert env["client_id"]["value"] == "dev" and env["scope"]["value"] == SCOPES[0]
    assert (
        env["client_secret"]["type"] == "secret"
        and "mpagent bridge secret" in env["client_secret"]["value"]
    )
    coll = json.loads(coll_file.read_text())
    assert coll["info"]["schema"].endswith("/v2.1.0/collection.json")
    oauth2 = {p["key"]: p["value"] for p in coll["auth"]["oauth2"]}
    assert (
        oauth2["grant_type"] == "client_credentials" and oauth2["accessTokenUrl"] == "{{token_url}}"
    )
    folders = {folder["name"]: folder for folder in coll["item"]}
    script = folders["Pre-request script (Postman and newman)"]
    assert script["auth"]["type"] == "bearer"
    source = "\n".join(script["event"][0]["script"]["exec"])
    assert "pm.sendRequest" in source and "pm.execution.skipRequest()" in source
    off = write_config(tmp_path / "off.toml", {"dev": profile_for(emulator, p12)})
    refused = run_cli("--config", str(off), "postman", "--out", str(out))
    assert refused.returncode == 78 and "[bridge]" in refused.stderr


def test_postman_with_secret_prints_the_environment_only(
    bridge_env: None, tmp_path: Path, emulator: Emulator, p12: Path
) -> None:
    """--with-secret prints the environment holding the current secret and writes no file."""
    port = free_port()
    cfg = bridge_config(tmp_path / "config.toml", emulator, p12, port)
    agent = start_agent(cfg, tmp_path / "agent.log", port).agent  # a new user's: no secret yet
    try:
        work = tmp_path / "work"
        work.mkdir()
        first = run_cli("--config", str(cfg), "postman", "--with-secret", cwd=work)
        assert first.returncode == 0, first.stderr
        assert "no bridge secret yet: made one" in first.stderr  # a new user's first newman run
        secret = secret_file().read_text().strip()
        env = {v["key"]: v["value"] for v in json.loads(first.stdout)["values"]}
        assert env["client_secret"] == secret and env["client_id"] == "dev"
        again = run_cli("--config", str(cfg), "postman", "--with-secret", cwd=work)
        assert again.returncode == 0 and again.stdout == first.stdout and again.stderr == ""
        assert list(work.iterdir()) == []
        both = run_cli("--config", str(cfg), "postman", "--with-secret", "--out", str(work))
        assert both.returncode == 2 and "not allowed with argument" in both.stderr
    finally:
        agent.stop()


# A command line that would carry the secret: newman's `--env-var client_secret=...` (what
# `mpagent postman` used to suggest), or the secret substituted into any argument.
ARGV_SECRET = re.compile(r"--env-var[ =]\S*client_secret=|client_secret=\S*\$\(mpagent")


def test_no_hint_puts_the_secret_in_argv(
    running: Running, tmp_path: Path, emulator: Emulator, p12: Path
) -> None:
    """No output of bridge secret, postman, status, help or the bridge puts a secret in argv."""
    cli = ["--config", str(running.config)]
    off = write_config(tmp_path / "off.toml", {"dev": profile_for(emulator, p12)})
    results = [
        run_cli(*cli, "bridge", "secret"),
        run_cli(*cli, "bridge", "secret", "--file"),
        run_cli(*cli, "postman", "--out", str(tmp_path / "p")),
        run_cli(*cli, "status"),
        run_cli(*cli, "bridge", "--help"),
        run_cli(*cli, "postman", "--help"),
        run_cli(*cli, "postman", "--with-secret"),
        run_cli("--config", str(off), "postman"),
    ]
    rotated = run_cli(*cli, "bridge", "secret", "--rotate")
    secrets_seen = {running.secret, rotated.stdout.strip()}
    answers = [
        running.post(running.form(client_secret="wrong")).text,
        running.post(running.form(client_id="nope")).text,
    ]
    texts = [r.stderr for r in (*results, rotated)] + [r.stdout for r in results[2:6]] + answers
    collection = (tmp_path / "p" / "mpagent-dev.postman_collection.json").read_text()
    for text in [*texts, collection]:
        assert not ARGV_SECRET.search(text), text
        assert not any(secret in text for secret in secrets_seen), text
    assert all(r.returncode == 0 for r in (*results[:7], rotated))
    assert results[7].returncode == 78


def test_concurrent_requests_share_one_token(running: Running) -> None:
    """Twenty simultaneous requests for a cold scope all get the same single token."""
    results: list[requests.Response] = []
    form = running.form(client_id="multi", scope=SCOPES[2])
    threads = [
        threading.Thread(target=lambda: results.append(running.post(form))) for _ in range(20)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in results)
    assert len({r.json()["access_token"] for r in results}) == 1


def test_secret_file_not_utf8_is_refused_and_rotate_replaces_it(
    bridge_env: None, tmp_path: Path, emulator: Emulator, p12: Path
) -> None:
    """A secret file that is not UTF-8 does not stop the agent: every request is refused
    (401, the log says why); `bridge secret` exits 78 naming it and --rotate."""
    port = free_port()
    cfg = bridge_config(tmp_path / "config.toml", emulator, p12, port)
    make_secret(cfg)
    secret_file().write_bytes(b"\xff\xfe")
    message = f"{secret_file()} is not UTF-8 text; `mpagent bridge secret --rotate` replaces it"
    run = start_agent(cfg, tmp_path / "agent.log", port, "whatever")
    try:
        assert run.post(run.form()).status_code == 401
        assert message in run.agent.log()
        shown = run_cli("--config", str(cfg), "bridge", "secret")
        assert shown.returncode == 78 and shown.stdout == ""
        assert message in shown.stderr
        rotated = run_cli("--config", str(cfg), "bridge", "secret", "--rotate")
        assert rotated.returncode == 0, rotated.stderr
        run.secret = rotated.stdout.strip()
        assert run.post(run.form()).status_code == 200
    finally:
        run.agent.stop()
