"""The command line's fast path: a cached `get` and `env` import only the stdlib-only hot half
(seen with `python -X importtime` of the real CLI against a real agent), `env` and `exec` ask
the agent's `env` verb and read no config file, and what `env` prints is safe to `eval` in a
real shell whatever the agent sends. Pure policy (the parser, the quoting) gets unit tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpagent import fastcli, paths, protocol
from mpagent.emulator import Emulator, pki

from .agentproc import AgentProcess
from .conftest import SCOPES, profile_for, run_cli, shared_agent, write_config

ROOT = Path(__file__).resolve().parent.parent
HOT_HALF = {
    "mpagent",
    "mpagent.cli",
    "mpagent.fastcli",
    "mpagent.ask",
    "mpagent.console",
    "mpagent.errors",
    "mpagent.paths",
    "mpagent.protocol",
    "mpagent.client",
}
HEAVY = {"typing", "json", "socket", "argparse", "asyncio", "re", "enum", "subprocess", "pathlib"}
# The shipped POSIX launcher (setup.py installs it as `mpagent`); what the console-script
# entry point runs (mpagent.exe on Windows); and `python -m mpagent`, which tests use.
ENTRIES = {
    "launcher": [str(ROOT / "launcher" / "mpagent")],
    "console-script": ["-c", "import sys; from mpagent.cli import main; sys.exit(main())"],
    "python -m": ["-m", "mpagent"],
}
NAMES = ("MASKINPORTEN_TOKEN_IDPORTEN_DCR_READ", "MASKINPORTEN_TOKEN_IDPORTEN_DCR_WRITE")
# The one profile is the default: each token under its full name, then the short one.
EXPORTED = [
    f"export {prefix}{name[len('MASKINPORTEN_TOKEN_') :]}{suffix}"
    for name in NAMES
    for prefix in ("MASKINPORTEN_TOKEN_DEV_", "MASKINPORTEN_TOKEN_")
    for suffix in ("", "_EXPIRES_AT")
]


def write_dev(directory: Path, emulator: Emulator, p12: Path) -> Path:
    profile = profile_for(emulator, p12, scopes=list(SCOPES[:2]))
    return write_config(directory / "config.toml", {"dev": profile})


@pytest.fixture(scope="module")
def agent(ca: pki.Issued, p12_bytes: bytes) -> Iterator[AgentProcess]:
    """One agent for this module: its tests only ask it (conftest.shared_agent)."""
    with shared_agent(ca, p12_bytes, write_dev) as proc:
        yield proc


def importtime(entry: str, *argv: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """The CLI under `python -S -X importtime`: without site, every module in the list is
    one the command itself imported (plus the interpreter's own start-up), and the hot half
    must then run from the source tree with no third-party package at all."""
    result = subprocess.run(
        [sys.executable, "-S", "-X", "importtime", *ENTRIES[entry], *argv],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    return result, imported


def assert_hot_half(imported: set[str], entry: str) -> None:
    ours = {name for name in imported if name.split(".")[0] == "mpagent"}
    allowed = HOT_HALF | ({"mpagent.__main__"} if entry == "python -m" else set())
    assert "mpagent.client" in ours and ours <= allowed, sorted(ours - allowed)
    assert not imported & HEAVY, sorted(imported & HEAVY)


# -- the hot half, end to end -----------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES)
def test_cached_get_imports_only_the_hot_half(agent: AgentProcess, entry: str) -> None:
    """A cached `get` (the token printed, exit 0) imports no mpagent module outside the hot
    half and none of typing, json, socket, argparse, asyncio, re, enum, subprocess, pathlib."""
    assert run_cli("get", SCOPES[0]).returncode == 0  # cached from here on
    result, imported = importtime(entry, "get", SCOPES[0])
    assert result.returncode == 0 and result.stdout.startswith("eyJ"), result.stderr
    assert_hot_half(imported, entry)


@pytest.mark.parametrize("entry", ENTRIES)
def test_env_imports_only_the_hot_half(agent: AgentProcess, entry: str) -> None:
    """`env` (both tokens exported, exit 0) imports only the hot half, as a cached get does."""
    result, imported = importtime(entry, "env")
    assert result.returncode == 0, result.stderr
    exported = [line.split("=")[0] for line in result.stdout.splitlines()]
    assert exported == EXPORTED
    assert_hot_half(imported, entry)


def test_cold_commands_take_the_full_path(agent: AgentProcess) -> None:
    """A command off the fast path (`status`) goes through fullcli and argparse, and works."""
    result, imported = importtime("console-script", "status")
    assert result.returncode == 0 and "PROFILE" in result.stdout, result.stderr
    assert {"mpagent.fullcli", "argparse"} <= imported and "mpagent.commands" not in imported


# The console script on Windows, run on Linux: sys.platform says win32, and pywin32 is stood
# in for by modules whose CreateFile finds no pipe (what Windows says when no agent runs).
AS_WINDOWS = """
import sys, types
sys.platform = "win32"
class error(Exception):
    def __init__(self, winerror, strerror):
        self.winerror, self.strerror = winerror, strerror
def create_file(*args):
    raise error(2, "The system cannot find the file specified.")
sys.modules.update(
    pywintypes=types.SimpleNamespace(error=error),
    win32file=types.SimpleNamespace(
        GENERIC_READ=1, GENERIC_WRITE=2, OPEN_EXISTING=3, CreateFile=create_file
    ),
    win32pipe=types.SimpleNamespace(),
)
from mpagent.cli import main
sys.exit(main())
"""


@pytest.mark.parametrize("command", [["get", SCOPES[0]], ["env"]])
def test_windows_fast_path_takes_the_pipe_client_half(home: Path, command: list[str]) -> None:
    """On Windows `get` and `env` reach the agent through mpagent.pipeclient and still import
    only the hot half (no asyncio, no server half); with no agent there, exit 69 naming the
    pipe. (The pipe client's own guard is tests/test_transport.py.)"""
    result = subprocess.run(
        [sys.executable, "-S", "-X", "importtime", "-c", AS_WINDOWS, *command],
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "USERNAME": "Kari",
            "MPAGENT_NO_AUTOSTART": "1",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 69 and result.stdout == "", result.stderr
    said = [line for line in result.stderr.splitlines() if "|" not in line]
    assert said == [
        r"mpagent: no agent is listening on \\.\pipe\mpagent-kari; start one with `mpagent agent`"
    ]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    ours = {name for name in imported if name.split(".")[0] == "mpagent"}
    assert ours == HOT_HALF | {"mpagent.pipeclient"}, sorted(ours)
    assert not imported & HEAVY, sorted(imported & HEAVY)


# -- env and exec through the agent's env verb ------------------------------------------


def test_env_evaluates_in_bash_to_the_agents_tokens(agent: AgentProcess) -> None:
    """`eval "$(mpagent env)"` in bash sets each scope's token (the one `get` prints) and an
    integer NAME_EXPIRES_AT."""
    tokens = [run_cli("get", scope).stdout.strip() for scope in SCOPES[:2]]
    script = f'eval "$({sys.executable} -m mpagent env)" || exit 9; ' + "; ".join(
        f'printf "%s\\n" "${n}" "${n}_EXPIRES_AT"' for n in NAMES
    )
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0::2] == tokens and all(line.isdigit() for line in lines[1::2]), lines


def test_env_and_exec_read_no_config_file(
    agent: AgentProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the client's config file gone (MPAGENT_CONFIG names none), `env` and `exec` still
    work: the agent knows the profile's scopes and names."""
    monkeypatch.setenv("MPAGENT_CONFIG", str(tmp_path / "gone.toml"))
    token = run_cli("get", SCOPES[1]).stdout.strip()
    env = run_cli("env")
    assert env.returncode == 0 and f"export {NAMES[1]}={token}" in env.stdout, env.stderr
    script = f'test "${NAMES[1]}" = "$EXPECTED" && test -z "${NAMES[0]}" && exit 7'
    result = run_cli(
        "exec", "--scope", SCOPES[1], "--", "sh", "-c", script, env={"EXPECTED": token}
    )
    assert result.returncode == 7, result.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--profile", "nosuch", "env"],
        ["env", "-p", "nosuch"],
        ["env", "--prof", "nosuch"],  # an abbreviation: argparse's path, the same answer
    ],
)
def test_env_takes_profile_before_or_after(agent: AgentProcess, argv: list[str]) -> None:
    """`env --profile P` and `--profile P env` both ask for that profile: an unknown one
    fails with exit 78, the message naming it and the profiles there are."""
    result = run_cli(*argv)
    assert result.returncode == 78 and result.stdout == ""
    assert "nosuch" in result.stderr and "dev" in result.stderr, result.stderr


def test_env_without_agent_and_no_autostart(home: Path) -> None:
    """With no agent and autostart off, `env` fails with exit 69 and says how to start one."""
    result = run_cli("env", env={"MPAGENT_NO_AUTOSTART": "1"})
    assert result.returncode == 69 and result.stdout == ""
    assert "mpagent agent" in result.stderr


def test_exec_messages(agent: AgentProcess) -> None:
    """exec without a command exits 2 and shows its usage; a command that is not there, 127
    naming it."""
    missing = run_cli("exec")
    assert missing.returncode == 2
    assert missing.stderr == "mpagent: exec needs a command: mpagent exec [--scope S] -- CMD ARGS\n"
    absent = run_cli("exec", "--", "no-such-program-x")
    assert absent.returncode == 127
    assert absent.stderr.startswith("mpagent: cannot run no-such-program-x: "), absent.stderr


# -- what env prints, whatever the agent sends --------------------------------------------

HOSTILE = "$(touch PWNED)`touch PWNED`'; touch PWNED; echo '\"\\ ~x\n*"


@pytest.fixture
def stand_in_agent(home: Path) -> Iterator[list[bytes]]:
    """A peer on the agent's socket that answers every request with the reply it is given
    (the list's first item): what an agent of another version, or one relaying a hostile
    issuer's token unchecked, might send."""
    replies: list[bytes] = []
    listener = socket.socket(socket.AF_UNIX)
    path = paths.socket_path()
    Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    listener.bind(path)
    listener.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                protocol.read_line(conn.recv, protocol.MAX_REQUEST)
                conn.sendall(replies[0])

    threading.Thread(target=serve, daemon=True).start()
    yield replies
    listener.close()


def test_env_quotes_a_hostile_value_for_the_shell(
    stand_in_agent: list[bytes], tmp_path: Path
) -> None:
    """A value with quotes, `$(...)`, backticks, a newline, a glob and a leading `~` is
    exported quoted: bash's eval sets it to exactly that value and runs none of it."""
    stand_in_agent.append(protocol.encode(["ok"], [("name", "T"), ("value", HOSTILE)]))
    script = f'eval "$({sys.executable} -m mpagent env)" || exit 9; printf %s "$T"'
    result = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == HOSTILE and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ([("name", "T;touch PWNED"), ("value", "x")], "names the variable 'T;touch PWNED'"),
        ([("name", "A"), ("name", "B"), ("value", "x")], "does not pair each name with a value"),
        ([("name", "A")], "does not pair each name with a value"),
    ],
)
def test_env_refuses_a_malformed_answer(
    stand_in_agent: list[bytes], fields: list[tuple[str, str]], problem: str
) -> None:
    """A variable name that is not one, or names and values out of step: exit 1, nothing on
    stdout (nothing for eval to run), and a message saying so and what to do."""
    stand_in_agent.append(protocol.encode(["ok"], fields))
    result = run_cli("env")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        f"mpagent: the agent's answer to env {problem}; is it another mpagent version? "
        "Restart it with `mpagent stop`\n"
    )


