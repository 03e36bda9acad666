"""Passwords in the OS keyring: the real `mpagent secret` CLI and a real agent against a real
Secret Service (gnome-keyring-daemon on a private D-Bus session, see secret_service.py), and
the "no usable keyring" paths, which need no daemon."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mpagent import client, paths
from mpagent.emulator import Emulator, pki

from . import zygote
from .agentproc import AgentProcess, wait_for
from .conftest import PASSWORD, SCOPES, profile_for, run_cli, write_config
from .keystores import write_jks
from .secret_service import SecretService, secret_service  # noqa: F401

KEY_PASSWORD = "key-pw-Øya-2"
ENV_NAMES = ("MPAGENT_KEYSTORE_PASSWORD", "MPAGENT_KEY_PASSWORD")
FAIL_BACKEND = {"PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}
SECRET_SERVICE_WITHOUT_BUS = {
    "PYTHON_KEYRING_BACKEND": "keyring.backends.SecretService.Keyring",
    "DBUS_SESSION_BUS_ADDRESS": "unix:path=/nonexistent/mpagent-test-bus",
}


# -- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture
def keyring_service(
    secret_service: SecretService,  # noqa: F811
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> SecretService:
    """This test's processes use the throwaway Secret Service, which starts out empty."""
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", secret_service.address)
    monkeypatch.delenv("PYTHON_KEYRING_BACKEND", raising=False)
    monkeypatch.setenv("MPAGENT_NO_AUTOSTART", "1")
    secret_service.clear()
    return secret_service


@pytest.fixture
def config(tmp_path: Path, home: Path, emulator: Emulator, p12: Path) -> Path:
    profiles = {
        "dev": profile_for(emulator, p12),
        "prod": profile_for(emulator, p12, scopes=[SCOPES[1]]),
    }
    return write_config(
        tmp_path / "config.toml", profiles, default_profile="dev", agent={"log_level": "debug"}
    )


@pytest.fixture
def one_profile(tmp_path: Path, home: Path, emulator: Emulator, p12: Path) -> Path:
    """A config with the single profile dev, for agents: a strict reload needs every profile."""
    return write_config(
        tmp_path / "one.toml", {"dev": profile_for(emulator, p12)}, agent={"log_level": "debug"}
    )


def start_agent(config: Path, home: Path) -> AgentProcess:
    # The log lives outside the watched directories (those of the config and the keystore):
    # at debug level watchdog logs each write to a watched file, which would feed itself.
    return AgentProcess(config, home / "agent.log").wait_ready()


