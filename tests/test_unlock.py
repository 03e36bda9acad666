"""`mpagent unlock` / `lock`, like ssh-add: an autostarted agent with no password, then a
password handed over from the terminal or stdin, checked in the client and kept only in the
agent's memory. Real agent processes, the real CLI, the emulator, real keystores."""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpagent.emulator import Emulator, pki

from . import zygote
from .agentproc import status, wait_for
from .conftest import PASSWORD, SCOPES, profile_for, run_cli, write_config
from .keystores import write_jks

SCOPE = SCOPES[0]
KEY_PASSWORD = "key-pw-Ørn-2"


def cli(
    *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The real CLI with `stdin` as its input (not a terminal)."""
    return run_cli(*args, input=stdin, env=env)


@pytest.fixture
def config(
    tmp_path: Path, home: Path, emulator: Emulator, p12: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """Two profiles, no password anywhere; the agent is autostarted by the first `get`."""
    profiles = {"test": profile_for(emulator, p12), "prod": profile_for(emulator, p12)}
    path = write_config(tmp_path / "config.toml", profiles, default_profile="test")
    monkeypatch.setenv("MPAGENT_CONFIG", str(path))
    yield path
    run_cli("stop")


class Terminal:
    """The real CLI on a pseudo-terminal, and what it has shown so far."""

    def __init__(self, *args: str) -> None:
        self.fd, terminal = os.openpty()
        self.proc = zygote.start_on_terminal(args, dict(os.environ), terminal)
        os.close(terminal)
        self.seen = b""

    def until(self, text: bytes, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in {self.seen!r}")
            if select.select([self.fd], [], [], 0.2)[0]:
                try:
                    self.seen += os.read(self.fd, 4096)
                except OSError:
                    break

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def exit_code(self) -> int:
        code = self.proc.wait(30)
        os.close(self.fd)
        return code


def files_containing(root: Path, secret: str) -> list[Path]:
    needles = (secret.encode(), secret.encode("utf-16-le"))
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if any(n in data for n in needles):
                found.append(path)
    return found


def test_locked_then_unlocked_from_stdin(config: Path, home: Path, tmp_path: Path) -> None:
    """An autostarted agent without a password says `run: mpagent unlock test` (exit 78);
    after `unlock --stdin` the same `get` works, status says where the password came from, and
    no file under HOME, the XDG dirs or the test's directory, nor the agent's argv or
    environment, holds the password."""
    locked = run_cli("get", SCOPE)
    assert locked.returncode == 78 and locked.stdout == ""
    assert locked.stderr.strip().endswith("run: mpagent unlock test"), locked.stderr
    assert status()["passwords"] == {"test": "locked", "prod": "locked"}

    unlocked = cli("unlock", "--stdin", stdin=PASSWORD + "\n")
    assert unlocked.returncode == 0, unlocked.stderr
    assert "profile test unlocked" in unlocked.stderr and PASSWORD not in unlocked.stderr
    got = run_cli("get", SCOPE)
    assert got.returncode == 0 and got.stdout.startswith("eyJ"), got.stderr
    assert status()["passwords"]["test"] == "unlocked (from: unlock)"
    assert status()["passwords"]["prod"] == "locked"

    assert files_containing(home, PASSWORD) == []
    assert files_containing(tmp_path, PASSWORD) == []
    pid = status()["pid"]
    for part in ("environ", "cmdline"):
        assert PASSWORD.encode() not in Path(f"/proc/{pid}/{part}").read_bytes()


def test_lock_forgets(config: Path) -> None:
    """`lock` makes the agent forget the password and the tokens: `get` fails again with the
    unlock hint; `lock` with nothing unlocked says so."""
    run_cli("get", SCOPE)
    assert cli("unlock", "--stdin", "test", stdin=PASSWORD + "\n").returncode == 0
    assert run_cli("get", SCOPE).returncode == 0
    locked = run_cli("lock")
    assert locked.returncode == 0 and "profile test locked" in locked.stderr
    again = run_cli("get", SCOPE)
    assert again.returncode == 78 and "run: mpagent unlock test" in again.stderr
    nothing = run_cli("lock")
    assert nothing.returncode == 0 and "nothing to forget" in nothing.stderr


def test_all_unlocks_every_locked_profile(config: Path) -> None:
    """`unlock --all --stdin` reads one line per locked profile and unlocks each."""
    run_cli("get", SCOPE)
    result = cli("unlock", "--all", "--stdin", stdin=f"{PASSWORD}\n{PASSWORD}\n")
    assert result.returncode == 0, result.stderr
    assert "profile test unlocked" in result.stderr and "profile prod unlocked" in result.stderr
    assert run_cli("get", "-p", "prod", SCOPE).returncode == 0
    none = run_cli("unlock", "--all")
    assert none.returncode == 0 and "no profile is locked" in none.stderr


def test_wrong_password_is_not_sent(config: Path) -> None:
    """A wrong password is refused in the client (exit 78, naming the keystore) and the agent
    stays locked."""
    run_cli("get", SCOPE)
    result = cli("unlock", "--stdin", stdin="not-the-password\n")
    assert result.returncode == 78 and "does not open the keystore" in result.stderr
    assert "nothing was sent to the agent" in result.stderr
    assert "not-the-password" not in result.stderr
    assert status()["passwords"]["test"] == "locked"


def test_unknown_profile(config: Path) -> None:
    """unlock of a profile that does not exist: exit 78 with "did you mean"."""
    result = cli("unlock", "--stdin", "tset", stdin=PASSWORD + "\n")
    assert result.returncode == 78 and "did you mean 'test'" in result.stderr


def test_no_terminal_and_no_stdin_flag(config: Path) -> None:
    """Without a terminal, unlock says to use --stdin instead of waiting for a prompt."""
    result = run_cli("unlock")
    assert result.returncode == 78 and "--stdin" in result.stderr


def test_jks_key_password_differs(
    tmp_path: Path, home: Path, emulator: Emulator, ca: pki.Issued, leaf: pki.Issued
) -> None:
    """A JKS whose key password differs from the store's: `unlock --key --stdin` takes both;
    without --key the client says the key has its own password."""
    jks = write_jks(tmp_path / "ks.jks", {"auth": leaf}, PASSWORD, KEY_PASSWORD)
    path = write_config(tmp_path / "config.toml", {"jks": profile_for(emulator, jks)})
    env = {"MPAGENT_CONFIG": str(path)}
    try:
        assert cli("get", SCOPE, env=env).returncode == 78
        short = cli("unlock", "--stdin", stdin=PASSWORD + "\n", env=env)
        assert short.returncode == 78 and "--key" in short.stderr, short.stderr
        both = cli("unlock", "--stdin", "--key", stdin=f"{PASSWORD}\n{KEY_PASSWORD}\n", env=env)
        assert both.returncode == 0, both.stderr
        assert cli("get", SCOPE, env=env).returncode == 0
    finally:
        cli("stop", env=env)


def test_get_at_a_terminal_offers_to_unlock(config: Path) -> None:
    """At a terminal, `get` for a locked profile asks whether to unlock it, prompts for the
    password hidden, and then prints the token."""
    run_cli("get", SCOPE)  # start the agent, locked
    term = Terminal("get", SCOPE)
    term.until(b"Unlock it now? [Y/n]")
    term.write(b"\n")
    term.until(b"keystore password for profile test:")
    term.write(PASSWORD.encode() + b"\n")
    term.until(b"eyJ")
    assert term.exit_code() == 0
    assert PASSWORD.encode() not in term.seen  # the prompt did not echo it
    wait_for(lambda: status()["passwords"]["test"] == "unlocked (from: unlock)")


def test_end_of_input_at_the_unlock_offer_means_no(config: Path) -> None:
    """Ctrl-D at "Unlock it now? [Y/n]" declines: no password prompt, the locked error."""
    run_cli("get", SCOPE)  # start the agent, locked
    term = Terminal("get", SCOPE)
    term.until(b"Unlock it now? [Y/n]")
    term.write(b"\x04")  # the terminal's end of input
    term.until(b"run: mpagent unlock test")
    assert term.exit_code() == 78
    assert b"password for profile" not in term.seen


def test_lock_holds_while_the_config_cannot_be_read(config: Path) -> None:
    """`lock` forgets the key even when the config file has just become unreadable TOML: the
    profile is locked again from the running configuration, and status names the file error."""
    run_cli("get", SCOPE)
    assert cli("unlock", "--stdin", "test", stdin=PASSWORD + "\n").returncode == 0
    assert run_cli("get", SCOPE).returncode == 0
    good = config.read_text()
    config.write_text("[profiles.test\n")  # a half-saved edit
    try:
        locked = run_cli("lock")
        assert locked.returncode == 0 and "profile test locked" in locked.stderr, locked.stderr
        again = run_cli("get", SCOPE)
        assert again.returncode == 78 and "run: mpagent unlock test" in again.stderr
        assert status()["passwords"]["test"] == "locked"
        assert str(config) in str(status()["reload_error"])
    finally:
        config.write_text(good)
