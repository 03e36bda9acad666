"""Server mode (issue 15, "running where there is no user session"): `mpagent agent
--foreground-only` / [agent] mode = "server" as real agent processes against the emulator:
JSON log lines on stdout without tokens, gone within 5 s of SIGTERM while a refresh hangs,
no keyring and no autostart; password_file as a mounted Secret looks; the keystore from
MPAGENT_KEYSTORE_B64[_<PROFILE>], in memory."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mpagent import config
from mpagent import passwords as passwords_module
from mpagent.emulator import Emulator
from mpagent.errors import KeystoreError
from mpagent.keys import keystore_from_env
from mpagent.logs import JsonFormatter
from mpagent.passwords import ProfilePasswords

from .agentproc import AgentProcess, wait_for
from .conftest import CLIENT_ID, PASSWORD, SCOPES, issuer_key, profile_for, run_cli, write_config

SCOPE = SCOPES[0]


class ServerAgent(AgentProcess):
    """An `mpagent agent` with arguments of its own, stdout (the JSON log) and stderr apart."""

    def __init__(self, config: Path, directory: Path, *args: str, env: dict[str, str]) -> None:
        self.config, self.log_path = config, directory / "stdout.log"
        self.err_path = directory / "stderr.log"
        from mpagent import paths

        self.socket = paths.socket_path()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._err = open(self.err_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mpagent", "--config", str(config), "agent", *args],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._err,
            env={**os.environ, **env},
        )

    def wait_ready(self, timeout: float = 15.0) -> ServerAgent:
        super().wait_ready(timeout)
        return self

    def stop(self) -> int:
        code = super().stop()
        self._err.close()
        return code

    def stderr(self) -> str:
        return self.err_path.read_text(encoding="utf-8", errors="replace")


def config_with(directory: Path, emulator: Emulator, **profile: Any) -> Path:
    top = profile.pop("top", {})
    values = profile_for(emulator, profile.pop("keystore", directory / "virksomhet.p12"), **profile)
    values = {k: v for k, v in values.items() if v is not None}
    return write_config(directory / "config.toml", {"ci": values}, **top)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture
def env(home: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """No keyring and no autostart for the CLI calls a test makes."""
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.fail.Keyring")
    monkeypatch.setenv("MPAGENT_NO_AUTOSTART", "1")
    return {}


def get_no_agent(cfg: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli("--config", str(cfg), "get", SCOPE, "--no-agent", env=env)


# -- JSON log lines ------------------------------------------------------------------------


def test_json_formatter_keeps_a_record_on_one_line() -> None:
    """A message with a newline and an ESC sequence is one JSON line of ASCII that parses
    back to the message, with time, level and logger."""
    record = logging.LogRecord(
        "mpagent", logging.WARNING, __file__, 1, "a\nb \x1b[31m%s", ("æ",), None
    )
    line = JsonFormatter().format(record)
    assert "\n" not in line and "\x1b" not in line and line.isascii()
    parsed = json.loads(line)
    assert parsed["message"] == "a\nb \x1b[31mæ"
    assert (parsed["level"], parsed["logger"]) == ("warning", "mpagent")
    assert parsed["time"].endswith("Z")


@pytest.mark.slow
def test_foreground_only_logs_json_lines_without_tokens(
    env: dict[str, str], tmp_path: Path, emulator: Emulator, p12: Path
) -> None:
    """`agent --foreground-only`: every stdout line is a JSON object with time, level,
    logger and message; the token it served appears in none of them, nor on stderr."""
    cfg = config_with(tmp_path, emulator, keystore=p12)
    agent = ServerAgent(
        cfg, tmp_path, "--foreground-only", env={"MPAGENT_KEYSTORE_PASSWORD": PASSWORD}
    ).wait_ready()
    try:
        got = run_cli("--config", str(cfg), "get", SCOPE)
        assert got.returncode == 0, got.stderr
        token = got.stdout.strip()
    finally:
        assert agent.stop() == 0
    lines = agent.log().splitlines()
    assert lines, agent.stderr()
    parsed = [json.loads(line) for line in lines]
    assert all({"time", "level", "logger", "message"} <= set(p) for p in parsed)
    assert any("serving on" in p["message"] for p in parsed)
    assert any("server mode" in p["message"] for p in parsed)
    assert token and token not in agent.log() and token not in agent.stderr()


@pytest.mark.slow
def test_log_format_text_keeps_text_in_server_mode(
    env: dict[str, str], tmp_path: Path, emulator: Emulator, p12: Path
) -> None:
    """[agent] log_format = "text" overrides the JSON that server mode implies."""
    cfg = config_with(tmp_path, emulator, keystore=p12, top={"agent": {"log_format": "text"}})
    agent = ServerAgent(
        cfg, tmp_path, "--foreground-only", env={"MPAGENT_KEYSTORE_PASSWORD": PASSWORD}
    ).wait_ready()
    assert agent.stop() == 0
    assert "serving on" in agent.stderr()
    assert not agent.log().strip()


# -- SIGTERM -------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_exits_within_5_s_while_a_refresh_hangs(
    env: dict[str, str], tmp_path: Path, ca: Any, p12: Path
) -> None:
    """With the issuer hanging on the pinned token's request (longer than the read
    timeout would let go) and a `get` waiting on it, SIGTERM ends the agent in under 5 s."""
    with Emulator(
        clients={CLIENT_ID: SCOPES}, trust=[ca.cert], hang_seconds=60, signing_key=issuer_key()
    ) as emulator:
        emulator.inject("hang", 5)
        top = {"http": {"read_timeout": 60, "connect_timeout": 5}}
        cfg = config_with(tmp_path, emulator, keystore=p12, top=top)
        agent = ServerAgent(
            cfg, tmp_path, "--foreground-only", env={"MPAGENT_KEYSTORE_PASSWORD": PASSWORD}
        ).wait_ready()
        waiting = subprocess.Popen(
            [sys.executable, "-m", "mpagent", "--config", str(cfg), "get", SCOPE],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda: emulator.faults_served.get("hang", 0) >= 1)
            time.sleep(0.5)  # the get is connected and waiting on the hanging refresh
            assert waiting.poll() is None and agent.proc.poll() is None
            started = time.monotonic()
            agent.signal(signal.SIGTERM)
            agent.proc.wait(10)
            took = time.monotonic() - started
        finally:
            agent.stop()
            waiting.kill()
            waiting.wait()
        assert took < 5.0, f"took {took:.1f} s: {agent.log()}"
        assert agent.proc.returncode == 0
        assert "not waiting for" in agent.log()  # the request to the issuer was still hanging


# -- password_file -------------------------------------------------------------------------


def test_password_file_opens_the_keystore(
    env: dict[str, str], tmp_path: Path, emulator: Emulator, p12: Path
) -> None:
    """password_file with the password and a trailing newline (as `echo` writes it) opens
    the keystore: `get --no-agent` prints a token."""
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n", encoding="utf-8")
    secret.chmod(0o600)
    got = get_no_agent(config_with(tmp_path, emulator, keystore=p12, password_file=secret))
    assert got.returncode == 0, got.stderr
    assert got.stdout.count(".") == 2


def test_password_file_as_a_mounted_secret_works(
    env: dict[str, str], tmp_path: Path, emulator: Emulator, p12: Path
) -> None:
    """A Kubernetes Secret volume's layout: password -> ..data/password, ..data ->
    ..2026_12_02/, the file 0644 (world-readable, writable by its owner only)."""
    mount = tmp_path / "secrets"
    real = mount / "..2026_12_02_03_00_00.123"
    real.mkdir(parents=True)
    (real / "password").write_text(PASSWORD, encoding="utf-8")
    (real / "password").chmod(0o644)
    (mount / "..data").symlink_to(real.name)
    (mount / "password").symlink_to("..data/password")
    got = get_no_agent(
        config_with(tmp_path, emulator, keystore=p12, password_file=mount / "password")
    )
    assert got.returncode == 0, got.stderr


@pytest.mark.parametrize("mode", [0o646, 0o660])
def test_password_file_writable_by_others_is_refused(
    env: dict[str, str], tmp_path: Path, emulator: Emulator, p12: Path, mode: int
) -> None:
    """A password_file others (or its group) may write is refused: the message names the
    file, the profile and chmod, never the password."""
    secret = tmp_path / "password"
    secret.write_text(PASSWORD, encoding="utf-8")
    secret.chmod(mode)
    got = get_no_agent(config_with(tmp_path, emulator, keystore=p12, password_file=secret))
    assert got.returncode == 78, got.stderr
    assert str(secret) in got.stderr and "profile ci" in got.stderr
    assert "writable" in got.stderr and "chmod go-w" in got.stderr
    assert PASSWORD not in got.stderr and not got.stdout


def test_password_file_with_password_command_is_a_config_error(
    env: dict[str, str], tmp_path: Path, emulator: Emulator, p12: Path
) -> None:
    """A profile with both password_file and password_command is refused, naming both."""
    cfg = config_with(
        tmp_path, emulator, keystore=p12, password_file=tmp_path / "pw", password_command=["true"]
    )
    got = get_no_agent(cfg)
    assert got.returncode == 78
    assert "password_file" in got.stderr and "password_command" in got.stderr


# -- MPAGENT_KEYSTORE_B64 --------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["MPAGENT_KEYSTORE_B64_CI", "MPAGENT_KEYSTORE_B64"])
def test_keystore_from_base64_variable_without_keystore(
    env: dict[str, str], tmp_path: Path, emulator: Emulator, p12_bytes: bytes, variable: str
) -> None:
    """A profile without keystore signs with the keystore in MPAGENT_KEYSTORE_B64_<PROFILE>
    or MPAGENT_KEYSTORE_B64 (wrapped at 76 columns, as `base64` writes it); no file of it
    appears in the test's directories."""
    cfg = config_with(tmp_path, emulator, keystore=None)
    wrapped = "\n".join(b64(p12_bytes)[i : i + 76] for i in range(0, len(b64(p12_bytes)), 76))
    got = get_no_agent(cfg, {variable: wrapped, "MPAGENT_KEYSTORE_PASSWORD": PASSWORD})
    assert got.returncode == 0, got.stderr
    assert got.stdout.count(".") == 2
    home = Path(os.environ["HOME"])
    for root in (tmp_path, home):
        assert not any(p.is_file() and p.read_bytes() == p12_bytes for p in root.rglob("*"))


