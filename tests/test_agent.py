"""The agent end to end: a real agent process, the real CLI, the emulator issuing tokens that
live a few seconds, real Unix sockets."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mpagent import client, paths
from mpagent.emulator import Emulator, pki
from mpagent.errors import (
    ConfigError,
    IssuerRejected,
    IssuerUnavailable,
    MpagentError,
    ProtocolError,
)

from .agentproc import AgentProcess, alive, status, wait_for
from .conftest import CLIENT_ID, PASSWORD, SCOPES, issuer_key, profile_for, run_cli, write_config

LIFETIME = 4
ENV = {"MPAGENT_KEYSTORE_PASSWORD": PASSWORD}


@pytest.fixture
def short_emulator(ca: pki.Issued) -> Iterator[Emulator]:
    with Emulator(
        signing_key=issuer_key(),
        clients={CLIENT_ID: SCOPES},
        trust=[ca.cert],
        token_lifetime=LIFETIME,
    ) as emu:
        yield emu


@pytest.fixture
def config(tmp_path: Path, home: Path, short_emulator: Emulator, p12: Path) -> Path:
    profile = profile_for(short_emulator, p12, scopes=[SCOPES[0]])
    return write_config(tmp_path / "config.toml", {"dev": profile}, agent={"log_level": "debug"})


def token_count(emulator: Emulator) -> int:
    return emulator.token_requests


def env_file() -> Path:
    return Path(paths.default_env_file())


def test_get_answers_from_the_cache(agent: AgentProcess, short_emulator: Emulator) -> None:
    """A configured scope is fetched at start; `get` answers from the cache, stdout = token."""
    first = run_cli("get", SCOPES[0])
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("\n") == 1 and first.stdout.startswith("eyJ")
    requests = short_emulator.token_requests
    again = run_cli("get", SCOPES[0])
    assert again.stdout == first.stdout
    assert short_emulator.token_requests == requests


def test_refresh_ahead_without_clients(agent: AgentProcess, short_emulator: Emulator) -> None:
    """With no client activity the token is replaced before it expires, and the env file
    follows each refresh with mode 0600."""
    wait_for(lambda: env_file().exists() and "TOKEN" in env_file().read_text())
    first = env_file().read_text()
    before = status()["tokens"][0]
    assert before["refreshes"] >= 1
    wait_for(lambda: env_file().read_text() != first, timeout=LIFETIME + 2)
    after = status()["tokens"][0]
    assert after["refreshes"] > before["refreshes"]
    assert after["expires_at"] - time.time() > LIFETIME * 0.3  # replaced well before expiry
    assert stat.S_IMODE(env_file().stat().st_mode) == 0o600
    lines = dict(line.split("=", 1) for line in env_file().read_text().splitlines()[1:])
    assert set(lines) == {  # the only profile's token, under its full and its short name
        "MASKINPORTEN_TOKEN_DEV_IDPORTEN_DCR_READ",
        "MASKINPORTEN_TOKEN_DEV_IDPORTEN_DCR_READ_EXPIRES_AT",
        "MASKINPORTEN_TOKEN_IDPORTEN_DCR_READ",
        "MASKINPORTEN_TOKEN_IDPORTEN_DCR_READ_EXPIRES_AT",
    }


def test_single_flight(agent: AgentProcess, short_emulator: Emulator) -> None:
    """100 concurrent gets for a cold on-demand key cause exactly one token request."""
    wait_for(lambda: status()["tokens"][0]["refreshes"] >= 1)
    before = short_emulator.token_requests
    results: list[str] = []

    def one() -> None:
        results.append(
            dict(client.call(paths.socket_path(), "get", [("scope", SCOPES[2])]))["token"]
        )

    threads = [threading.Thread(target=one) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 100 and len(set(results)) == 1
    # Only the new key's one request (a configured-key refresh may also have happened).
    new_key = next(t for t in status()["tokens"] if t["scope"] == SCOPES[2])
    assert new_key["issuer_requests"] == 1
    assert short_emulator.token_requests - before <= 2


@pytest.mark.slow
def test_outage_serves_cached_then_fails(agent: AgentProcess, short_emulator: Emulator) -> None:
    """While the issuer is down the valid token keeps being served; after expiry `get`
    fails with exit 75 and the issuer's failure."""
    wait_for(lambda: status()["tokens"][0]["refreshes"] >= 1)
    token = run_cli("get", SCOPES[0]).stdout
    short_emulator.inject("503", 1000)
    expires_at = status()["tokens"][0]["expires_at"]
    served = []
    while time.time() < expires_at - 1.5:
        result = run_cli("get", SCOPES[0])
        assert result.returncode == 0, result.stderr
        served.append(result.stdout)
    assert served and all(s == token for s in served)
    wait_for(lambda: time.time() > expires_at, timeout=LIFETIME + 1)
    failed = run_cli("get", SCOPES[0])
    assert failed.returncode == 75 and failed.stdout == ""
    assert "answered HTTP 503" in failed.stderr
    assert "the agent tries again in" in failed.stderr
    assert "`mpagent refresh dev` tries now" in failed.stderr
    assert status()["tokens"][0]["last_error"]["kind"] == "unavailable"


