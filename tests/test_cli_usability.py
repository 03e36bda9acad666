"""What a new user meets first, end to end: option placement, `--help`, `~` in the
environment, what `stop`/`status`/`reload`/`refresh` say, network failures named by cause,
clock skew, warnings on `get`, and control characters kept off the terminal. The real CLI as a
subprocess, real agents, the emulator and stand-in servers on loopback."""

from __future__ import annotations

import argparse
import http.server
import json
import re
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from mpagent import client, paths
from mpagent.emulator import Emulator, pki
from mpagent.errors import AgentNotRunning
from mpagent.fullcli import build_parser

from .agentproc import AgentProcess, alive, wait_for
from .conftest import (
    CLIENT_ID,
    PASSWORD,
    SCOPES,
    issuer_key,
    profile_for,
    run_cli,
    shared_agent,
    write_config,
)
from .keystores import write_cert_pem, write_pem
from .test_fastpath import HOT_HALF

PROD_CLIENT = "0d7f3a52-9c1e-4b6a-8f2d-5e4c3b2a1f0e"
ENV = {"MPAGENT_KEYSTORE_PASSWORD": PASSWORD}
PACKAGE = Path(__file__).resolve().parent.parent / "mpagent"


def lines(stderr: str) -> list[str]:
    return stderr.strip().splitlines()


def client_of(stdout: str) -> str:
    return jwt.decode(stdout.strip(), options={"verify_signature": False})["client_id"]


@pytest.fixture
def emulator(ca: pki.Issued) -> Iterator[Emulator]:
    with Emulator(
        signing_key=issuer_key(), clients={CLIENT_ID: SCOPES, PROD_CLIENT: SCOPES}, trust=[ca.cert]
    ) as emu:
        yield emu


@pytest.fixture
def config(tmp_path: Path, home: Path, emulator: Emulator, p12: Path) -> Path:
    """Two profiles on one emulator, told apart by client id; dev is the default."""
    return two_profiles(tmp_path, emulator, p12)


def two_profiles(directory: Path, emulator: Emulator, p12: Path) -> Path:
    profiles = {
        "dev": profile_for(emulator, p12),
        "prod": profile_for(emulator, p12, client_id=PROD_CLIENT),
    }
    return write_config(directory / "config.toml", profiles, default_profile="dev")


@pytest.fixture(scope="module")
def shared(ca: pki.Issued, p12_bytes: bytes) -> Iterator[AgentProcess]:
    """One agent with the two profiles, for the tests that only ask it (conftest.shared_agent)."""
    clients = {CLIENT_ID: SCOPES, PROD_CLIENT: SCOPES}
    with shared_agent(ca, p12_bytes, two_profiles, clients) as proc:
        yield proc


@pytest.fixture
def autostarted(home: Path) -> Iterator[None]:
    """Stops whatever agent a test's `get` started."""
    yield
    try:
        pid = json.loads(dict(client.call(paths.socket_path(), "status", timeout=5))["json"])["pid"]
        client.call(paths.socket_path(), "stop", timeout=5)
        wait_for(lambda: not alive(pid))
    except AgentNotRunning:
        pass


# -- `~` in the environment ---------------------------------------------------------------