def secret(
    config: Path, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`mpagent --config CONFIG secret ARGS` with `stdin` piped in (none: /dev/null)."""
    return run_cli("--config", str(config), "secret", *args, input=stdin, env=env)


def get_no_agent(
    config: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_cli("--config", str(config), "get", SCOPES[0], "--no-agent", env=env)


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text and KEY_PASSWORD not in text


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr
    assert_no_secret(result.stdout, result.stderr)


def status_rows(result: subprocess.CompletedProcess[str]) -> dict[str, list[str]]:
    """`secret status` output → profile → [keystore column, key column]."""
    assert_ok(result)
    rows = {}
    for line in result.stdout.splitlines()[2:-1]:
        name, rest = line.split(None, 1)
        rows[name] = [cell.strip() for cell in rest.split("  ") if cell.strip()]
    return rows


# -- with a real Secret Service ---------------------------------------------------------


@pytest.mark.keyring
def test_agent_signs_with_the_password_set_through_the_cli(
    keyring_service: SecretService, one_profile: Path, home: Path, emulator: Emulator
) -> None:
    """`secret set --stdin` stores the exact line (non-ASCII, no newline) and an agent with no
    password in its environment gets a token with it; no output or log holds the password."""
    stored = secret(one_profile, "set", "dev", "--stdin", stdin=PASSWORD + "\n")
    assert_ok(stored)
    assert "stored the keystore password of profile dev" in stored.stdout
    assert keyring_service.stored("dev/keystore") == PASSWORD
    assert not any(name in os.environ for name in ENV_NAMES)
    agent = start_agent(one_profile, home)
    try:
        got = run_cli("get", SCOPES[0])
        assert_ok(got)
        assert got.stdout.startswith("eyJ") and emulator.token_requests >= 1
    finally:
        agent.stop()
    assert_no_secret(agent.log())


@pytest.mark.keyring
def test_status_says_what_is_stored_never_the_value(
    keyring_service: SecretService, config: Path
) -> None:
    """`secret status` lists every configured profile with stored / not stored per password,
    and a named profile even when the config does not have it; it never prints a value."""
    assert_ok(secret(config, "set", "dev", "--stdin", stdin=PASSWORD))
    assert_ok(secret(config, "set", "prod", "--key", "--stdin", stdin=KEY_PASSWORD))
    result = secret(config, "status")
    assert status_rows(result) == {
        "dev": ["stored", "not stored"],
        "prod": ["not stored", "stored"],
    }
    assert "SecretService" in result.stdout
    assert status_rows(secret(config, "status", "ghost")) == {"ghost": ["not stored", "not stored"]}


@pytest.mark.keyring
def test_delete_removes_it_and_get_then_names_the_env_vars(
    keyring_service: SecretService, config: Path
) -> None:
    """After `secret delete` the password is gone from the keyring, status says so, and
    `get --no-agent` fails with exit 78 saying which environment variable to set."""
    assert_ok(secret(config, "set", "dev", "--stdin", stdin=PASSWORD))
    assert_ok(get_no_agent(config))
    deleted = secret(config, "delete", "dev")
    assert_ok(deleted)
    assert "deleted the keystore password of profile dev" in deleted.stdout
    assert keyring_service.usernames() == set()
    assert status_rows(secret(config, "status", "dev")) == {"dev": ["not stored", "not stored"]}
    failed = get_no_agent(config)
    assert failed.returncode == 78 and failed.stdout == ""
    assert "MPAGENT_KEYSTORE_PASSWORD" in failed.stderr


@pytest.mark.keyring
def test_delete_of_nothing_is_exit_1(keyring_service: SecretService, config: Path) -> None:
    """Deleting a password that is not stored changes nothing, says so and exits 1."""
    assert_ok(secret(config, "set", "dev", "--stdin", stdin=PASSWORD))
    result = secret(config, "delete", "dev", "--key")
    assert result.returncode == 1 and "no key password for profile dev" in result.stderr
    assert keyring_service.usernames() == {"dev/keystore"}


@pytest.mark.keyring
def test_separate_key_password_of_a_jks(
    keyring_service: SecretService,
    tmp_path: Path,
    home: Path,
    emulator: Emulator,
    leaf: pki.Issued,
    ca: pki.Issued,
) -> None:
    """A JKS whose key has its own password needs `secret set --key`; without it `get` fails
    with exit 78 naming MPAGENT_KEY_PASSWORD, with it a token is issued."""
    jks = write_jks(tmp_path / "ks.jks", {"auth": leaf}, PASSWORD, KEY_PASSWORD, ca_chain=[ca.cert])
    config = write_config(
        tmp_path / "config.toml", {"dev": profile_for(emulator, jks, alias="auth")}
    )
    assert_ok(secret(config, "set", "dev", "--stdin", stdin=PASSWORD + "\n"))
    failed = get_no_agent(config)
    assert failed.returncode == 78 and "MPAGENT_KEY_PASSWORD" in failed.stderr
    assert_no_secret(failed.stderr)
    stored = secret(
        config, "set", "--key", "--stdin", stdin=KEY_PASSWORD + "\n"
    )  # the only profile
    assert_ok(stored)
    assert "stored the key password of profile dev" in stored.stdout
    assert keyring_service.stored("dev/key") == KEY_PASSWORD
    assert_ok(get_no_agent(config))


@pytest.mark.keyring
def test_set_replaces_and_reads_one_line(keyring_service: SecretService, config: Path) -> None:
    """--stdin takes the first line only, without its line ending (\\n or \\r\\n); setting
    again replaces the stored password and says so."""
    assert_ok(secret(config, "set", "dev", "--stdin", stdin=PASSWORD + "\nsecond line\n"))
    assert keyring_service.stored("dev/keystore") == PASSWORD
    again = secret(config, "set", "dev", "--stdin", stdin=PASSWORD + "\r\n")
    assert_ok(again)
    assert "replaced the keystore password" in again.stdout
    assert keyring_service.stored("dev/keystore") == PASSWORD


@pytest.mark.keyring
def test_a_wrong_password_is_refused_by_secret_set(
    keyring_service: SecretService, config: Path, p12: Path
) -> None:
    """`secret set` opens the keystore first: a wrong password is exit 78 naming the keystore,
    and nothing is stored, not even over a right one; the right one is stored, "checked"."""
    refused = secret(config, "set", "dev", "--stdin", stdin="not-the-pw\n")
    assert refused.returncode == 78 and refused.stdout == ""
    assert str(p12) in refused.stderr and "nothing stored" in refused.stderr
    assert "not-the-pw" not in refused.stderr and "Traceback" not in refused.stderr
    assert keyring_service.usernames() == set()
    stored = secret(config, "set", "dev", "--stdin", stdin=PASSWORD + "\n")
    assert_ok(stored)
    assert f"(checked: it opens {p12})" in stored.stdout
    assert secret(config, "set", "dev", "--stdin", stdin="not-the-pw\n").returncode == 78
    assert keyring_service.stored("dev/keystore") == PASSWORD


@pytest.mark.keyring
def test_an_env_variable_beats_the_keyring(
    keyring_service: SecretService, config: Path, tmp_path: Path
) -> None:
    """A variable the user set wins over a password stored in the keyring: with a wrong one
    in the keyring, get fails naming the OS keyring, and works once the variable is set;
    a wrong variable fails naming the variable, though the keyring holds the right one."""
    # No configuration to check against: the only way to store a wrong password.
    unchecked = secret(tmp_path / "missing.toml", "set", "dev", "--stdin", stdin="old-pw\n")
    assert_ok(unchecked)
    assert keyring_service.stored("dev/keystore") == "old-pw"
    from_keyring = get_no_agent(config)
    assert from_keyring.returncode == 78
    assert "the keystore password from the OS keyring is wrong" in from_keyring.stderr
    assert "mpagent secret set dev" in from_keyring.stderr
    assert_ok(get_no_agent(config, env={"MPAGENT_KEYSTORE_PASSWORD_DEV": PASSWORD}))
    assert_ok(get_no_agent(config, env={"MPAGENT_KEYSTORE_PASSWORD": PASSWORD}))
    assert_ok(secret(config, "set", "dev", "--stdin", stdin=PASSWORD))
    wrong_env = get_no_agent(config, env={"MPAGENT_KEYSTORE_PASSWORD_DEV": "old-pw"})
    assert wrong_env.returncode == 78
    assert "from MPAGENT_KEYSTORE_PASSWORD_DEV is wrong" in wrong_env.stderr
    assert "old-pw" not in wrong_env.stderr


@pytest.mark.keyring
def test_set_key_checks_the_key_password_of_a_jks(
    keyring_service: SecretService,
    tmp_path: Path,
    home: Path,
    emulator: Emulator,
    leaf: pki.Issued,
) -> None:
    """`secret set --key` opens the JKS key with the password (the store password from the
    keyring): a wrong one is exit 78 naming the entry and stores nothing; storing only the
    store password warns that the key has a password of its own."""
    jks = write_jks(tmp_path / "ks.jks", {"auth": leaf}, PASSWORD, KEY_PASSWORD)
    config = write_config(tmp_path / "config.toml", {"dev": profile_for(emulator, jks)})
    store = secret(config, "set", "dev", "--stdin", stdin=PASSWORD)
    assert_ok(store)
    assert "has a password of its own" in store.stderr and "secret set dev --key" in store.stderr
    refused = secret(config, "set", "dev", "--key", "--stdin", stdin=PASSWORD)
    assert refused.returncode == 78
    assert "does not open the key of entry 'auth'" in refused.stderr and str(jks) in refused.stderr
    assert keyring_service.usernames() == {"dev/keystore"}
    stored = secret(config, "set", "dev", "--key", "--stdin", stdin=KEY_PASSWORD)
    assert_ok(stored)
    assert "stored the key password of profile dev" in stored.stdout and "checked" in stored.stdout
    assert keyring_service.stored("dev/key") == KEY_PASSWORD


@pytest.mark.keyring
@pytest.mark.parametrize("given", ["", "\n", "\r\n"])
def test_set_refuses_an_empty_password(
    keyring_service: SecretService, config: Path, given: str
) -> None:
    """An empty line (or nothing) on stdin is refused with exit 78 and nothing is stored."""
    result = secret(config, "set", "dev", "--stdin", stdin=given)
    assert result.returncode == 78 and "no password" in result.stderr
    assert keyring_service.usernames() == set()


@pytest.mark.keyring
def test_set_without_stdin_needs_a_terminal(keyring_service: SecretService, config: Path) -> None:
    """Without --stdin and without a terminal, set does not hang: exit 78 pointing at --stdin."""
    result = secret(config, "set", "dev")
    assert result.returncode == 78 and "--stdin" in result.stderr
    assert keyring_service.usernames() == set()


@pytest.mark.keyring
def test_set_warns_about_a_profile_not_in_the_config(
    keyring_service: SecretService, config: Path, tmp_path: Path
) -> None:
    """A profile the config lacks (or no config at all) gets a warning, and is stored anyway."""
    result = secret(config, "set", "later", "--stdin", stdin=PASSWORD)
    assert_ok(result)
    assert "warning" in result.stderr and "no profile later" in result.stderr
    missing = secret(tmp_path / "missing.toml", "set", "early", "--stdin", stdin=PASSWORD)
    assert_ok(missing)
    assert "warning" in missing.stderr and "no configuration file" in missing.stderr
    assert keyring_service.usernames() == {"later/keystore", "early/keystore"}


@pytest.mark.keyring
def test_prompt_is_hidden_and_asks_twice(keyring_service: SecretService, config: Path) -> None:
    """On a terminal, set prompts twice without echo; a mismatch stores nothing."""
    args = ["--config", str(config), "secret", "set", "dev"]
    code, transcript = in_terminal(args, [PASSWORD, PASSWORD + "x"])
    assert code == 78 and "differ" in transcript
    assert_no_secret(transcript)
    assert keyring_service.usernames() == set()
    code, transcript = in_terminal(args, [PASSWORD, PASSWORD])
    assert code == 0 and "stored the keystore password of profile dev" in transcript
    assert_no_secret(transcript)
    assert keyring_service.stored("dev/keystore") == PASSWORD


def in_terminal(
    args: list[str], answers: list[str], env: dict[str, str] | None = None
) -> tuple[int, str]:
    """`mpagent ARGS` on a pseudo-terminal, typing `answers` at its prompts (each ends with
    ": "); the exit status and everything the terminal showed."""
    master, slave = os.openpty()
    proc = zygote.start_on_terminal(args, {**os.environ, **(env or {})}, slave)
    os.close(slave)
    transcript = b""
    try:
        for answer in answers:
            transcript += _read_until(master, lambda seen: seen.endswith(b": "))
            os.write(master, answer.encode() + b"\n")
        transcript += _read_until(master, lambda seen: False)
        return proc.wait(30), transcript.decode("utf-8", errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def _read_until(fd: int, done: Callable[[bytes], bool], timeout: float = 30) -> bytes:
    """Read the terminal until done(text) or the other side is closed (EIO)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while not done(seen):
        if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise AssertionError(f"the terminal went quiet: {seen!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: every writer closed
            break
        if not chunk:
            break
        seen += chunk
    return seen


@pytest.mark.keyring
def test_keyring_never_blocks_the_serving_loop(
    keyring_service: SecretService, one_profile: Path, home: Path
) -> None:
    """While a reload waits on a hung Secret Service, the agent still answers status and get
    at once; the reload completes when the keyring answers again."""
    assert_ok(secret(one_profile, "set", "dev", "--stdin", stdin=PASSWORD))
    agent = start_agent(one_profile, home)
    try:
        assert_ok(run_cli("get", SCOPES[0]))
        with keyring_service.frozen():
            agent.signal(signal.SIGHUP)
            wait_for(lambda: "reloading" in agent.log())
            time.sleep(0.3)  # let the reload reach the keyring call
            started = time.monotonic()
            client.call(paths.socket_path(), "status", timeout=2)
            assert_ok(run_cli("get", SCOPES[0]))
            assert time.monotonic() - started < 2
            assert "reloaded" not in agent.log()  # the reload really is waiting on the keyring
        wait_for(lambda: "reloaded" in agent.log(), timeout=30)
    finally:
        agent.stop()
    assert_no_secret(agent.log())


@pytest.mark.keyring
def test_agent_finds_a_keyring_that_starts_after_it(
    keyring_service: SecretService,
    one_profile: Path,
    home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An agent started while no Secret Service answers has the profile unusable (naming the
    env vars); once the keyring is there, a reload picks the password up."""
    assert_ok(secret(one_profile, "set", "dev", "--stdin", stdin=PASSWORD))
    bus = tmp_path / "bus"  # the session bus, once it "starts": a symlink to the real socket
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", f"unix:path={bus}")
    agent = start_agent(one_profile, home)
    try:
        assert "MPAGENT_KEYSTORE_PASSWORD" in (agent_status()["profiles"]["dev"] or "")
        bus.symlink_to(keyring_service.root / "bus")
        assert_ok(run_cli("reload"))
        assert agent_status()["profiles"] == {"dev": None}
        assert_ok(run_cli("get", SCOPES[0]))
    finally:
        agent.stop()
    assert_no_secret(agent.log())


def agent_status() -> dict:
    return json.loads(dict(client.call(paths.socket_path(), "status"))["json"])


# -- without a usable keyring (no daemon needed) ----------------------------------------


@pytest.fixture(params=["fail-backend", "secret-service-without-bus"])
def no_keyring(request: pytest.FixtureRequest, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """keyring's null backend, or the Secret Service backend forced with no bus to reach."""
    env = FAIL_BACKEND if request.param == "fail-backend" else SECRET_SERVICE_WITHOUT_BUS
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize(
    "args",
    [
        ["set", "dev", "--stdin"],
        ["delete", "dev", "--key"],
        ["status"],
    ],
)
def test_secret_without_keyring_is_exit_78_naming_env_vars(
    no_keyring: None, config: Path, args: list[str]
) -> None:
    """With no usable keyring every `secret` action fails with exit 78, one message naming
    MPAGENT_KEYSTORE_PASSWORD and MPAGENT_KEY_PASSWORD, no traceback and no password; for
    one profile it names that profile's variables and its other sources."""
    result = secret(config, *args, stdin=PASSWORD + "\n")
    assert result.returncode == 78, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert all(name in result.stderr for name in ENV_NAMES)
    assert "password_command" in result.stderr and "mpagent unlock" in result.stderr
    if "dev" in args:
        for way in ("MPAGENT_KEYSTORE_PASSWORD_DEV", "MPAGENT_KEY_PASSWORD_DEV", "dev.keystore"):
            assert way in result.stderr
        assert "`mpagent unlock dev`" in result.stderr
    assert_no_secret(result.stderr)


def test_get_without_keyring_uses_the_environment(no_keyring: None, config: Path) -> None:
    """With no usable keyring `get --no-agent` works from MPAGENT_KEYSTORE_PASSWORD, and
    without it fails with exit 78 naming that variable."""
    failed = get_no_agent(config)
    assert failed.returncode == 78 and "MPAGENT_KEYSTORE_PASSWORD" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert_ok(get_no_agent(config, env={"MPAGENT_KEYSTORE_PASSWORD": PASSWORD}))


def test_status_without_profile_needs_the_config(home: Path, tmp_path: Path) -> None:
    """`secret status` with no PROFILE and no config file is a config error (exit 78)."""
    result = secret(tmp_path / "missing.toml", "status", env=FAIL_BACKEND)
    assert result.returncode == 78 and "no configuration file" in result.stderr