# -- pure policy ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("eyJ.a-b_c~d+e/f==", "eyJ.a-b_c~d+e/f=="),
        ("1764420000", "1764420000"),
        ("", ""),
        ("~root", "'~root'"),
        ("=ls", "'=ls'"),
        ("a b", "'a b'"),
        ("it's", "'it'\\''s'"),
        ("$(id)", "'$(id)'"),
        ("æ", "'æ'"),
    ],
)
def test_shell_quote(value: str, shown: str) -> None:
    """A token's characters stay as they are; anything else, or a leading ~ or =, is quoted."""
    assert fastcli.shell_quote(value) == shown


@pytest.mark.parametrize(
    ("argv", "parsed"),
    [
        (["get", "s"], ("get", None, None, ["s"], None, False, False)),
        (
            ["--config", "c", "get", "s", "t", "-p", "x", "--min-ttl", "5", "--json"],
            ("get", "c", "x", ["s", "t"], 5.0, True, False),
        ),
        (
            ["--profile=p", "get", "s", "--config=c", "--no-start"],
            ("get", "c", "p", ["s"], None, False, True),
        ),
        (["env"], ("env", None, None, [], None, False, False)),
        (["-p", "x", "env", "--config=c"], ("env", "c", "x", [], None, False, False)),
        (["env", "--profile", "y"], ("env", None, "y", [], None, False, False)),
    ],
)
def test_fast_parse(argv: list[str], parsed: tuple[object, ...]) -> None:
    """The fast parser reads what argparse would for a get or an env."""
    args = fastcli.parse(argv)
    assert args is not None
    command = "get" if args.func is fastcli.cmd_get else "env"
    got = (command, args.config, args.profile, args.scopes, args.min_ttl, args.json, args.no_start)
    assert got == parsed


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["get"],
        ["status"],
        ["get", "s", "--no-agent"],
        ["get", "s", "--json=x"],
        ["get", "s", "--min-ttl", "soon"],
        ["get", "s", "--help"],
        ["get", "s", "--config"],
        ["--config", "--profile", "x", "get", "s"],
        ["-p=x", "get", "s"],
        ["--prof", "x", "get", "s"],
        ["env", "extra"],
        ["env", "--scope", "s"],
        ["env", "--help"],
        ["--min-ttl", "5", "get", "s"],
    ],
)
def test_fast_parse_leaves_the_rest_to_argparse(argv: list[str]) -> None:
    """Every other command, mistake, abbreviation and --help goes to argparse (None)."""
    assert fastcli.parse(argv) is None
