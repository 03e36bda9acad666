"""Where a profile's passwords come from (mpagent/passwords.py): the order of the sources as
plain values, then the real CLI and real agents with per-profile variables, password_command
scripts written here, a CREDENTIALS_DIRECTORY made here and the JKS key-password prompt on a
pseudo-terminal. No OS keyring: keyring's null backend (tests/test_keyring.py has the real one)."""

from __future__ import annotations

import shlex
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mpagent import config
from mpagent import passwords as passwords_module
from mpagent.emulator import Emulator, pki
from mpagent.errors import ConfigError, SecretUnavailable
from mpagent.passwords import COMMAND_TIMEOUT, ProfilePasswords, env_names

from .agentproc import AgentProcess
from .conftest import PASSWORD, SCOPES, profile_for, run_cli, write_config
from .keystores import write_jks
from .test_keyring import in_terminal

KEY_PASSWORD = "key-pw-Øya-2"
TEST_PW, PROD_PW = "test-pw-Tyr-3", "prod-pw-Frøya-4"
LEAK = "printed-by-the-command-7Q"  # a command's output must never reach a message
UNLOCK_HINT = "run: mpagent unlock dev"


@pytest.fixture(autouse=True)
def no_keyring(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """These processes see no OS keyring and start no agent of their own."""
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.fail.Keyring")
    monkeypatch.setenv("MPAGENT_NO_AUTOSTART", "1")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


def script(directory: Path, name: str, body: str) -> Path:
    """An executable /bin/sh script: a password_command."""
    path = directory / name
    path.write_text("#!/bin/sh\n" + body, encoding="utf-8")
    path.chmod(0o755)
    return path


def printing(directory: Path, password: str, name: str = "pw.sh") -> Path:
    return script(directory, name, f"printf '%s\\n' {shlex.quote(password)}\n")


def credentials(directory: Path, files: dict[str, str]) -> Path:
    """A CREDENTIALS_DIRECTORY as systemd makes it: one file per credential."""
    directory.mkdir(mode=0o700)
    for name, content in files.items():
        (directory / name).write_text(content, encoding="utf-8")
    return directory


def never(profile: str, which: str) -> str | None:
    return None


def get_no_agent(cfg: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli("--config", str(cfg), "get", SCOPES[0], "--no-agent", env=env)


def assert_token(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("eyJ")


def assert_refused(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Exit 78, nothing on stdout, every fragment on stderr, no password or command output."""
    assert result.returncode == 78, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)
    for secret in (PASSWORD, KEY_PASSWORD, TEST_PW, PROD_PW, LEAK):
        assert secret not in result.stderr


@pytest.fixture
def cfg(tmp_path: Path, emulator: Emulator, p12: Path) -> Path:
    return write_config(tmp_path / "config.toml", {"dev": profile_for(emulator, p12)})


def with_command(tmp_path: Path, emulator: Emulator, keystore: Path, **keys: object) -> Path:
    return write_config(tmp_path / "config.toml", {"dev": profile_for(emulator, keystore, **keys)})


# -- the order, as plain values -----------------------------------------------------------


ORDER = ("unlock", "profile-var", "global-var", "command", "credential", "keyring")


def with_sources(directory: Path, present: tuple[str, ...]) -> ProfilePasswords:
    """Profile dev's lookup where each source in `present` has the keystore password
    "from-<source>", and no terminal."""
    directory.mkdir()
    has = {name: f"from-{name}" for name in present}
    env = {"CREDENTIALS_DIRECTORY": str(directory)}
    if "profile-var" in has:
        env["MPAGENT_KEYSTORE_PASSWORD_DEV"] = has["profile-var"]
    if "global-var" in has:
        env["MPAGENT_KEYSTORE_PASSWORD"] = has["global-var"]
    if "credential" in has:
        (directory / "dev.keystore").write_text(has["credential"] + "\n")
    command = [str(printing(directory, has["command"]))] if "command" in has else None
    return ProfilePasswords(
        "dev",
        env=env,
        lookup=lambda profile, which: has.get("keyring") if which == "keystore" else None,
        interactive=False,
        unlocked={"keystore": has["unlock"]} if "unlock" in has else None,
        commands={"keystore": command},
    )


def test_first_source_that_has_one_wins(tmp_path: Path) -> None:
    """unlock, then the per-profile variable, the global one, password_command, the systemd
    credential, the keyring; with none of them and no terminal, no password."""
    sources = {"profile-var": "env", "global-var": "env"}
    for i, first in enumerate(ORDER):
        passwords = with_sources(tmp_path / str(i), ORDER[i:])
        assert passwords.keystore() == f"from-{first}"
        assert passwords.source("keystore") == sources.get(first, first)
    nothing = with_sources(tmp_path / "none", ())
    assert nothing.keystore() is None and nothing.source("keystore") is None


def test_each_source_is_described_for_messages(tmp_path: Path) -> None:
    """described() names the variable, the command as typed, the credential or the keyring."""
    command = printing(tmp_path, "pw")
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {"env": {"MPAGENT_KEYSTORE_PASSWORD_MY_TEST_2": "pw"}},
            "MPAGENT_KEYSTORE_PASSWORD_MY_TEST_2",
        ),
        ({"env": {"MPAGENT_KEYSTORE_PASSWORD": "pw"}}, "MPAGENT_KEYSTORE_PASSWORD"),
        ({"commands": {"keystore": [str(command), "a b"]}}, f"password_command `{command} 'a b'`"),
        ({"unlocked": {"keystore": "pw"}}, "`mpagent unlock`"),
        ({"lookup": lambda p, w: "pw"}, "the OS keyring"),
    ]
    for kwargs, described in cases:
        passwords = ProfilePasswords(
            "my-test.2", interactive=False, **{"env": {}, "lookup": never, **kwargs}
        )
        assert passwords.keystore() == "pw"
        assert passwords.described("keystore") == described
    creds = credentials(tmp_path / "creds", {"my-test.2.keystore": "pw"})
    passwords = ProfilePasswords(
        "my-test.2", env={"CREDENTIALS_DIRECTORY": str(creds)}, lookup=never, interactive=False
    )
    assert passwords.keystore() == "pw"
    assert passwords.described("keystore") == "the systemd credential my-test.2.keystore"


def test_variable_names_follow_the_profile_name() -> None:
    """MPAGENT_KEYSTORE_PASSWORD_<PROFILE>: upper-cased, each run of other characters `_`."""
    assert env_names("my-test.2", "keystore") == (
        "MPAGENT_KEYSTORE_PASSWORD_MY_TEST_2",
        "MPAGENT_KEYSTORE_PASSWORD",
    )
    assert env_names("prod", "key") == ("MPAGENT_KEY_PASSWORD_PROD", "MPAGENT_KEY_PASSWORD")


def test_an_empty_variable_is_no_password() -> None:
    """An empty per-profile variable is as if unset: the global one is used."""
    env = {"MPAGENT_KEYSTORE_PASSWORD_DEV": "", "MPAGENT_KEYSTORE_PASSWORD": "global"}
    passwords = ProfilePasswords("dev", env=env, lookup=never, interactive=False)
    assert passwords.keystore() == "global"
    assert passwords.described("keystore") == "MPAGENT_KEYSTORE_PASSWORD"


def test_key_password_sources_and_its_default(tmp_path: Path) -> None:
    """The key password comes from its own variable, key_password_command or PROFILE.key;
    with none it is the keystore password, and source("key") says there was none."""
    creds = credentials(tmp_path / "creds", {"dev.key": "from-credential\n"})
    command = printing(tmp_path, "from-command")
    env = {"MPAGENT_KEYSTORE_PASSWORD": "store"}
    cases: list[tuple[dict[str, Any], str, str | None]] = [
        ({"env": {**env, "MPAGENT_KEY_PASSWORD_DEV": "from-var"}}, "from-var", "env"),
        ({"env": env, "commands": {"key": [str(command)]}}, "from-command", "command"),
        ({"env": {**env, "CREDENTIALS_DIRECTORY": str(creds)}}, "from-credential", "credential"),
        ({"env": env}, "store", None),
    ]
    for kwargs, key, source in cases:
        passwords = ProfilePasswords("dev", lookup=never, interactive=False, **kwargs)
        assert (passwords.key(), passwords.source("key")) == (key, source)
    assert passwords.described("key") == "the keystore password (from MPAGENT_KEYSTORE_PASSWORD)"


def test_each_password_is_looked_up_once(tmp_path: Path) -> None:
    """password_command runs once per lookup object, however often the password is asked."""
    runs = tmp_path / "runs"
    command = script(tmp_path, "count.sh", f"echo run >> {runs}\necho pw\n")
    passwords = ProfilePasswords(
        "dev", env={}, lookup=never, interactive=False, commands={"keystore": [str(command)]}
    )
    assert [passwords.keystore(), passwords.keystore(), passwords.key()] == ["pw"] * 3
    assert runs.read_text().splitlines() == ["run"]


def test_credential_loses_exactly_one_trailing_newline(tmp_path: Path) -> None:
    """A credential file without one trailing newline is the password; an empty one is an
    error naming the file; a missing one is no password."""
    for content, expected in [("pw\n", "pw"), ("pw", "pw"), ("pw\n\n", "pw\n"), ("p w\r\n", "p w")]:
        creds = tmp_path / "creds"
        creds.mkdir(exist_ok=True)
        (creds / "dev.keystore").write_text(content, encoding="utf-8", newline="")
        env = {"CREDENTIALS_DIRECTORY": str(creds)}
        assert ProfilePasswords("dev", env=env, lookup=never, interactive=False).keystore() == (
            expected
        )
    (creds / "dev.keystore").write_text("\n")
    with pytest.raises(SecretUnavailable, match=r"dev\.keystore is empty"):
        ProfilePasswords("dev", env=env, lookup=never, interactive=False).keystore()
    (creds / "dev.keystore").unlink()
    assert ProfilePasswords("dev", env=env, lookup=never, interactive=False).keystore() is None


# -- password_command in the configuration ---------------------------------------------------


def parse_profile(text: str) -> config.Config:
    base = 'environment = "test"\nclient_id = "c"\nkeystore = "/k.p12"\n'
    return config.parse(tomllib.loads(f"[profiles.dev]\n{base}{text}"), Path("/c.toml"))


def test_password_command_is_an_argv_list() -> None:
    """password_command / key_password_command: a list of non-empty strings, kept as a tuple;
    anything else makes the profile unusable with the list to write instead."""
    profile = parse_profile('password_command = ["pass", "show", "mp/dev"]\n').profiles["dev"]
    assert profile.password_command == ("pass", "show", "mp/dev")
    assert profile.key_password_command is None
    wrong = {
        'password_command = "pass show mp/dev"': 'password_command = ["pass", "show", "mp/dev"]',
        "password_command = []": 'password_command = ["pass", "show", "mpagent/dev"]',
        'key_password_command = ["op", ""]': "key_password_command = [",
        "password_command = [1]": "list of non-empty strings",
    }
    for line, fix in wrong.items():
        error = parse_profile(line + "\n").broken["dev"]
        assert isinstance(error, ConfigError)
        assert "/c.toml: [profiles.dev]" in error.message and fix in error.message


def test_password_command_as_a_string_through_the_cli(
    tmp_path: Path, emulator: Emulator, p12: Path
) -> None:
    """A password_command written as one string: exit 78 with the list to write instead."""
    cfg = with_command(tmp_path, emulator, p12, password_command="pass show mp/dev")
    assert_refused(get_no_agent(cfg), "password_command", '["pass", "show", "mp/dev"]')


# -- password_command, end to end ------------------------------------------------------------


def test_password_command_gives_the_passwords(
    tmp_path: Path, emulator: Emulator, leaf: pki.Issued
) -> None:
    """password_command and key_password_command open a JKS whose key has its own password."""
    jks = write_jks(tmp_path / "ks.jks", {"auth": leaf}, PASSWORD, KEY_PASSWORD)
    store, key = (
        printing(tmp_path, PASSWORD, "store.sh"),
        printing(tmp_path, KEY_PASSWORD, "key.sh"),
    )
    cfg = with_command(
        tmp_path, emulator, jks, password_command=[str(store)], key_password_command=[str(key)]
    )
    assert_token(get_no_agent(cfg))


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (f"echo {LEAK}\necho {LEAK} >&2\nexit 3\n", "failed with exit status 3"),
        (f"echo {LEAK} >&2\nkill -TERM $$\n", "was killed by signal 15"),
        (f"printf '\\n{LEAK}\\n'\n", "printed nothing on its first line"),
        ("exit 0\n", "printed nothing on its first line"),
    ],
    ids=["non-zero exit", "killed", "empty first line", "no output"],
)
def test_password_command_failures(
    tmp_path: Path, emulator: Emulator, p12: Path, body: str, fragment: str
) -> None:
    """A failing password_command is exit 78 naming the profile, the setting and the command
    with its arguments, and saying what went wrong, never what it printed."""
    command = script(tmp_path, "mp pass.sh", body)
    cfg = with_command(tmp_path, emulator, p12, password_command=[str(command), "show", "mp/dev"])
    shown = f"password_command `{shlex.join([str(command), 'show', 'mp/dev'])}`"
    assert_refused(get_no_agent(cfg), "profile dev", shown, fragment, UNLOCK_HINT)


def test_password_command_that_is_not_installed(
    tmp_path: Path, emulator: Emulator, p12: Path
) -> None:
    """A password_command whose program does not exist: exit 78 saying so."""
    cfg = with_command(tmp_path, emulator, p12, password_command=["mpagent-no-such-pass", "x"])
    result = get_no_agent(cfg)
    assert_refused(result, "profile dev", "`mpagent-no-such-pass x`", "no program")


def test_password_command_that_hangs_is_stopped_at_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A password_command still running at COMMAND_TIMEOUT (here 0.3 s) is stopped: a
    SecretUnavailable saying so, without what the command printed, and no hang."""
    monkeypatch.setattr(passwords_module, "COMMAND_TIMEOUT", 0.3)
    command = script(tmp_path, "slow.sh", f"echo {LEAK} >&2\nexec sleep 60\n")
    started = time.monotonic()
    with pytest.raises(SecretUnavailable) as caught:
        passwords_module.run_command("dev", "password_command", [str(command)])
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert f"profile dev: password_command `{command}` did not finish within 0.3 s" in message
    assert "mpagent unlock dev" in message and LEAK not in message
    assert 0.3 <= elapsed < 5


@pytest.mark.slow
def test_password_command_that_hangs_is_stopped(
    tmp_path: Path, emulator: Emulator, p12: Path
) -> None:
    """A password_command still running after 10 s is stopped: exit 78 saying so, no hang
    (end to end with the real 10 s; the fast test above pins the timeout in-process)."""
    command = script(tmp_path, "slow.sh", f"echo {LEAK} >&2\nexec sleep 60\n")
    cfg = with_command(tmp_path, emulator, p12, password_command=[str(command)])
    started = time.monotonic()
    result = get_no_agent(cfg)
    elapsed = time.monotonic() - started
    assert_refused(
        result, "profile dev", str(command), f"did not finish within {COMMAND_TIMEOUT:g} s"
    )
    assert COMMAND_TIMEOUT <= elapsed < COMMAND_TIMEOUT + 15


def test_password_command_runs_without_a_shell_and_without_stdin(
    tmp_path: Path, emulator: Emulator, p12: Path
) -> None:
    """Arguments reach the program as they are written ($HOME, ; and * unexpanded) and its
    stdin is empty, so a command that would wait for input cannot."""
    seen = tmp_path / "seen"
    command = script(
        tmp_path,
        "args.sh",
        f'for a in "$@"; do echo "$a" >> {seen}; done\ncat >> {seen}\n'
        f"printf '%s\\n' {shlex.quote(PASSWORD)}\n",
    )
    cfg = with_command(
        tmp_path, emulator, p12, password_command=[str(command), "$HOME", "a;b", "*"]
    )
    assert_token(get_no_agent(cfg))
    assert seen.read_text().splitlines() == ["$HOME", "a;b", "*"]


# -- which source a message names --------------------------------------------------------------


def test_a_wrong_password_names_its_source(tmp_path: Path, emulator: Emulator, p12: Path) -> None:
    """A wrong keystore password says which source gave it: the variable, the command, the
    credential; each message names the keystore and exits 78."""
    wrong = printing(tmp_path, "not-it", "wrong.sh")
    creds = credentials(tmp_path / "creds", {"dev.keystore": "not-it\n"})
    cases = [
        ({}, {"MPAGENT_KEYSTORE_PASSWORD_DEV": "not-it"}, "MPAGENT_KEYSTORE_PASSWORD_DEV"),
        ({}, {"MPAGENT_KEYSTORE_PASSWORD": "not-it"}, "MPAGENT_KEYSTORE_PASSWORD is"),
        ({"password_command": [str(wrong)]}, {}, f"password_command `{wrong}`"),
        ({}, {"CREDENTIALS_DIRECTORY": str(creds)}, "the systemd credential dev.keystore"),
    ]
    for keys, env, source in cases:
        cfg = with_command(tmp_path, emulator, p12, **keys)
        result = get_no_agent(cfg, env=env)
        assert_refused(result, str(p12), f"the keystore password from {source}", "wrong")
        assert "not-it" not in result.stderr


def test_no_password_anywhere_is_locked(cfg: Path) -> None:
    """With no source at all: exit 78, the sources it tried, and last `run: mpagent unlock dev`."""
    result = get_no_agent(cfg)
    assert_refused(
        result,
        "profile dev is locked",
        "MPAGENT_KEYSTORE_PASSWORD_DEV, MPAGENT_KEYSTORE_PASSWORD, password_command",
        "a systemd credential",
    )
    assert result.stderr.rstrip("\n").endswith(UNLOCK_HINT)


def test_a_jks_key_without_its_password_names_the_ways(
    tmp_path: Path, emulator: Emulator, leaf: pki.Issued
) -> None:
    """A JKS key with a password of its own and none given: exit 78 saying the keystore
    password (and where it came from) does not open it, and how to give the key password."""
    jks = write_jks(tmp_path / "ks.jks", {"auth": leaf}, PASSWORD, KEY_PASSWORD)
    cfg = with_command(tmp_path, emulator, jks)
    result = get_no_agent(cfg, env={"MPAGENT_KEYSTORE_PASSWORD_DEV": PASSWORD})
    assert_refused(
        result,
        "entry 'auth' has a password of its own",
        "from MPAGENT_KEYSTORE_PASSWORD_DEV",
        "MPAGENT_KEY_PASSWORD_DEV",
        "key_password_command",
        "mpagent unlock dev --key",
    )


# -- the JKS key-password prompt ---------------------------------------------------------------


def test_jks_key_password_is_prompted_for_on_a_terminal(
    tmp_path: Path, emulator: Emulator, leaf: pki.Issued
) -> None:
    """On a terminal, once the store password works but does not open the key, get asks for
    the key password (hidden) and signs with it; a wrong one names the prompt."""
    jks = write_jks(tmp_path / "ks.jks", {"auth": leaf}, PASSWORD, KEY_PASSWORD)
    cfg = with_command(tmp_path, emulator, jks)
    args = ["--config", str(cfg), "get", SCOPES[0], "--no-agent"]
    code, transcript = in_terminal(args, [PASSWORD, KEY_PASSWORD])
    assert code == 0, transcript
    assert "keystore password for profile dev: " in transcript
    assert "key password for profile dev (its key has a password of its own): " in transcript
    assert "eyJ" in transcript and PASSWORD not in transcript and KEY_PASSWORD not in transcript
    code, transcript = in_terminal(
        args, ["wrong-key-pw"], env={"MPAGENT_KEYSTORE_PASSWORD": PASSWORD}
    )
    assert code == 78 and "from the prompt is wrong" in transcript, transcript
    assert "keystore password for profile dev" not in transcript  # the variable had that one


# -- real agents -----------------------------------------------------------------------------


def test_test_and_prod_with_different_passwords_in_one_agent(
    tmp_path: Path, home: Path, emulator: Emulator, leaf: pki.Issued, ca: pki.Issued
) -> None:
    """One agent serves test and prod, each keystore opened with its own per-profile
    variable, which beats a (wrong) global MPAGENT_KEYSTORE_PASSWORD."""
    test_ks = pki.write_pkcs12(tmp_path / "test.p12", {"auth": leaf}, TEST_PW, [ca.cert])
    prod_ks = pki.write_pkcs12(tmp_path / "prod.p12", {"auth": leaf}, PROD_PW, [ca.cert])
    cfg = write_config(
        tmp_path / "config.toml",
        {"test": profile_for(emulator, test_ks), "prod": profile_for(emulator, prod_ks)},
    )
    env = {
        "MPAGENT_KEYSTORE_PASSWORD_TEST": TEST_PW,
        "MPAGENT_KEYSTORE_PASSWORD_PROD": PROD_PW,
        "MPAGENT_KEYSTORE_PASSWORD": "neither-of-them",
    }
    agent = AgentProcess(cfg, home / "agent.log", env=env).wait_ready()
    try:
        for profile in ("test", "prod"):
            assert_token(run_cli("--config", str(cfg), "get", "--profile", profile, SCOPES[0]))
        assert emulator.token_requests >= 2
    finally:
        agent.stop()
    log = agent.log()
    assert TEST_PW not in log and PROD_PW not in log


def test_agent_reads_systemd_credentials(
    tmp_path: Path, home: Path, emulator: Emulator, leaf: pki.Issued
) -> None:
    """An agent started with CREDENTIALS_DIRECTORY (as systemd starts the service) opens a
    JKS with dev.keystore and dev.key from there, and `get` works."""
    jks = write_jks(tmp_path / "ks.jks", {"auth": leaf}, PASSWORD, KEY_PASSWORD)
    cfg = with_command(tmp_path, emulator, jks)
    creds = credentials(
        tmp_path / "creds", {"dev.keystore": PASSWORD + "\n", "dev.key": KEY_PASSWORD}
    )
    agent = AgentProcess(cfg, home / "agent.log", env={"CREDENTIALS_DIRECTORY": str(creds)})
    try:
        agent.wait_ready()
        assert_token(run_cli("--config", str(cfg), "get", SCOPES[0]))
    finally:
        agent.stop()
    assert PASSWORD not in agent.log() and KEY_PASSWORD not in agent.log()


def test_agent_without_a_password_says_run_unlock(cfg: Path, home: Path) -> None:
    """`get` from an agent that has no password for the profile: exit 78 ending with the
    unlock hint, naming the per-profile variable."""
    agent = AgentProcess(cfg, home / "agent.log").wait_ready()
    try:
        result = run_cli("--config", str(cfg), "get", SCOPES[0])
    finally:
        agent.stop()
    assert_refused(result, "profile dev is locked", "MPAGENT_KEYSTORE_PASSWORD_DEV")
    assert result.stderr.rstrip("\n").endswith(UNLOCK_HINT)


@pytest.fixture(name="config")
def unlock_config(cfg: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """For conftest's `agent` fixture: the `dev` profile, chosen by MPAGENT_CONFIG."""
    monkeypatch.setenv("MPAGENT_CONFIG", str(cfg))
    yield cfg


def test_unlock_stdin_refuses_an_empty_line(agent: AgentProcess) -> None:
    """An empty line on stdin is refused like an empty password at the terminal: exit 78,
    nothing sent to the agent (which keeps running)."""
    result = run_cli("unlock", "--stdin", "dev", input="\n")
    assert result.returncode == 78, result.stderr
    assert "an empty password; nothing sent to the agent" in result.stderr
    assert agent.proc.poll() is None