def test_rejection_exit_77(agent: AgentProcess) -> None:
    """An unregistered scope fails at once with exit 77 and Maskinporten's description."""
    result = run_cli("get", "not:registered")
    assert result.returncode == 77 and result.stdout == ""
    assert "MP-200" in result.stderr and "not:registered" in result.stderr


def test_reload_on_config_change_and_bad_config(agent: AgentProcess, config: Path) -> None:
    """Editing the config reloads it; a file that is not valid TOML is refused, shown in
    status, and the old configuration keeps serving."""
    original = config.read_text()
    config.write_text(
        original.replace(f'scopes = ["{SCOPES[0]}"]', f'scopes = ["{SCOPES[0]}", "{SCOPES[1]}"]')
    )
    wait_for(lambda: any(t["scope"] == SCOPES[1] and t["configured"] for t in status()["tokens"]))
    config.write_text(original.replace("[profiles.dev]", "[profiles.dev"))
    wait_for(lambda: status()["reload_error"])
    assert "not valid TOML" in status()["reload_error"]
    assert run_cli("get", SCOPES[1]).returncode == 0
    reload = run_cli("reload")
    assert reload.returncode == 78 and f"{config}: not valid TOML" in reload.stderr


def test_sighup_reloads(agent: AgentProcess, config: Path) -> None:
    """SIGHUP re-reads the configuration."""
    agent.signal(signal.SIGHUP)
    wait_for(lambda: "reloading (a watched file changed or SIGHUP)" in agent.log())


def test_graceful_stop_removes_socket_and_env_file(agent: AgentProcess) -> None:
    """`mpagent stop` ends the agent cleanly: socket and env file are gone."""
    wait_for(env_file().exists)
    assert run_cli("stop").returncode == 0
    assert agent.proc.wait(10) == 0
    assert not Path(paths.socket_path()).exists()
    assert not env_file().exists()


def test_second_agent_refused(agent: AgentProcess, config: Path) -> None:
    """A second agent on the same socket exits with 'already running'."""
    second = run_cli("--config", str(config), "agent", timeout=20)
    assert second.returncode != 0 and "already running" in second.stderr
    assert run_cli("get", SCOPES[0]).returncode == 0