def test_tilde_in_mpagent_socket(
    config: Path, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MPAGENT_SOCKET=~/agent.sock is the socket in the home directory, for agent and client."""
    monkeypatch.setenv("MPAGENT_SOCKET", "~/agent.sock")
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    proc = AgentProcess(config, tmp_path / "agent.log").wait_ready()
    try:
        assert (home / "agent.sock").is_socket()
        result = run_cli("get", SCOPES[0], "--no-start")
        assert result.returncode == 0 and result.stdout.startswith("eyJ"), result.stderr
        status = run_cli("status")
        assert status.returncode == 0 and str(home / "agent.sock") in status.stdout
    finally:
        proc.stop()


def test_tilde_in_mpagent_socket_without_agent(home: Path) -> None:
    """With no agent, the message names the expanded socket path, not `~`."""
    result = run_cli("status", env={"MPAGENT_SOCKET": "~/none.sock"})
    assert result.returncode == 69
    assert f"no agent is running on {home / 'none.sock'};" in result.stderr


def test_tilde_in_mpagent_config(config: Path, home: Path) -> None:
    """MPAGENT_CONFIG=~/... is read from the home directory; a missing one is named expanded."""
    (home / "mine.toml").write_text(config.read_text())
    result = run_cli("get", SCOPES[0], "--no-agent", env={**ENV, "MPAGENT_CONFIG": "~/mine.toml"})
    assert result.returncode == 0 and client_of(result.stdout) == CLIENT_ID, result.stderr
    missing = run_cli("get", SCOPES[0], "--no-agent", env={"MPAGENT_CONFIG": "~/gone.toml"})
    assert missing.returncode == 78
    assert f"{home / 'gone.toml'}: no configuration file" in missing.stderr


# -- --config and --profile before or after the command -----------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["get", SCOPES[0], "--no-agent", "--config", "{config}", "--profile", "prod"],
        ["--config", "{config}", "--profile", "prod", "get", SCOPES[0], "--no-agent"],
        ["--config={config}", "get", "-p", "prod", SCOPES[0], "--no-agent"],
        ["--profile", "prod", "get", SCOPES[0], "--no-agent", "--config={config}"],
    ],
)
def test_config_and_profile_anywhere_without_agent(config: Path, argv: list[str]) -> None:
    """argparse takes --config and --profile before or after the command alike."""
    result = run_cli(*(a.format(config=config) for a in argv), env=ENV)
    assert result.returncode == 0, result.stderr
    assert client_of(result.stdout) == PROD_CLIENT


@pytest.mark.parametrize(
    "argv",
    [
        ["get", SCOPES[0], "--config", "{config}", "--profile", "prod"],
        ["--config", "{config}", "--profile", "prod", "get", SCOPES[0]],
        ["--profile=prod", "get", SCOPES[0], "--config={config}"],
        ["-p", "prod", "--config", "{config}", "get", SCOPES[0], "--no-start"],
    ],
)
def test_config_and_profile_anywhere_fast_path(shared: AgentProcess, argv: list[str]) -> None:
    """The fast `get` takes --config and --profile before or after `get`, and stays fast:
    no argparse, no json, no mpagent module outside the hot half."""
    args = [a.format(config=shared.config) for a in argv]
    result = run_cli(*args, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0, result.stderr
    assert client_of(result.stdout) == PROD_CLIENT
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert imported and not imported & {"argparse", "json"}, imported & {"argparse", "json"}
    ours = {name for name in imported if name.startswith("mpagent")}
    assert ours <= HOT_HALF | {"mpagent.__main__"}, ours - HOT_HALF


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_reaches_the_autostarted_agent(config: Path, autostarted: None, where: str) -> None:
    """`get S --config F` (or `--config F get S`) with no agent starts one with that config."""
    option = ["--config", str(config)]
    argv = [*option, "get", SCOPES[0]] if where == "before" else ["get", SCOPES[0], *option]
    result = run_cli(*argv, env=ENV)
    assert result.returncode == 0, result.stderr
    assert client_of(result.stdout) == CLIENT_ID
    status = json.loads(dict(client.call(paths.socket_path(), "status"))["json"])
    assert status["config"] == str(config)


def test_status_takes_config_after_the_command(shared: AgentProcess) -> None:
    """`mpagent status --config F` is accepted (exit 0), as `mpagent --config F status` is."""
    config = shared.config
    for argv in (["status", "--config", str(config)], ["--config", str(config), "status"]):
        result = run_cli(*argv)
        assert result.returncode == 0 and "PROFILE" in result.stdout, result.stderr


# -- usage errors and --help ------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        ([], "usage: mpagent"),
        (["get"], "the following arguments are required: SCOPE"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["get", "s", "--min-ttl", "soon"], "invalid float value: 'soon'"),
    ],
)
def test_usage_errors_exit_2(home: Path, argv: list[str], fragment: str) -> None:
    """A usage mistake exits 2 (as the README's table says), with stdout empty."""
    result = run_cli(*argv)
    assert result.returncode == 2 and result.stdout == ""
    assert fragment in result.stderr


def _options(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.Action]]:
    """Every option and positional of the parser and its subcommands, named for messages."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                for label, inner in _options(sub):
                    yield f"{name} {label}", inner
        elif not isinstance(action, argparse._HelpAction | argparse._VersionAction):
            yield "/".join(action.option_strings) or action.metavar or action.dest, action


def test_every_option_has_help_and_its_default() -> None:
    """Each option of each command has help text, and the help names any real default."""
    missing, no_default = [], []
    for label, action in _options(build_parser()):
        if not action.help or action.help == argparse.SUPPRESS:
            missing.append(label)
        elif action.default not in (None, False, [], argparse.SUPPRESS) and (
            "default" not in action.help
        ):
            no_default.append(label)
    assert not missing, f"options without help: {missing}"
    assert not no_default, f"help without the default: {no_default}"


def test_help_lists_every_environment_variable(home: Path) -> None:
    """`mpagent --help` names every MPAGENT_* variable the code reads, and the exit statuses."""
    names = {
        name
        for file in PACKAGE.rglob("*.py")
        for name in re.findall(r"MPAGENT_[A-Z_]+", file.read_text(encoding="utf-8"))
    }
    assert "MPAGENT_SOCKET" in names and "MPAGENT_LOG_LEVEL" in names
    names -= {"MPAGENT_PKI_PW"}  # set, not read: how emulator/pki.py hands keytool a password
    result = run_cli("--help")
    assert result.returncode == 0
    epilog = result.stdout.split("environment variables:", 1)[1]
    assert [name for name in sorted(names) if name not in epilog] == []
    assert "2 usage error" in epilog and "69 no agent" in epilog


def test_subcommand_help_shows_defaults(home: Path) -> None:
    """`mpagent get --help` describes --profile's and --min-ttl's defaults."""
    result = run_cli("get", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "default: MPAGENT_PROFILE, else default_profile, else the only profile" in text
    assert "(default: 10 s" in text and "--config FILE" in text


# -- stop, status, reload, refresh --------------------------------------------------------


def test_stop_says_what_it_stopped(agent: AgentProcess) -> None:
    """`stop` names the pid and socket of the agent it stopped, and exits 0."""
    result = run_cli("stop")
    assert result.returncode == 0, result.stderr
    expected = f"mpagent: stopped the agent (pid {agent.proc.pid}) on {agent.socket}"
    assert lines(result.stderr) == [expected]
    assert agent.proc.wait(10) == 0


def test_stop_without_agent(home: Path) -> None:
    """`stop` with no agent says so plainly and exits 69."""
    result = run_cli("stop")
    assert result.returncode == 69 and result.stdout == ""
    assert lines(result.stderr) == [
        f"mpagent: no agent is running on {paths.socket_path()}; nothing to stop"
    ]


def test_status_without_agent_says_get_starts_one(home: Path) -> None:
    """`status` with no agent exits 69 and says that `get` starts one."""
    result = run_cli("status")
    assert result.returncode == 69 and result.stdout == ""
    assert lines(result.stderr) == [
        f"mpagent: no agent is running on {paths.socket_path()}; "
        "`mpagent get SCOPE` starts one, or run `mpagent agent` "
        '(`mpagent agent --foreground-only` for [agent] mode = "server")'
    ]


def test_reload_names_unusable_profiles(agent: AgentProcess, config: Path, p12: Path) -> None:
    """`reload` says it reloaded, then names each profile that cannot be used; exit 0."""
    text = config.read_text() + (
        f'[profiles.broken]\nclient_id = "{CLIENT_ID}"\nenvironment = "test"\n'
        f'keystore = "{config.parent / "missing.p12"}"\n'
    )
    config.write_text(text)
    result = run_cli("reload")
    assert result.returncode == 0, result.stderr
    said = lines(result.stderr)
    assert said[0] == "mpagent: reloaded"
    assert len(said) == 2 and said[1].startswith("mpagent: profile broken cannot be used: ")
    assert "missing.p12" in said[1]


def test_reload_without_problems(agent: AgentProcess) -> None:
    """A clean `reload` prints just `mpagent: reloaded`."""
    result = run_cli("reload")
    assert result.returncode == 0 and lines(result.stderr) == ["mpagent: reloaded"]


def test_refresh_every_token(agent: AgentProcess, emulator: Emulator) -> None:
    """`refresh` fetches each kept token again now and says so per token; exit 0."""
    wait_for(lambda: emulator.token_requests >= 2)
    before = emulator.token_requests
    result = run_cli("refresh")
    assert result.returncode == 0, result.stderr
    assert sorted(lines(result.stderr)) == [
        f"mpagent: refreshed dev:{SCOPES[0]}",
        f"mpagent: refreshed prod:{SCOPES[0]}",
    ]
    assert emulator.token_requests == before + 2


def test_refresh_one_profile(agent: AgentProcess, emulator: Emulator) -> None:
    """`refresh prod` (or `refresh --profile prod`) refreshes only prod's tokens."""
    wait_for(lambda: emulator.token_requests >= 2)
    for argv in (["refresh", "prod"], ["refresh", "--profile", "prod"]):
        result = run_cli(*argv)
        assert result.returncode == 0, result.stderr
        assert lines(result.stderr) == [f"mpagent: refreshed prod:{SCOPES[0]}"]


def test_refresh_failure_exit_status(
    emulator: Emulator, p12: Path, tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token that still fails is named with its error; the exit status is its class's (77)."""
    profile = profile_for(emulator, p12, scopes=[SCOPES[0], "nav:secret"])
    config = write_config(tmp_path / "config.toml", {"dev": profile})
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    proc = AgentProcess(config, tmp_path / "agent.log").wait_ready()
    try:
        result = run_cli("refresh")
    finally:
        proc.stop()
    assert result.returncode == 77, result.stderr
    said = sorted(lines(result.stderr))
    assert said[0].startswith("mpagent: dev:nav:secret failed: Maskinporten refused the grant")
    assert said[1] == f"mpagent: refreshed dev:{SCOPES[0]}"


def test_refresh_without_agent(home: Path) -> None:
    """`refresh` with no agent exits 69 and says there is nothing to refresh."""
    result = run_cli("refresh")
    assert result.returncode == 69
    assert lines(result.stderr) == [
        f"mpagent: no agent is running on {paths.socket_path()}; nothing to refresh"
    ]


# -- network failures named by their cause -------------------------------------------------


def _no_agent_get(config: Path, environment: str, p12: Path, **http: float):
    profile = {"environment": environment, "client_id": CLIENT_ID, "keystore": p12}
    write_config(config, {"dev": profile}, http=http or {"read_timeout": 5})
    return run_cli("--config", str(config), "get", SCOPES[0], "--no-agent", env=ENV)


def _assert_unavailable(result, *fragments: str) -> None:
    assert result.returncode == 75 and result.stdout == "", result.stderr
    assert len(lines(result.stderr)) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)
    assert "ConnectionError" not in result.stderr


def test_unresolvable_host(tmp_path: Path, home: Path, p12: Path) -> None:
    """A host that does not resolve (.invalid never does, RFC 6761): "cannot resolve HOST"."""
    result = _no_agent_get(tmp_path / "c.toml", "https://nonexistent.invalid/", p12)
    _assert_unavailable(result, "cannot resolve nonexistent.invalid", "DNS")


def test_connection_refused(tmp_path: Path, home: Path, p12: Path) -> None:
    """A closed loopback port: "connection refused by HOST:PORT"."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = _no_agent_get(tmp_path / "c.toml", f"http://127.0.0.1:{port}/", p12)
    _assert_unavailable(result, f"connection refused by 127.0.0.1:{port}")


class _Quiet(http.server.HTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the failed handshakes are the point


@pytest.fixture
def self_signed_https(tmp_path: Path) -> Iterator[str]:
    """A loopback HTTPS server whose certificate nobody trusts."""
    issued = pki.make_ca("127.0.0.1")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(
        write_cert_pem(tmp_path / "tls.pem", [issued.cert]), write_pem(tmp_path / "tls.key", issued)
    )
    httpd = _Quiet(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def test_untrusted_tls_certificate(
    tmp_path: Path, home: Path, p12: Path, self_signed_https: str
) -> None:
    """A self-signed server certificate: "TLS certificate of HOST not trusted: ..."."""
    result = _no_agent_get(tmp_path / "c.toml", self_signed_https, p12)
    _assert_unavailable(
        result, "TLS certificate of 127.0.0.1 not trusted: self-signed", "REQUESTS_CA_BUNDLE"
    )


def test_silent_server_times_out(tmp_path: Path, home: Path, p12: Path) -> None:
    """A server that accepts and never answers: "timed out after N s", N from [http]."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        result = _no_agent_get(tmp_path / "c.toml", url, p12, read_timeout=1)
    _assert_unavailable(result, "did not answer: timed out after 1 s", "read_timeout")


# -- clock skew -----------------------------------------------------------------------------


def _skewed_get(config: Path, ca: pki.Issued, p12: Path, offset: float, *extra: str):
    with Emulator(
        signing_key=issuer_key(), clients={CLIENT_ID: SCOPES}, trust=[ca.cert], clock_offset=offset
    ) as emu:
        write_config(config, {"dev": profile_for(emu, p12)})
        return run_cli("--config", str(config), *extra, env=ENV)


def _clock_warnings(stderr: str) -> list[str]:
    return [line for line in lines(stderr) if "clock is" in line and "warning" in line]


def test_skew_warned_once_with_prefix(
    tmp_path: Path, home: Path, ca: pki.Issued, p12: Path
) -> None:
    """A clock 7 s ahead (Maskinporten still accepts): one `mpagent: warning:` line for the
    two requests (metadata, token), and the token on stdout."""
    result = _skewed_get(tmp_path / "c.toml", ca, p12, -7, "get", SCOPES[0], "--no-agent")
    assert result.returncode == 0 and result.stdout.startswith("eyJ"), result.stderr
    assert result.stdout.count("\n") == 1
    warned = _clock_warnings(result.stderr)
    assert len(warned) == 1 and lines(result.stderr) == warned, result.stderr
    assert re.match(r"mpagent: warning: this machine's clock is [678] s ahead of", warned[0])


def test_doctor_skew_warning_has_the_prefix(
    tmp_path: Path, home: Path, ca: pki.Issued, p12: Path
) -> None:
    """doctor's clock warning on stderr is one `mpagent: warning:` line, not bare log text."""
    result = _skewed_get(tmp_path / "c.toml", ca, p12, -7, "doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(_clock_warnings(result.stderr)) == 1
    assert all(line.startswith("mpagent: ") for line in lines(result.stderr)), result.stderr


@pytest.mark.parametrize(("offset", "side"), [(-30, "ahead of"), (30, "behind")])
def test_skew_refusal_says_how_far_off(
    tmp_path: Path, home: Path, ca: pki.Issued, p12: Path, offset: float, side: str
) -> None:
    """A grant refused for a clock 30 s off: exit 77, how far off and which way, and the fix."""
    result = _skewed_get(tmp_path / "c.toml", ca, p12, offset, "get", SCOPES[0], "--no-agent")
    assert result.returncode == 77 and result.stdout == "", result.stderr
    error = lines(result.stderr)[-1]
    assert error.startswith("mpagent: Maskinporten refused the grant")
    assert re.search(rf"this machine's clock is (29|30|31) s {side} Maskinporten's", error)
    assert "fix the system clock" in error
    assert len(_clock_warnings(result.stderr)) == 1


# -- warnings on get, and control characters ----------------------------------------------


def test_get_prints_the_agents_warnings(
    emulator: Emulator, ca: pki.Issued, tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A warning in the agent's `get` reply (a nonRepudiation-only certificate) reaches stderr
    as `mpagent: warning: ...` once, with the first token; stdout is exactly the token."""
    signing = pki.make_leaf(ca, usage="nonRepudiation")
    keystore = pki.write_pkcs12(tmp_path / "sign.p12", {"auth": signing}, PASSWORD, [ca.cert])
    config = write_config(tmp_path / "config.toml", {"dev": profile_for(emulator, keystore)})
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    proc = AgentProcess(config, tmp_path / "agent.log").wait_ready()
    try:
        result = run_cli("get", SCOPES[0], "--no-start")
        again = run_cli("get", SCOPES[0], "--no-start")
    finally:
        proc.stop()
    assert again.returncode == 0 and again.stderr == "" and again.stdout == result.stdout
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and result.stdout.startswith("eyJ")
    said = lines(result.stderr)
    assert said and all(line.startswith("mpagent: warning: ") for line in said), said
    assert "nonRepudiation" in result.stderr


def test_control_characters_are_escaped(config: Path) -> None:
    """An ESC in a scope, echoed back in the issuer's error, is shown as \\x1b: one line,
    nothing the terminal would act on."""
    scope = "nav:\x1b[31msecret\x7f"
    result = run_cli("--config", str(config), "get", scope, "--no-agent", env=ENV)
    assert result.returncode == 77 and result.stdout == ""
    assert "\x1b" not in result.stderr and "\x7f" not in result.stderr
    assert "nav:\\x1b[31msecret\\x7f" in result.stderr
    assert len(lines(result.stderr)) == 1