def test_per_profile_keystore_variable_wins(
    env: dict[str, str], tmp_path: Path, emulator: Emulator, p12_bytes: bytes
) -> None:
    """MPAGENT_KEYSTORE_B64_<PROFILE> beats MPAGENT_KEYSTORE_B64 (which here is garbage)."""
    cfg = config_with(tmp_path, emulator, keystore=None)
    got = get_no_agent(
        cfg,
        {
            "MPAGENT_KEYSTORE_B64_CI": b64(p12_bytes),
            "MPAGENT_KEYSTORE_B64": "not base64 at all!",
            "MPAGENT_KEYSTORE_PASSWORD": PASSWORD,
        },
    )
    assert got.returncode == 0, got.stderr


@pytest.mark.parametrize(
    ("value", "says"), [("c2VjcmV0LXBhc3N3b3Jk!!", "not valid base64"), ("", "set but empty")]
)
def test_bad_base64_keystore_is_a_clear_error(
    env: dict[str, str], tmp_path: Path, emulator: Emulator, value: str, says: str
) -> None:
    """Bad base64 (or an empty variable: an undefined CI secret) is exit 78 naming the
    variable and the profile, never its value."""
    cfg = config_with(tmp_path, emulator, keystore=None)
    got = get_no_agent(cfg, {"MPAGENT_KEYSTORE_B64_CI": value})
    assert got.returncode == 78, got.stderr
    assert "MPAGENT_KEYSTORE_B64_CI" in got.stderr and says in got.stderr
    assert "profile ci" in got.stderr
    assert not value or value not in got.stderr