def test_stale_socket_is_replaced(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socket file left by a dead agent is probed and replaced."""
    path = Path(paths.socket_path())
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    proc = AgentProcess(config, tmp_path / "agent.log").wait_ready()
    try:
        assert run_cli("get", SCOPES[0]).returncode == 0
        assert "replacing stale socket" in proc.log()
    finally:
        proc.stop()


def test_malformed_input_answered_without_harm(agent: AgentProcess) -> None:
    """Garbage, oversized and half-closed requests get error replies; the agent keeps serving."""

    def raw(data: bytes, shut: bool = True) -> bytes:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(paths.socket_path())
            s.sendall(data)
            if shut:
                s.shutdown(socket.SHUT_WR)
            return s.recv(65536)

    assert raw(b"\xff\xfe\n").startswith(b"error kind=protocol")
    assert raw(b"mpagent/9 get scope=x\n").startswith(b"error kind=protocol")
    assert raw(b"mpagent/1 explode\n").startswith(b"error kind=protocol")
    assert raw(b"mpagent/1 get\n").startswith(b"error kind=protocol")
    assert raw(b"mpagent/1 get scope=a min_ttl=abc\n").startswith(b"error kind=protocol")
    assert raw(b"mpagent/1 get scope=x").startswith(b"error kind=protocol")  # no newline, EOF
    assert raw(b"x" * 100_000, shut=False).startswith(b"error kind=protocol")
    assert run_cli("get", SCOPES[0]).returncode == 0


def test_no_secrets_in_debug_log(agent: AgentProcess, p12: Path) -> None:
    """At debug level the log holds no token, grant, password or key material."""
    token = run_cli("get", SCOPES[0]).stdout.strip()
    wait_for(lambda: status()["tokens"][0]["refreshes"] >= 2, timeout=LIFETIME + 2)
    log = agent.log()
    assert "refreshed" in log
    for secret in (token, token[-40:], PASSWORD, "eyJ", "PRIVATE KEY"):
        assert secret not in log


def test_peer_of_another_uid_is_refused(agent: AgentProcess) -> None:
    """A process running as another user cannot get an answer from the socket."""
    if os.getuid() != 0:
        pytest.skip("needs root to switch to another uid")
    code = (
        "import os, socket, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        f"    s.connect({paths.socket_path()!r}); s.sendall(b'mpagent/1 status\\n')\n"
        "    print(repr(s.recv(100)))\n"
        "except OSError as e:\n"
        "    print('refused', e.errno)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith("refused") or out.strip() == "b''", out


def test_env_and_exec(agent: AgentProcess, config: Path) -> None:
    """`env` prints export lines; `exec` runs the command with the token in its environment
    and passes its exit status through."""
    token = run_cli("get", SCOPES[0]).stdout.strip()
    env = run_cli("--config", str(config), "env")
    assert f"export MASKINPORTEN_TOKEN_IDPORTEN_DCR_READ={token}" in env.stdout.splitlines()
    script = 'test "$MASKINPORTEN_TOKEN_IDPORTEN_DCR_READ" = "$EXPECTED" && exit 7'
    result = run_cli(
        "--config", str(config), "exec", "--", "sh", "-c", script, env={"EXPECTED": token}
    )
    assert result.returncode == 7


def test_status_human_and_json(agent: AgentProcess) -> None:
    """status shows pid, socket, env file and each key's expiry and refresh count."""
    wait_for(lambda: status()["tokens"][0]["refreshes"] >= 1)
    human = run_cli("status")
    assert (
        human.returncode == 0 and "idporten:dcr.read" in human.stdout and "socket" in human.stdout
    )
    document = json.loads(run_cli("status", "--json").stdout)
    assert document["pid"] == agent.proc.pid and document["tokens"][0]["valid"]


def test_get_without_agent_fails_69_with_no_start(home: Path, config: Path) -> None:
    """With autostart off and no agent, `get` fails with exit 69 and says how to start one."""
    result = run_cli("get", SCOPES[0], "--no-start")
    assert result.returncode == 69 and result.stdout == ""
    assert "mpagent agent" in result.stderr


def test_autostart_after_kill_9(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no agent, `get` starts one; after kill -9 the next `get` starts a new one."""
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    monkeypatch.setenv("MPAGENT_CONFIG", str(config))
    first = run_cli("get", SCOPES[0])
    assert first.returncode == 0, first.stderr
    pid = status()["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid))
    second = run_cli("get", SCOPES[0])
    assert second.returncode == 0, second.stderr
    new_pid = status()["pid"]
    assert new_pid != pid
    client.call(paths.socket_path(), "stop")
    wait_for(lambda: not alive(new_pid))


@pytest.mark.slow
def test_twenty_simultaneous_gets_start_one_agent(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty simultaneous `get`s with no agent running start exactly one agent; all succeed."""
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    monkeypatch.setenv("MPAGENT_CONFIG", str(config))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "mpagent", "get", SCOPES[0]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(20)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outputs]
    assert len({o[0] for o in outputs}) == 1
    pid = status()["pid"]
    log = (Path(os.environ["XDG_STATE_HOME"]) / "mpagent" / "agent.log").read_text()
    assert log.count("serving on") == 1, log
    client.call(paths.socket_path(), "stop")
    wait_for(lambda: not alive(pid))


@pytest.mark.slow
def test_error_class_survives_the_socket(agent: AgentProcess, short_emulator: Emulator) -> None:
    """An issuer failure reaches the client as the same error class with its details."""
    short_emulator.inject("503", 1000)
    with pytest.raises(IssuerUnavailable, match="HTTP 503"):
        client.call(paths.socket_path(), "get", [("scope", "idporten:dcr.write")])


def test_header_for_curl(agent: AgentProcess) -> None:
    """`header` prints one Authorization line with the same token `get` gives."""
    token = run_cli("get", SCOPES[0]).stdout.strip()
    assert run_cli("header", SCOPES[0]).stdout == f"Authorization: Bearer {token}\n"


def test_keystore_change_drops_tokens_of_the_old_key(
    agent: AgentProcess, p12: Path, ca: pki.Issued
) -> None:
    """Replacing the keystore file reloads; tokens signed for the old key are dropped."""
    from mpagent.emulator.pki import write_pkcs12

    old_key = wait_for(lambda: status()["tokens"] and status()["tokens"][0]["key"])
    old_token = run_cli("get", SCOPES[0]).stdout
    new = p12.with_name("new.p12")
    write_pkcs12(new, {"auth": pki.make_leaf(ca)}, PASSWORD, [ca.cert])
    os.replace(new, p12)  # what editors and cert tools do
    wait_for(lambda: status()["tokens"][0]["key"] not in (old_key, None))
    assert "its configuration changed" in agent.log()
    assert run_cli("get", SCOPES[0]).stdout != old_token


@pytest.mark.slow
def test_idle_on_demand_keys_are_dropped(
    tmp_path: Path, home: Path, short_emulator: Emulator, p12: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An on-demand scope set unused for idle_timeout is dropped; configured ones stay."""
    config = write_config(
        tmp_path / "config.toml",
        {"dev": profile_for(short_emulator, p12)},
        agent={"idle_timeout": 1},
    )
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    proc = AgentProcess(config, tmp_path / "agent.log").wait_ready()
    try:
        assert run_cli("get", SCOPES[2]).returncode == 0
        assert {t["scope"] for t in status()["tokens"]} == {SCOPES[0], SCOPES[2]}
        wait_for(lambda: {t["scope"] for t in status()["tokens"]} == {SCOPES[0]}, timeout=10)
        assert "dropping idle on-demand token key" in proc.log()
    finally:
        proc.stop()


def test_sigterm_lets_in_flight_requests_finish(
    agent: AgentProcess, short_emulator: Emulator
) -> None:
    """A request waiting on a refresh when SIGTERM arrives still gets its answer."""
    short_emulator.hang_seconds = 1.0
    short_emulator.inject("hang")
    reply: list[object] = []

    def ask() -> None:
        try:
            reply.append(client.call(paths.socket_path(), "get", [("scope", SCOPES[1])]))
        except Exception as exc:  # the answer may be an error; it must be an answer
            reply.append(exc)

    thread = threading.Thread(target=ask)
    thread.start()
    wait_for(lambda: short_emulator.token_requests >= 2)  # the configured one, then ours
    agent.signal(signal.SIGTERM)
    thread.join(15)
    assert agent.proc.wait(15) == 0
    assert reply and not isinstance(reply[0], client.AgentNotRunning), reply


def test_journal_formatter_gives_priorities() -> None:
    """Under systemd each log line starts with its syslog priority and nothing journald adds."""
    import logging

    from mpagent.logs import JournalFormatter

    record = logging.LogRecord("mpagent", logging.ERROR, __file__, 1, "boom %s", ("x",), None)
    assert JournalFormatter().format(record) == "<3>boom x"


def test_status_warns_of_certificate_expiry(
    tmp_path: Path,
    home: Path,
    short_emulator: Emulator,
    ca: pki.Issued,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """status warns when the signing certificate expires within 30 days."""
    import datetime as dt

    from mpagent.emulator.pki import write_pkcs12

    soon = pki.make_leaf(ca, not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=10))
    keystore = write_pkcs12(tmp_path / "soon.p12", {"auth": soon}, PASSWORD, [ca.cert])
    config = write_config(tmp_path / "config.toml", {"dev": profile_for(short_emulator, keystore)})
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    proc = AgentProcess(config, home / "agent.log").wait_ready()
    try:
        assert "expires in 10 days" in status()["warnings"]["dev"]
        assert "WARNING profile dev: the certificate" in run_cli("status").stdout
    finally:
        proc.stop()


# -- the `env` verb: what `mpagent env` and `mpagent exec` ask the agent for -----------------

FULL = "MASKINPORTEN_TOKEN_DEV_IDPORTEN_DCR_READ"
SHORT = "MASKINPORTEN_TOKEN_IDPORTEN_DCR_READ"


def env_reply(**fields: str | list[str]) -> list[tuple[str, str]]:
    """The agent's `env` reply over its real socket, as (name, value) pairs in reply order;
    fails unless the reply is alternating name/value fields (plus warnings)."""
    request = [(k, v) for k, vs in fields.items() for v in ([vs] if isinstance(vs, str) else vs)]
    reply = [f for f in client.call(paths.socket_path(), "env", request) if f[0] != "warning"]
    assert [k for k, _ in reply] == ["name", "value"] * (len(reply) // 2), reply
    return [(reply[i][1], reply[i + 1][1]) for i in range(0, len(reply), 2)]


def get_reply(**fields: str) -> dict[str, str]:
    return dict(client.call(paths.socket_path(), "get", list(fields.items())))


def test_env_verb_names_every_configured_token_as_the_env_file_does(agent: AgentProcess) -> None:
    """`env` without scopes: each configured token under its env-file names (the default
    profile's short one too), each followed by NAME_EXPIRES_AT in integer epoch seconds; the
    token is the one `get` serves."""

    def consistent() -> tuple[list[tuple[str, str]], str] | None:
        before = get_reply(scope=SCOPES[0])["token"]
        pairs = env_reply()
        after = get_reply(scope=SCOPES[0])["token"]
        return (pairs, before) if before == after else None  # no refresh in between

    pairs, token = wait_for(consistent)
    names = [name for name, _ in pairs]
    assert names == [FULL, f"{FULL}_EXPIRES_AT", SHORT, f"{SHORT}_EXPIRES_AT"]
    values = dict(pairs)
    assert values[FULL] == values[SHORT] == token
    expires = values[f"{FULL}_EXPIRES_AT"]
    assert expires.isdigit() and expires == values[f"{SHORT}_EXPIRES_AT"]
    assert time.time() - 1 <= int(expires) <= time.time() + LIFETIME


def test_env_verb_takes_the_scopes_given_in_their_order(
    agent: AgentProcess, short_emulator: Emulator
) -> None:
    """`env scope=...`: only the scopes given (on-demand ones too), in request order; a scope
    set is one token under its canonical name."""
    both = f"{SCOPES[1]} {SCOPES[0]}"
    pairs = env_reply(scope=[SCOPES[1], both])
    assert [name for name, _ in pairs] == [
        "MASKINPORTEN_TOKEN_DEV_IDPORTEN_DCR_WRITE",
        "MASKINPORTEN_TOKEN_DEV_IDPORTEN_DCR_WRITE_EXPIRES_AT",
        "MASKINPORTEN_TOKEN_IDPORTEN_DCR_WRITE",
        "MASKINPORTEN_TOKEN_IDPORTEN_DCR_WRITE_EXPIRES_AT",
        "MASKINPORTEN_TOKEN_DEV_IDPORTEN_DCR_READ_IDPORTEN_DCR_WRITE",
        "MASKINPORTEN_TOKEN_DEV_IDPORTEN_DCR_READ_IDPORTEN_DCR_WRITE_EXPIRES_AT",
        "MASKINPORTEN_TOKEN_IDPORTEN_DCR_READ_IDPORTEN_DCR_WRITE",
        "MASKINPORTEN_TOKEN_IDPORTEN_DCR_READ_IDPORTEN_DCR_WRITE_EXPIRES_AT",
    ]
    scopes = {t["scope"] for t in status()["tokens"] if not t["configured"]}
    assert scopes == {SCOPES[1], f"{SCOPES[0]} {SCOPES[1]}"}


def test_env_verb_fails_as_get_does(agent: AgentProcess) -> None:
    """`env` fails with get's error class, exit status and message: an unknown profile (78),
    a scope the issuer rejects (77, for a request with a good scope too), a min_ttl beyond
    the tokens' lifetime, and a min_ttl that is not a number."""
    cases: list[tuple[dict[str, str | list[str]], dict[str, str]]] = [
        ({"profile": "deev", "scope": SCOPES[0]}, {"profile": "deev", "scope": SCOPES[0]}),
        ({"scope": [SCOPES[0], "not:registered"]}, {"scope": "not:registered"}),
        ({"min_ttl": "100"}, {"scope": SCOPES[0], "min_ttl": "100"}),
        ({"min_ttl": "soon"}, {"scope": SCOPES[0], "min_ttl": "soon"}),
    ]
    failures = []
    for env_fields, get_fields in cases:
        with pytest.raises(MpagentError) as from_env:
            env_reply(**env_fields)
        with pytest.raises(MpagentError) as from_get:
            get_reply(**get_fields)
        # "(the agent tries again in N s...)": N moves on between the two requests
        said = [str(e.value).split(" (the agent tries again")[0] for e in (from_env, from_get)]
        assert type(from_env.value) is type(from_get.value) and said[0] == said[1], said
        failures.append((type(from_env.value), from_env.value.exit_code, said[0]))
    assert [(kind, code) for kind, code, _ in failures] == [
        (ConfigError, 78),
        (IssuerRejected, 77),
        (MpagentError, 1),
        (ProtocolError, 1),
    ]
    assert "no profile 'deev' (profiles: dev); did you mean 'dev'?" in failures[0][2]
    assert "MP-200" in failures[1][2] and "not:registered" in failures[1][2]
    assert failures[2][2] == (
        f"the issuer's tokens live {LIFETIME} s, less than the 100 s asked for with --min-ttl; "
        "ask for less"
    )
    assert failures[3][2] == "min_ttl must be a number, not 'soon'"


def test_env_verb_waits_out_a_transient_failure(
    tmp_path: Path, home: Path, short_emulator: Emulator, p12: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As `get`, `env` waits out a short backoff after a 503 and answers with the retry's
    token; a profile without scopes, asked for none, answers with no pairs; env_names give
    the names."""
    profile = {k: v for k, v in profile_for(short_emulator, p12).items() if k != "scopes"}
    profile["env_names"] = {SCOPES[1]: "DCR_WRITE_TOKEN"}
    config = write_config(tmp_path / "config.toml", {"adhoc": profile})
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    proc = AgentProcess(config, tmp_path / "agent.log").wait_ready()
    try:
        assert env_reply() == [] and short_emulator.token_requests == 0
        short_emulator.inject("503")
        pairs = env_reply(scope=SCOPES[1])
        assert [name for name, _ in pairs] == ["DCR_WRITE_TOKEN", "DCR_WRITE_TOKEN_EXPIRES_AT"]
        assert pairs[0][1] == get_reply(scope=SCOPES[1])["token"]
        assert short_emulator.token_requests == 2  # the 503, then the retry
        assert "answered HTTP 503" in proc.log()
    finally:
        proc.stop()


def test_env_verb_carries_the_key_warnings_once(
    tmp_path: Path,
    home: Path,
    short_emulator: Emulator,
    ca: pki.Issued,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A profile's key warnings (a nonRepudiation-only certificate) come with its first
    served reply, `env` or `get`, as `warning` fields, and then no more."""
    from mpagent.emulator.pki import write_pkcs12

    signing = pki.make_leaf(ca, usage="nonRepudiation")
    keystore = write_pkcs12(tmp_path / "sign.p12", {"auth": signing}, PASSWORD, [ca.cert])
    config = write_config(tmp_path / "config.toml", {"dev": profile_for(short_emulator, keystore)})
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    proc = AgentProcess(config, tmp_path / "agent.log").wait_ready()
    try:
        first = client.call(paths.socket_path(), "env")
        again = client.call(paths.socket_path(), "env")
        then = client.call(paths.socket_path(), "get", [("scope", SCOPES[0])])
    finally:
        proc.stop()
    warnings = [v for k, v in first if k == "warning"]
    assert warnings and all("nonRepudiation" in w for w in warnings), first
    assert [k for k, _ in first][-len(warnings) :] == ["warning"] * len(warnings)
    assert not [f for f in again + then if f[0] == "warning"]
    assert [v for k, v in again if k == "name"] == [
        FULL,
        f"{FULL}_EXPIRES_AT",
        SHORT,
        f"{SHORT}_EXPIRES_AT",
    ]


# -- the composition root in-process: its clock and its env-file writer ----------------------


def _agent_in_process(tmp_path: Path, emulator: Emulator, p12: Path, clock: object) -> object:
    from mpagent import config as config_module
    from mpagent.agent import Agent

    cfg = config_module.load(write_config(tmp_path / "c.toml", {"dev": profile_for(emulator, p12)}))
    return Agent(cfg, None, clock=clock)  # type: ignore[arg-type]


def test_agent_reads_only_its_injected_clock(
    tmp_path: Path, home: Path, short_emulator: Emulator, p12: Path
) -> None:
    """The agent's uptime and its refresher's times come from the clock it is given."""
    now = [1000.0]
    agent: Any = _agent_in_process(tmp_path, short_emulator, p12, lambda: now[0])
    try:
        now[0] = 1042.5
        assert agent.status()["uptime"] == 42.5
        assert agent.refresher.clock() == 1042.5
    finally:
        agent.fetch_pool.shutdown()
        agent.io.shutdown()


def test_an_unexpected_env_file_failure_is_logged_without_the_tokens(
    tmp_path: Path,
    home: Path,
    short_emulator: Emulator,
    p12: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A write of the env file that fails with something other than OSError is logged (its
    type, not the content) and shown in status, and the writer keeps going."""
    agent: Any = _agent_in_process(tmp_path, short_emulator, p12, time.time)
    agent.env_path = tmp_path / "env\0file"  # os.open: ValueError, embedded null byte
    agent._env_tokens = lambda: [("MASKINPORTEN_TOKEN_X", "secret-token-value", 2e9)]

    async def write_twice() -> None:
        for _ in range(2):
            agent._env_changed()
            await agent._finish_env()

    try:
        with caplog.at_level("ERROR", logger="mpagent"):
            asyncio.run(write_twice())
    finally:
        agent.fetch_pool.shutdown()
        agent.io.shutdown()
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and all("unexpected ValueError" in line for line in said), said
    assert "secret-token-value" not in caplog.text
    assert agent.status()["env_file_error"].endswith(": ValueError")


def test_queued_clients_get_the_config_error_whatever_they_sent(tmp_path: Path, home: Path) -> None:
    """Started by its socket with a broken config, the agent answers each queued client with
    the config error even if it sent half a request or nothing, then exits 78."""
    from mpagent import protocol

    from .test_socket_activation import WRAPPER

    path = Path(paths.socket_path())
    path.parent.mkdir(mode=0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    clients = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    for sock in clients:
        sock.connect(str(path))
        sock.settimeout(10)
    clients[1].sendall(b"mpagent/1 ge")  # no newline
    broken = tmp_path / "broken.toml"
    broken.write_text('[profiles.dev]\nenvironment = "test"\n[agent]\nidle_timeout = "soon"\n')
    fd = listener.fileno()
    proc = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, str(fd), "--config", str(broken), "agent"],
        pass_fds=(fd,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "LISTEN_FDS": "1"},
    )
    try:
        replies = [protocol.read_line(sock.recv, protocol.MAX_REPLY) for sock in clients]
        assert proc.wait(10) == 78
    finally:
        if proc.poll() is None:
            proc.kill()
        for sock in (listener, *clients):
            sock.close()
    for reply in replies:
        with pytest.raises(ConfigError, match=r"\[agent\] idle_timeout is 'soon'"):
            client.parse_reply(reply)