def test_no_keystore_and_no_variable_names_both_options(
    env: dict[str, str], tmp_path: Path, emulator: Emulator
) -> None:
    """Neither keystore nor MPAGENT_KEYSTORE_B64[_CI]: the error names keystore and both
    variables."""
    got = get_no_agent(config_with(tmp_path, emulator, keystore=None))
    assert got.returncode == 78
    for fragment in ("keystore", "MPAGENT_KEYSTORE_B64_CI", "MPAGENT_KEYSTORE_B64 ", "base64"):
        assert fragment in got.stderr, got.stderr


def test_keystore_type_detection_failure_names_the_variable(
    env: dict[str, str], tmp_path: Path, emulator: Emulator
) -> None:
    """Valid base64 of something that is no keystore: the error names the variable and
    says to set keystore_type."""
    cfg = config_with(tmp_path, emulator, keystore=None)
    got = get_no_agent(cfg, {"MPAGENT_KEYSTORE_B64": b64(b"hello, not a keystore")})
    assert got.returncode == 78
    assert "MPAGENT_KEYSTORE_B64" in got.stderr and "keystore_type" in got.stderr


@pytest.mark.slow
def test_agent_serves_with_the_keystore_from_base64(
    env: dict[str, str], tmp_path: Path, emulator: Emulator, p12_bytes: bytes
) -> None:
    """A server-mode agent whose profile has no keystore file serves tokens from the
    keystore in MPAGENT_KEYSTORE_B64_CI, and `status` says the profile is fine."""
    cfg = config_with(tmp_path, emulator, keystore=None, top={"agent": {"mode": "server"}})
    agent = ServerAgent(
        cfg,
        tmp_path,
        env={"MPAGENT_KEYSTORE_B64_CI": b64(p12_bytes), "MPAGENT_KEYSTORE_PASSWORD": PASSWORD},
    ).wait_ready()
    try:
        got = run_cli("--config", str(cfg), "get", SCOPE)
        assert got.returncode == 0, got.stderr + agent.log()
        status = json.loads(run_cli("--config", str(cfg), "status", "--json").stdout)
        assert status["profiles"] == {"ci": None}
    finally:
        assert agent.stop() == 0
    json.loads(agent.log().splitlines()[0])  # mode = "server" alone implies JSON lines


# -- no keyring, no autostart ----------------------------------------------------------------

RECORDING_BACKEND = '''
import os
import re
from keyring.backend import KeyringBackend


class Recording(KeyringBackend):
    """Writes a line to $KEYRING_LOG at each use."""

    priority = 1

    def _note(self, what, username):
        with open(os.environ["KEYRING_LOG"], "a") as f:
            f.write(f"{what} {username}\\n")

    def get_password(self, service, username):
        self._note("get", username)
        return None

    def set_password(self, service, username, password):
        self._note("set", username)

    def delete_password(self, service, username):
        self._note("delete", username)
'''


@pytest.mark.slow
@pytest.mark.parametrize("server", [False, True])
def test_server_mode_never_asks_the_keyring(
    env: dict[str, str], tmp_path: Path, emulator: Emulator, p12: Path, server: bool
) -> None:
    """A locked profile (no password anywhere): an agent in user mode asks the keyring,
    one with --foreground-only never does (a recording keyring backend tells)."""
    (tmp_path / "recording_keyring.py").write_text(RECORDING_BACKEND, encoding="utf-8")
    log = tmp_path / "keyring.log"
    cfg = config_with(tmp_path, emulator, keystore=p12)
    agent = ServerAgent(
        cfg,
        tmp_path,
        *(["--foreground-only"] if server else []),
        env={
            "PYTHON_KEYRING_BACKEND": "recording_keyring.Recording",
            "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
            "KEYRING_LOG": str(log),
        },
    ).wait_ready()
    try:
        status = json.loads(run_cli("--config", str(cfg), "status", "--json").stdout)
        assert status["passwords"] == {"ci": "locked"}
    finally:
        agent.stop()
    if server:
        assert not log.exists(), log.read_text()
    else:
        assert "get ci/keystore" in log.read_text()


def test_client_does_not_start_a_server_mode_agent(
    home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, emulator: Emulator, p12: Path
) -> None:
    """With [agent] mode = "server" and no agent running, `header` (which needs an agent;
    autostart allowed) exits 69 saying clients do not start it, and no agent answers
    afterwards (get/env/exec run in-process instead: the test below)."""
    monkeypatch.delenv("MPAGENT_NO_AUTOSTART", raising=False)
    cfg = config_with(tmp_path, emulator, keystore=p12, top={"agent": {"mode": "server"}})
    pw = {"MPAGENT_KEYSTORE_PASSWORD": PASSWORD}
    got = run_cli("--config", str(cfg), "header", SCOPE, env=pw)
    assert got.returncode == 69, got.stderr
    assert "--foreground-only" in got.stderr and 'mode = "server"' in got.stderr
    status = run_cli("--config", str(cfg), "status")
    assert status.returncode == 69


def test_unknown_mode_and_log_format_are_config_errors(
    env: dict[str, str], tmp_path: Path, emulator: Emulator, p12: Path
) -> None:
    """[agent] mode and log_format take only their listed values; the error names the key."""
    for key, value in (("mode", "daemon"), ("log_format", "xml")):
        cfg = config_with(tmp_path, emulator, keystore=p12, top={"agent": {key: value}})
        got = get_no_agent(cfg, {"MPAGENT_KEYSTORE_PASSWORD": PASSWORD})
        assert got.returncode == 78
        assert f"[agent] {key}" in got.stderr and repr(value) in got.stderr


# -- the same rules as plain values --------------------------------------------------------


def test_password_file_comes_after_env_and_before_the_keyring(tmp_path: Path) -> None:
    """password_file loses to MPAGENT_KEYSTORE_PASSWORD and beats the keyring; its source
    is "file" and its description names the file."""
    secret = tmp_path / "password"
    secret.write_text("from-file\r\n", encoding="utf-8")
    secret.chmod(0o600)

    def keyring(profile: str, which: str) -> str:
        return "from-keyring"

    env = {"MPAGENT_KEYSTORE_PASSWORD": "from-env"}
    first = ProfilePasswords("ci", env=env, lookup=keyring, interactive=False, password_file=secret)
    assert first.keystore() == "from-env"
    second = ProfilePasswords("ci", env={}, lookup=keyring, interactive=False, password_file=secret)
    assert second.keystore() == "from-file"
    assert second.source("keystore") == "file"
    assert second.described("keystore") == f"password_file {secret}"


def test_server_mode_passwords_skip_keyring_and_prompt(
    tmp_path: Path, emulator: Emulator, p12: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """for_profile(server=True) never calls the keyring nor prompts, even when asked to be
    interactive: no source has the password, so none is found."""
    calls: list[str] = []

    def keyring(profile: str, which: str) -> str:
        calls.append(which)
        return "x"

    def prompt(text: str) -> str:
        calls.append("prompt")
        return "y"

    monkeypatch.setattr(passwords_module, "keyring_get", keyring)
    monkeypatch.setattr("getpass.getpass", prompt)
    monkeypatch.delenv("MPAGENT_KEYSTORE_PASSWORD", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    cfg = config.load(config_with(tmp_path, emulator, keystore=p12))
    server = ProfilePasswords.for_profile(cfg.profile("ci"), interactive=True, server=True)
    assert server.keystore() is None and calls == []
    user = ProfilePasswords.for_profile(cfg.profile("ci"), interactive=True)
    assert user.keystore() == "x" and calls == ["keystore"]


def test_keystore_from_env_rules() -> None:
    """The first non-empty variable wins; whitespace inside is ignored; none set is None;
    only empty ones, or bad base64, raise naming the variable and not the value."""
    names = ("MPAGENT_KEYSTORE_B64_CI", "MPAGENT_KEYSTORE_B64")
    assert keystore_from_env(names, {}) is None
    both = {names[0]: "YWJj\n", names[1]: "ZGVm"}
    assert keystore_from_env(names, both) == (names[0], b"abc")
    assert keystore_from_env(names, {names[0]: "", names[1]: "ZG Vm"}) == (names[1], b"def")
    with pytest.raises(KeystoreError, match="MPAGENT_KEYSTORE_B64_CI is set but empty"):
        keystore_from_env(names, {names[0]: " "})
    with pytest.raises(KeystoreError, match="MPAGENT_KEYSTORE_B64 is not valid base64") as info:
        keystore_from_env(names, {names[1]: "s3cr3t-v@lue"})
    assert "s3cr3t" not in str(info.value)


# -- the sidecar manifest's own configuration ------------------------------------------------


def secret_volume(mount: Path, files: dict[str, bytes]) -> None:
    """A Secret volume as kubelet lays it out: each key a symlink through ..data to a
    timestamped directory, the files mode 0440 (the manifests' defaultMode)."""
    real = mount / "..2026_12_02_03_00_00.000000001"
    real.mkdir(parents=True)
    for name, data in files.items():
        (real / name).write_bytes(data)
        (real / name).chmod(0o440)
        (mount / name).symlink_to(f"..data/{name}")
    (mount / "..data").symlink_to(real.name)


@pytest.mark.slow
def test_sidecar_manifest_config_runs_in_server_mode(
    env: dict[str, str], tmp_path: Path, emulator: Emulator, p12_bytes: bytes
) -> None:
    """deploy/kubernetes/sidecar.yaml's config.toml, its paths moved under the test's
    directory and pointed at the emulator, runs as `agent --foreground-only`: the keystore
    and password_file come from a Secret-like volume (0440 files behind ..data symlinks)
    and `get` is served."""
    import socket

    import yaml

    manifest = Path(__file__).parent.parent / "deploy" / "kubernetes" / "sidecar.yaml"
    (configmap,) = [
        d
        for d in yaml.safe_load_all(manifest.read_text(encoding="utf-8"))
        if d["kind"] == "ConfigMap"
    ]
    text = configmap["data"]["config.toml"]
    secrets, tokens = tmp_path / "secrets", tmp_path / "tokens"
    secret_volume(secrets, {"key.p12": p12_bytes, "password": PASSWORD.encode()})
    tokens.mkdir(mode=0o2750)
    tokens.chmod(0o2750)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    replacements = {
        '"/secrets/': f'"{secrets}/',
        '"/var/run/mpagent"': f'"{tokens}"',
        '"127.0.0.1:7164"': f'"127.0.0.1:{port}"',
        'environment = "test"': f'environment = "{emulator.issuer}"',
    }
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    text = re.sub(r'client_id = "[^"]*"', f'client_id = "{CLIENT_ID}"', text)
    text = re.sub(r"scopes = \[[^\]]*\]", f'scopes = ["{SCOPE}"]', text)
    cfg = tmp_path / "config.toml"
    cfg.write_text(text, encoding="utf-8")
    agent = ServerAgent(cfg, tmp_path, "--foreground-only", env={}).wait_ready()
    try:
        got = run_cli("--config", str(cfg), "get", SCOPE)
        assert got.returncode == 0, got.stderr + agent.log()
        status = json.loads(run_cli("--config", str(cfg), "status", "--json").stdout)
        assert status["passwords"] == {"test": "unlocked (from: file)"}
    finally:
        assert agent.stop() == 0
    assert all(json.loads(line) for line in agent.log().splitlines())
    assert got.stdout.strip() not in agent.log()


# -- review 15 (F2): secrets kept from children, server-mode fallback, stop ----------------


def test_exec_child_sees_no_keystore_and_no_password(
    env: dict[str, str], tmp_path: Path, emulator: Emulator, p12_bytes: bytes
) -> None:
    """`mpagent exec` gives its command the token but none of MPAGENT_KEYSTORE_B64*,
    MPAGENT_KEYSTORE_PASSWORD*, MPAGENT_KEY_PASSWORD* (other variables pass)."""
    cfg = config_with(tmp_path, emulator, keystore=None)
    secrets = {
        "MPAGENT_KEYSTORE_B64_CI": b64(p12_bytes),
        "MPAGENT_KEYSTORE_B64": b64(p12_bytes),
        "MPAGENT_KEYSTORE_PASSWORD": PASSWORD,
        "MPAGENT_KEYSTORE_PASSWORD_CI": PASSWORD,
        "MPAGENT_KEY_PASSWORD_CI": PASSWORD,
        "KEPT_VARIABLE": "yes",
    }
    got = run_cli("--config", str(cfg), "exec", "--no-agent", "--", "env", env=secrets)
    assert got.returncode == 0, got.stderr
    seen = dict(line.split("=", 1) for line in got.stdout.splitlines() if "=" in line)
    assert not [name for name in seen if name.startswith(passwords_module.SECRET_ENV)], seen
    assert seen["KEPT_VARIABLE"] == "yes" and any(n.startswith("MASKINPORTEN_TOKEN") for n in seen)
    assert PASSWORD not in got.stdout and b64(p12_bytes)[:40] not in got.stdout


def test_password_command_sees_no_other_secret(tmp_path: Path) -> None:
    """password_command runs without the keystore variable and the other passwords in its
    environment (what it needs, PATH and HOME, stays)."""
    seen = tmp_path / "seen.json"
    script = (
        "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w')); print('pw')"
    )
    environment = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "MPAGENT_KEYSTORE_B64_CI": "a2V5c3RvcmU=",
        "MPAGENT_KEY_PASSWORD_CI": "key-secret",
        "MPAGENT_KEYSTORE_PASSWORD_OTHER": "other-secret",
    }
    passwords = ProfilePasswords(
        "ci",
        env=environment,
        lookup=lambda *_: None,
        interactive=False,
        commands={"keystore": [sys.executable, "-c", script, str(seen)]},
    )
    assert passwords.keystore() == "pw"
    child = json.loads(seen.read_text(encoding="utf-8"))
    assert child["HOME"] == str(tmp_path) and child["PATH"] == os.environ["PATH"]
    assert not [n for n in child if n.startswith(passwords_module.SECRET_ENV)]


def test_password_file_in_a_directory_others_may_write_is_refused(
    env: dict[str, str], tmp_path: Path, emulator: Emulator, p12: Path
) -> None:
    """A password_file (0600, ours) in a directory anyone may write (no sticky bit), where
    another user could swap it, is refused naming the directory; with the sticky bit it
    is accepted."""
    shared = tmp_path / "shared"
    shared.mkdir()
    secret = shared / "password"
    secret.write_text(PASSWORD, encoding="utf-8")
    secret.chmod(0o600)
    shared.chmod(0o777)
    cfg = config_with(tmp_path, emulator, keystore=p12, password_file=secret)
    got = get_no_agent(cfg)
    assert got.returncode == 78, got.stderr
    assert str(shared) in got.stderr and "others may write" in got.stderr
    assert PASSWORD not in got.stderr
    shared.chmod(0o1777)
    assert get_no_agent(cfg).returncode == 0


def test_password_file_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO as password_file is refused at once (opened non-blocking, fstat checked)."""
    fifo = tmp_path / "password"
    os.mkfifo(fifo, 0o600)
    started = time.monotonic()
    with pytest.raises(passwords_module.SecretUnavailable, match="not a regular file"):
        passwords_module.secret_file(fifo, "ci")
    assert time.monotonic() - started < 2


def test_hints_name_password_file() -> None:
    """The no-keyring hint and the wrong-env-password fix name password_file as a source."""
    assert "password_file" in passwords_module.NO_KEYRING_HINT
    passwords = ProfilePasswords(
        "ci", env={"MPAGENT_KEYSTORE_PASSWORD": "x"}, lookup=lambda *_: None, interactive=False
    )
    assert passwords.keystore() == "x"
    assert "password_file" in passwords._fix("keystore")


def _parse(profile: dict[str, Any], env: dict[str, str] | None, **top: Any) -> config.Config:
    raw = {"profiles": {"ci": {"environment": "test", "client_id": CLIENT_ID, **profile}}, **top}
    return config.parse(raw, Path("/nowhere/config.toml"), env)


def test_parse_reads_the_keystore_variable_from_the_env_it_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """config.parse is pure of the process environment: MPAGENT_KEYSTORE_B64_CI counts only
    in the `env` passed (load() passes os.environ), and the profile records which one."""
    monkeypatch.setenv("MPAGENT_KEYSTORE_B64_CI", "eA==")
    assert "ci" in _parse({}, None).broken
    cfg = _parse({}, {"MPAGENT_KEYSTORE_B64": "", "MPAGENT_KEYSTORE_B64_CI": "eA=="})
    assert cfg.profiles["ci"].keystore_env == "MPAGENT_KEYSTORE_B64_CI"
    assert cfg.profiles["ci"].key_location == "MPAGENT_KEYSTORE_B64_CI"
    blank = _parse({}, {"MPAGENT_KEYSTORE_B64": ""})  # said "empty" when the key is loaded
    assert blank.profiles["ci"].keystore_env == "MPAGENT_KEYSTORE_B64"


def test_a_base64_keystore_is_a_key_for_the_admin_checks() -> None:
    """A certificate keystore from MPAGENT_KEYSTORE_B64 is a key: the profile is its own
    admin profile and refuse_admin_lockout applies; rotate names the variable. A client with
    admin_profile and no key takes only its own variable, not the generic one."""
    from mpagent import adminapi, rotation

    env = {"MPAGENT_KEYSTORE_B64": "eA=="}
    cfg = _parse({"scopes": [SCOPE]}, env)
    prof = cfg.profiles["ci"]
    assert adminapi.admin_profile(cfg, prof) is prof
    with pytest.raises(config.ConfigError, match="its own admin profile"):
        adminapi.refuse_admin_lockout(cfg, prof)
    with pytest.raises(config.ConfigError, match="MPAGENT_KEYSTORE_B64"):
        rotation._new_state(cfg, prof, 0.0)
    raw = {
        "profiles": {
            "admin": {"environment": "test", "client_id": CLIENT_ID, "keystore": "/k.p12"},
            "app": {"environment": "test", "client_id": "app", "admin_profile": "admin"},
        }
    }
    two = config.parse(raw, Path("/nowhere/config.toml"), env)
    assert two.profiles["app"].key_location is None  # no key yet: `mpagent keys create`
    own = config.parse(raw, Path("/nowhere/config.toml"), {"MPAGENT_KEYSTORE_B64_APP": "eA=="})
    assert own.profiles["app"].keystore_env == "MPAGENT_KEYSTORE_B64_APP"


def test_env_variables_is_the_one_naming_rule() -> None:
    """envfile.variables: NAME and NAME_EXPIRES_AT (integer seconds) per token, env_names
    overrides, short names for the default profile, a shared name holds the later token."""
    from mpagent import envfile

    got = envfile.variables(
        "ci",
        {"b": "MY_TOKEN"},
        [("a", "t1", 100.7), ("b", "t2", 200.2)],
        short=True,
    )
    assert got == {
        "MASKINPORTEN_TOKEN_CI_A": "t1",
        "MASKINPORTEN_TOKEN_CI_A_EXPIRES_AT": "100",
        "MASKINPORTEN_TOKEN_A": "t1",
        "MASKINPORTEN_TOKEN_A_EXPIRES_AT": "100",
        "MY_TOKEN": "t2",
        "MY_TOKEN_EXPIRES_AT": "200",
    }


def test_server_mode_get_env_and_exec_run_in_process_without_an_agent(
    home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, emulator: Emulator, p12: Path
) -> None:
    """[agent] mode = "server", no agent running, autostart allowed: `get`, `env` and `exec`
    fetch in their own process (as --no-agent), start no agent and leave none behind."""
    monkeypatch.delenv("MPAGENT_NO_AUTOSTART", raising=False)
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.fail.Keyring")
    cfg = config_with(tmp_path, emulator, keystore=p12, top={"agent": {"mode": "server"}})
    pw = {"MPAGENT_KEYSTORE_PASSWORD": PASSWORD}
    got = run_cli("--config", str(cfg), "get", SCOPE, env=pw)
    assert got.returncode == 0, got.stderr
    assert got.stdout.count(".") == 2
    exported = run_cli("--config", str(cfg), "env", env=pw)
    assert exported.returncode == 0, exported.stderr
    assert "export MASKINPORTEN_TOKEN_" in exported.stdout
    ran = run_cli(
        "--config",
        str(cfg),
        "exec",
        "--",
        "sh",
        "-c",
        'test -n "$MASKINPORTEN_TOKEN_CI_' + SCOPE.upper().replace(":", "_") + '"',
        env=pw,
    )
    assert ran.returncode == 0, ran.stderr
    assert run_cli("--config", str(cfg), "status").returncode == 69  # no agent was started
    header = run_cli("--config", str(cfg), "header", SCOPE, env=pw)
    assert header.returncode == 69 and "--foreground-only" in header.stderr


def test_server_mode_signs_nothing_beside_an_agent_that_closed_the_connection(
    home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, emulator: Emulator, p12: Path
) -> None:
    """The in-process fallback is for "no agent listens" only: a socket that accepts and closes
    the connection (an agent draining) makes `get` fail with that, and signs no grant here."""
    import socket
    import threading

    from mpagent import paths
    from mpagent.private import ensure_private_dir

    monkeypatch.delenv("MPAGENT_NO_AUTOSTART", raising=False)
    cfg = config_with(tmp_path, emulator, keystore=p12, top={"agent": {"mode": "server"}})
    path = Path(paths.socket_path())
    ensure_private_dir(path.parent)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)

    def close_each() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            connection.close()

    threading.Thread(target=close_each, daemon=True).start()
    before = emulator.token_requests
    try:
        got = run_cli(
            "--config", str(cfg), "get", SCOPE, env={"MPAGENT_KEYSTORE_PASSWORD": PASSWORD}
        )
    finally:
        listener.close()
    assert got.returncode == 69 and got.stdout == "", got.stderr
    assert "closed the connection" in got.stderr
    assert emulator.token_requests == before


def test_reload_finishing_after_stop_writes_nothing(
    tmp_path: Path, home: Path, emulator: Emulator, p12: Path
) -> None:
    """Once stopping: a token change schedules no env-file write, and a reload's result is
    not adopted (its tokens could recreate the files being removed)."""
    import asyncio

    from mpagent.agent import Agent, Loaded

    cfg = config.load(config_with(tmp_path, emulator, keystore=p12))
    agent = Agent(cfg, None)

    async def after_stop() -> None:
        agent.stopping.set()
        agent._changed()
        agent._env_changed()
        agent._adopt(cfg, Loaded())

    try:
        asyncio.run(after_stop())
    finally:
        agent.fetch_pool.shutdown()
        agent.io.shutdown()
    assert agent._env_task is None
    assert agent.refresher.sources == {}  # nothing adopted


def test_stop_does_not_wait_for_an_env_write_queued_behind_a_slow_job(
    tmp_path: Path, home: Path, emulator: Emulator, p12: Path
) -> None:
    """At stop, an env-file write queued on the io thread behind a slow job (a reload's
    password_command) is cancelled within about a second, and the file is not written."""
    import asyncio
    import threading

    from mpagent.agent import Agent

    cfg = config.load(config_with(tmp_path, emulator, keystore=p12))
    agent = Agent(cfg, None)
    agent.env_path = tmp_path / "tokens.env"
    agent._env_tokens = lambda: [("MASKINPORTEN_TOKEN_X", "t", 2e9)]  # type: ignore[method-assign]
    release = threading.Event()

    async def stop_while_io_is_busy() -> float:
        agent.io.submit(release.wait, 8)
        agent._env_changed()
        await asyncio.sleep(0.05)
        agent.stopping.set()
        started = time.monotonic()
        await agent._finish_env()
        return time.monotonic() - started

    try:
        took = asyncio.run(stop_while_io_is_busy())
        assert agent.unfinished() == 1  # the slow job only: the write was cancelled
    finally:
        release.set()
        agent.fetch_pool.shutdown()
        agent.io.shutdown()
    assert took < 1.5, took
    assert not agent.env_path.exists()


AGENT_WITH_ATEXIT = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('EXITED NORMALLY', flush=True))\n"
    "from mpagent.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.mark.slow
def test_a_normal_stop_exits_through_the_normal_path(
    env: dict[str, str], tmp_path: Path, emulator: Emulator, p12: Path
) -> None:
    """SIGTERM with nothing in flight: no "not waiting for" line and no os._exit (atexit
    handlers run), exit 0; idle pool threads are not unfinished requests."""
    from mpagent import paths

    cfg = config_with(tmp_path, emulator, keystore=p12)
    out = tmp_path / "out.log"
    with open(out, "wb") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                AGENT_WITH_ATEXIT,
                "--config",
                str(cfg),
                "agent",
                "--foreground-only",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MPAGENT_KEYSTORE_PASSWORD": PASSWORD},
        )
        try:
            wait_for(lambda: Path(paths.socket_path()).exists() and emulator.tokens_issued >= 1)
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = out.read_text(encoding="utf-8", errors="replace")
    assert "not waiting for" not in text, text
    assert "EXITED NORMALLY" in text, text


def test_idle_pool_threads_are_not_unfinished_requests(
    tmp_path: Path, home: Path, emulator: Emulator, p12: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Pool threads that finished their jobs (alive, idle) count as nothing: the stop does
    not take the os._exit path or log "not waiting for"; a job still running counts."""
    import threading

    from mpagent.agent import Agent, _exit_now_if_stuck

    agent = Agent(config.load(config_with(tmp_path, emulator, keystore=p12)), None)
    release = threading.Event()
    try:
        agent.fetch_pool.submit(lambda: None).result()
        agent.io.submit(lambda: None).result()
        assert [t for t in threading.enumerate() if t.name.startswith("mpagent-")]
        assert agent.unfinished() == 0
        with caplog.at_level("INFO", logger="mpagent"):
            _exit_now_if_stuck(0, agent.unfinished())  # returns: no os._exit
        assert "not waiting for" not in caplog.text
        agent.fetch_pool.submit(release.wait, 5)
        assert agent.unfinished() == 1
    finally:
        release.set()
        agent.fetch_pool.shutdown()
        agent.io.shutdown()
    assert agent.unfinished() == 0


SLOW_PASSWORD = """import os, sys, time
if os.path.exists(sys.argv[1]):
    time.sleep(8)
print(sys.argv[2])
"""


@pytest.mark.slow
def test_sigterm_during_a_slow_reload_stops_at_once(
    env: dict[str, str], tmp_path: Path, emulator: Emulator, p12: Path
) -> None:
    """SIGTERM while a reload runs a password_command that takes 8 s: the agent is gone in
    well under 5 s, and neither the env file nor the token files remain."""
    marker, script = tmp_path / "slow", tmp_path / "pw.py"
    script.write_text(SLOW_PASSWORD, encoding="utf-8")
    files, env_file = tmp_path / "files", tmp_path / "tokens.env"
    files.mkdir(mode=0o700)
    top = {"agent": {"env_file": str(env_file)}, "files": {"dir": str(files)}}
    command = [sys.executable, str(script), str(marker), PASSWORD]
    cfg = config_with(tmp_path, emulator, keystore=p12, password_command=command, top=top)
    agent = ServerAgent(cfg, tmp_path, "--foreground-only", env={}).wait_ready()
    try:
        wait_for(lambda: env_file.exists() and any(files.rglob("*.jwt")))
        marker.touch()
        agent.signal(signal.SIGHUP)
        wait_for(lambda: "reloading" in agent.log())
        time.sleep(0.5)  # the reload's password_command is sleeping
        started = time.monotonic()
        agent.signal(signal.SIGTERM)
        agent.proc.wait(10)
        took = time.monotonic() - started
    finally:
        agent.stop()
    print(f"shutdown took {took:.2f} s")
    assert took < 2.5, f"took {took:.1f} s: {agent.log()}"
    assert agent.proc.returncode == 0
    assert not env_file.exists()
    assert not any(files.rglob("*.jwt")) and not any(files.rglob("*.json"))
