"""A hostile or broken issuer: redirects that would carry the signed grant elsewhere, absurd
`expires_in` values, a response dripped a byte at a time, an oversized response, and control
characters in what the issuer or a client says. Each hostile behaviour comes from a small raw
socket server written here (real HTTP on loopback, real TLS where it matters); the real CLI and
a real agent run against it as subprocesses."""

from __future__ import annotations

import datetime as dt
import email.utils
import ipaddress
import json
import logging
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from mpagent import client, logs, paths, report
from mpagent import issuer as issuer_module
from mpagent.emulator import Emulator, pki
from mpagent.errors import AgentNotRunning, MpagentError

from ..agentproc import AgentProcess, wait_for
from ..conftest import CLIENT_ID, PASSWORD, SCOPES, profile_for, run_cli, write_config
from ..keystores import write_cert_pem, write_pem
from ..test_cli_get import assert_failed

ENV = {"MPAGENT_KEYSTORE_PASSWORD": PASSWORD}
METADATA = "/.well-known/oauth-authorization-server"
FAKE_TOKEN = "hostile.access.token"  # a well-formed bearer token; nobody verifies it here
# Short HTTP timeouts keep the cases fast: the total deadline of a request is their sum.
HTTP = {"connect_timeout": 1, "read_timeout": 2}
DEADLINE = 3.0
DRIP = 0.5  # seconds between bytes: well inside the 2 s read timeout, so it never fires
GET_WAIT = 10.0  # refresher.GET_WAIT: how long a `get` waits out transient failures
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # every control character but \n


# -- a hostile issuer -----------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One request as the hostile server read it."""

    method: str
    path: str
    body: bytes


@dataclass(frozen=True)
class Reply:
    """A whole HTTP response, sent at once or a byte every `drip` seconds (from the status
    line, or from the body only)."""

    head: bytes
    body: bytes
    drip: float = 0.0
    drip_head: bool = True


def reply(
    status: int,
    body: bytes | str | dict[str, Any] = b"",
    *,
    headers: dict[str, str] | None = None,
    length: bool = True,
    drip: float = 0.0,
    drip_head: bool = True,
) -> Reply:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    data = data.encode() if isinstance(data, str) else data
    lines = [f"HTTP/1.1 {status} Hostile", f"Date: {email.utils.formatdate(usegmt=True)}"]
    lines += ["Content-Type: application/json", "Connection: close"]
    lines += [f"Content-Length: {len(data)}"] if length else []
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return Reply(("\r\n".join(lines) + "\r\n\r\n").encode(), data, drip, drip_head)


def token_reply(expires_in: str = "120", **kwargs: Any) -> Reply:
    """A token answer with `expires_in` as raw JSON text (so 1e400 and NaN can be sent)."""
    body = f'{{"access_token": "{FAKE_TOKEN}", "token_type": "Bearer", "expires_in": {expires_in}}}'
    return reply(200, body, **kwargs)


class Hostile:
    """An issuer on loopback that answers as told: `metadata` for the metadata path (by
    default a document naming itself as issuer and token endpoint), `token` for every other
    request. Records what it was sent. Connection: close, one request per connection."""

    def __init__(
        self,
        token: Callable[[Seen], Reply] = lambda seen: token_reply(),
        *,
        metadata: Callable[[Seen], Reply] | None = None,
        host: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.token, self.tls = token, tls
        self.metadata = metadata or (lambda seen: reply(200, self.document()))
        self.token_endpoint: str | None = None  # what the default metadata names
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.create_server((host, 0))
        self._listener.settimeout(0.1)
        self.host, self.port = host, self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}/"

    def document(self) -> dict[str, str]:
        return {"issuer": self.url, "token_endpoint": self.token_endpoint or self.url + "token"}

    def paths(self) -> list[str]:
        with self._lock:
            return [s.path for s in self.seen]

    def __enter__(self) -> Hostile:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            seen = _read_request(conn)
            with self._lock:
                self.seen.append(seen)
            answer = (self.metadata if seen.path.endswith(METADATA) else self.token)(seen)
            self._send(conn, answer)
        except OSError:
            pass  # the client gave up: that is what some cases are about
        finally:
            conn.close()

    def _send(self, conn: socket.socket, answer: Reply) -> None:
        if not answer.drip:
            conn.sendall(answer.head + answer.body)
            return
        dripped = answer.head + answer.body if answer.drip_head else answer.body
        if not answer.drip_head:
            conn.sendall(answer.head)
        for i in range(len(dripped)):
            if self._stop.wait(answer.drip):
                return
            conn.sendall(dripped[i : i + 1])


def _read_request(conn: socket.socket) -> Seen:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the headers ended")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    length = next(
        (
            int(v)
            for k, _, v in (h.partition(":") for h in lines[1:])
            if k.lower() == "content-length"
        ),
        0,
    )
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return Seen(method, path, body)


# -- TLS: a loopback HTTPS issuer the CLI trusts through REQUESTS_CA_BUNDLE ---------------


@dataclass(frozen=True)
class Tls:
    context: ssl.SSLContext
    ca_file: Path

    @property
    def env(self) -> dict[str, str]:
        return {**ENV, "REQUESTS_CA_BUNDLE": str(self.ca_file)}


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost."""
    ca = pki.make_ca("mpagent hostile-issuer TLS CA")
    key = pki.new_rsa_key()
    now = dt.datetime.now(dt.UTC)
    names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(
        write_cert_pem(folder / "server.pem", [cert]),
        write_pem(folder / "server.key", pki.Issued(key, cert)),
    )
    return Tls(context, write_cert_pem(folder / "ca.pem", [ca.cert]))


# -- running the CLI ------------------------------------------------------------------------


def config_for(path: Path, keystore: Path, *issuers: tuple[str, str, list[str]]) -> Path:
    """A config with one profile (name, issuer URL, scopes) per issuer."""
    profiles = {
        name: {"environment": url, "client_id": CLIENT_ID, "scopes": scopes, "keystore": keystore}
        for name, url, scopes in issuers
    }
    return write_config(path, profiles, http=HTTP)


def get_no_agent(config: Path, *args: str, env: dict[str, str] = ENV, timeout: float = 30):
    command = ("--config", str(config), "get", SCOPES[0], "--no-agent", *args)
    return run_cli(*command, env=env, timeout=timeout)


def timed(run: Callable[[], subprocess.CompletedProcess[str]]) -> tuple[Any, float]:
    """The result (None when it did not end within its timeout) and the seconds it took."""
    started = time.monotonic()
    try:
        result: Any = run()
    except subprocess.TimeoutExpired:
        result = None
    return result, time.monotonic() - started


@pytest.fixture
def agent_for(tmp_path: Path, home: Path) -> Iterator[Callable[[Path], AgentProcess]]:
    started: list[AgentProcess] = []

    def start(config: Path) -> AgentProcess:
        proc = AgentProcess(config, home / "agent.log", env=ENV).wait_ready()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


# -- redirects ------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_token_redirect_is_not_followed(
    scheme: str, tmp_path: Path, home: Path, p12: Path, tls: Tls, report: Any
) -> None:
    """A 307 from the token endpoint (to plain http on another host): exit 75 naming that
    host; the signed grant is never sent there."""
    with Hostile(host="127.0.0.2") as elsewhere:
        location = {"Location": elsewhere.url + "token"}
        context = tls.context if scheme == "https" else None
        with Hostile(lambda seen: reply(307, headers=location), tls=context) as issuer:
            config = config_for(tmp_path / "c.toml", p12, ("dev", issuer.url, [SCOPES[0]]))
            result = get_no_agent(config, env=tls.env)
        report(grants_sent_elsewhere=len(elsewhere.seen), exit=result.returncode)
        assert_failed(result, 75, "redirect", f"{elsewhere.host}:{elsewhere.port}", "not follow")
        assert elsewhere.seen == []
        assert issuer.paths() == [METADATA, "/token"]


def test_https_issuer_may_not_name_a_plain_http_token_endpoint(
    tmp_path: Path, home: Path, p12: Path, tls: Tls, report: Any
) -> None:
    """Metadata of an https issuer naming http://other-host/token: exit 75 "not https";
    nothing is sent to that endpoint."""
    with Hostile(host="127.0.0.2") as elsewhere, Hostile(tls=tls.context) as issuer:
        issuer.token_endpoint = elsewhere.url + "token"
        config = config_for(tmp_path / "c.toml", p12, ("dev", issuer.url, [SCOPES[0]]))
        result = get_no_agent(config, env=tls.env)
    report(grants_sent_elsewhere=len(elsewhere.seen), exit=result.returncode)
    assert_failed(result, 75, elsewhere.url + "token", "not https")
    assert elsewhere.seen == []


@pytest.mark.parametrize(
    ("environment", "endpoint", "allowed"),
    [
        ("https://test.maskinporten.no/", "https://test.maskinporten.no/token", True),
        ("https://issuer.example/", "https://tokens.example/token", True),  # doctor warns
        ("https://issuer.example/", "http://issuer.example/token", False),
        ("https://127.0.0.1:8443/", "http://127.0.0.1:8080/token", False),
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080/token", True),  # the emulator
        ("http://localhost:8080/", "http://[::1]:9/token", True),
        ("http://127.0.0.1:8080/", "http://192.0.2.1/token", False),
        ("http://127.0.0.1:8080/", "ftp://127.0.0.1/token", False),
        ("https://issuer.example/", "https:///token", False),
    ],
)
def test_token_endpoint_policy(environment: str, endpoint: str, allowed: bool) -> None:
    """https always; plain http only from a loopback http issuer to a loopback endpoint."""
    problem = issuer_module.token_endpoint_problem(environment, endpoint)
    assert (problem is None) == allowed, problem


def test_metadata_redirect_to_another_origin_is_not_followed(
    tmp_path: Path, home: Path, p12: Path, report: Any
) -> None:
    """Metadata answered with a redirect to another host: exit 75 naming it; that host,
    which would choose the token endpoint, is never asked."""
    with Hostile(host="127.0.0.2") as elsewhere:
        location = {"Location": elsewhere.url + METADATA.lstrip("/")}
        with Hostile(metadata=lambda seen: reply(302, headers=location)) as issuer:
            config = config_for(tmp_path / "c.toml", p12, ("dev", issuer.url, [SCOPES[0]]))
            result = get_no_agent(config)
    report(requests_elsewhere=len(elsewhere.seen), exit=result.returncode)
    assert_failed(result, 75, "redirect", f"{elsewhere.host}:{elsewhere.port}", METADATA)
    assert elsewhere.seen == []


def test_metadata_redirect_within_the_origin_is_followed(
    tmp_path: Path, home: Path, p12: Path
) -> None:
    """A metadata redirect to another path of the same origin (a moved document) is followed:
    the origin that answers it could name any endpoint anyway."""

    def moved(seen: Seen) -> Reply:
        if seen.path == METADATA:
            return reply(301, headers={"Location": "/moved" + METADATA})
        return reply(200, issuer.document())

    with Hostile(metadata=moved) as issuer:
        config = config_for(tmp_path / "c.toml", p12, ("dev", issuer.url, [SCOPES[0]]))
        result = get_no_agent(config)
    assert (result.returncode, result.stdout) == (0, FAKE_TOKEN + "\n"), result.stderr
    assert issuer.paths() == [METADATA, "/moved" + METADATA, "/token"]


@pytest.mark.parametrize(
    ("endpoint", "row", "code"),
    [
        ("https://localhost:{port}/token", "! metadata reachable", 0),
        ("http://127.0.0.2:{port}/token", "✗ metadata reachable", 75),
    ],
)
def test_doctor_judges_the_token_endpoint(
    endpoint: str, row: str, code: int, tmp_path: Path, home: Path, p12: Path, tls: Tls
) -> None:
    """doctor: a warning (!) when the token endpoint's host is not the issuer's, a failure
    (✗, exit 75) when it is plain http; the row names the endpoint."""
    with Hostile(tls=tls.context) as issuer:
        issuer.token_endpoint = endpoint.format(port=issuer.port)
        config = config_for(tmp_path / "c.toml", p12, ("dev", issuer.url, [SCOPES[0]]))
        result = run_cli("--config", str(config), "doctor", "--no-token", env=tls.env)
    [line] = [line for line in result.stdout.splitlines() if "metadata reachable" in line]
    assert line.startswith(row) and issuer.token_endpoint in line, result.stdout
    assert result.returncode == code, result.stdout + result.stderr


# -- expires_in -----------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["1e400", "Infinity", "-Infinity", "NaN", "-120", "0", '"120"'])
def test_expires_in_must_be_a_positive_finite_number(
    raw: str, tmp_path: Path, home: Path, p12: Path
) -> None:
    """`get --json` with expires_in 1e400, Infinity, NaN, negative, zero or a string: exit
    75, one line naming expires_in, nothing on stdout (no traceback)."""
    with Hostile(lambda seen: token_reply(raw)) as issuer:
        config = config_for(tmp_path / "c.toml", p12, ("dev", issuer.url, [SCOPES[0]]))
        result = get_no_agent(config, "--json")
    assert_failed(result, 75, "expires_in", "not a positive finite number")
    assert "Traceback" not in result.stderr


def test_absurd_expires_in_is_clamped_to_a_day(tmp_path: Path, home: Path, p12: Path) -> None:
    """expires_in of 10^12 s (and a 400-digit integer): served as a day, with a warning that
    names expires_in; exit 0."""
    for raw in ("1000000000000", "9" * 400):
        with Hostile(lambda seen, raw=raw: token_reply(raw)) as issuer:
            config = config_for(tmp_path / "c.toml", p12, ("dev", issuer.url, [SCOPES[0]]))
            result = get_no_agent(config, "--json")
        assert result.returncode == 0, result.stderr
        document = json.loads(result.stdout)
        assert 86_400 - 5 <= document["expires_in"] <= 86_400
        assert "warning" in result.stderr and "expires_in" in result.stderr
        assert "more than a day" in result.stderr


def test_env_file_drops_the_token_when_the_next_answer_is_infinite(
    tmp_path: Path, home: Path, p12: Path, agent_for: Any, report: Any
) -> None:
    """A token of 3 s, then answers with expires_in 1e400: the env file drops the token
    when it expires (it used to keep it: the writer crashed on the infinite time)."""
    answers = iter([token_reply("3")])
    with Hostile(lambda seen: next(answers, token_reply("1e400"))) as issuer:
        config = config_for(tmp_path / "c.toml", p12, ("dev", issuer.url, [SCOPES[0]]))
        proc = agent_for(config)
        env_file = Path(paths.default_env_file())
        wait_for(lambda: env_file.exists() and FAKE_TOKEN in env_file.read_text())
        written = time.time()
        time.sleep(3 + 1.5)
        content = env_file.read_text()
        report(env_file_keeps_expired_token=FAKE_TOKEN in content, issuer_requests=len(issuer.seen))
        assert FAKE_TOKEN not in content, (time.time() - written, content)
        assert "expires_in" in proc.log() and "Traceback" not in proc.log()


# -- a slow drip, an oversized answer -------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest.mark.parametrize("drip_head", [True, False], ids=["headers", "body"])
def test_slow_drip_fails_within_the_deadline(
    drip_head: bool, scheme: str, tmp_path: Path, home: Path, p12: Path, tls: Tls, report: Any
) -> None:
    """A token answer dripped a byte every 0.5 s (the 2 s read timeout never fires), over
    http or TLS: `get --no-agent` fails with 75 after connect_timeout + read_timeout (3 s),
    naming the limit."""
    dripped = token_reply(drip=DRIP, drip_head=drip_head)
    context = tls.context if scheme == "https" else None
    with Hostile(lambda seen: dripped, tls=context) as issuer:
        config = config_for(tmp_path / "c.toml", p12, ("dev", issuer.url, [SCOPES[0]]))
        result, took = timed(lambda: get_no_agent(config, env=tls.env, timeout=20))
    report(held_s=took, exit=result.returncode if result else "killed after 20 s")
    assert result is not None, f"still waiting after {took:.0f} s"
    assert_failed(result, 75, f"within {DEADLINE:g} s", "read_timeout")
    assert took < DEADLINE + 3  # the CLI itself takes about a second to start


def test_slow_drip_through_the_agent_exits_75(
    tmp_path: Path, home: Path, p12: Path, agent_for: Any, report: Any
) -> None:
    """Through the agent, the dripping issuer fails a `get` with 75 (not 69, the client
    giving up after 30 s) once the agent's patience (10 s) and one deadline have passed."""
    with Hostile(lambda seen: token_reply(drip=DRIP)) as issuer:
        config = config_for(tmp_path / "c.toml", p12, ("dev", issuer.url, [SCOPES[0]]))
        agent_for(config)
        result, took = timed(lambda: run_cli("--config", str(config), "get", SCOPES[0], env=ENV))
        report(held_s=took, exit=result.returncode, issuer_requests=len(issuer.seen))
    assert_failed(result, 75, f"within {DEADLINE:g} s")
    assert took < GET_WAIT + DEADLINE + 2


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "until-close"])
def test_token_answer_over_64_kib_is_refused(
    length: bool, tmp_path: Path, home: Path, p12: Path
) -> None:
    """A 100 KiB token answer (with or without Content-Length): exit 75, "more than 64 KiB"."""
    body = {"access_token": "a" * 100 * 1024, "token_type": "Bearer", "expires_in": 120}
    with Hostile(lambda seen: reply(200, body, length=length)) as issuer:
        config = config_for(tmp_path / "c.toml", p12, ("dev", issuer.url, [SCOPES[0]]))
        result = get_no_agent(config)
    assert_failed(result, 75, "more than 64 KiB")


SLOW_SCOPES = [f"slow:scope{i}" for i in range(10)]  # more than the agent's 8 fetch threads
WINDOW = 12.0
LIFETIME = 4  # the good issuer's tokens: a refresh every 2-2.4 s


def test_a_dripping_issuer_does_not_hold_up_another_issuers_refreshes(
    tmp_path: Path, home: Path, p12: Path, ca: pki.Issued, agent_for: Any, report: Any
) -> None:
    """Two profiles on two issuers, one dripping its answers for 10 scopes: the other's gets
    all succeed, the slowest under 0.5 s, and its tokens keep being refreshed."""
    emulator = Emulator(clients={CLIENT_ID: SCOPES}, trust=[ca.cert], token_lifetime=LIFETIME)
    with emulator, Hostile(lambda seen: token_reply(drip=DRIP)) as slow:
        good = profile_for(emulator, p12)
        profiles = [("good", emulator.issuer, good["scopes"]), ("slow", slow.url, SLOW_SCOPES)]
        config = config_for(tmp_path / "c.toml", p12, *profiles)
        agent_for(config)
        wait_for(lambda: emulator.tokens_issued >= 1)
        issued_before = emulator.tokens_issued
        latencies, failures = _get_for(WINDOW, "good", SCOPES[0])
        refreshes = emulator.tokens_issued - issued_before
        report(
            gets=len(latencies),
            failures=len(failures),
            slowest_ms=1000 * max(latencies, default=WINDOW),
            good_refreshes=refreshes,
            slow_requests=len(slow.seen),
        )
    assert failures == [] and max(latencies) < 0.5, (failures[:3], max(latencies, default=0))
    assert refreshes >= int(WINDOW / (LIFETIME * 0.6)) - 1, refreshes  # one every 2-2.4 s


def _get_for(seconds: float, profile: str, scope: str) -> tuple[list[float], list[str]]:
    """`get` over the socket every 50 ms for `seconds`: each one's latency, and the failures."""
    latencies: list[float] = []
    failures: list[str] = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            client.call(paths.socket_path(), "get", [("scope", scope), ("profile", profile)], 5)
        except (MpagentError, AgentNotRunning) as exc:
            failures.append(str(exc))
        latencies.append(time.monotonic() - started)
        time.sleep(0.05)
    return latencies, failures


# -- control characters ---------------------------------------------------------------------

NASTY = "bad\x1b[2J\x1b]0;owned\x07 grant\r\n2038-01-19 mpagent[1] INFO forged\x9b31m"


def assert_escaped(text: str, where: str) -> None:
    """No control character but the line break, and the ESC shown as \\x1b."""
    assert not CONTROL.search(text), (where, CONTROL.findall(text)[:5])
    assert "\\x1b[2J" in text or "\\x1b[31m" in text, (where, text[-2000:])


def test_an_issuers_control_characters_are_escaped_in_log_and_status(
    tmp_path: Path, home: Path, p12: Path, agent_for: Any
) -> None:
    """An error_description with ESC sequences, BEL, CR LF and C1: escaped on stderr, in the
    agent's log and in `status`; `status --json` is JSON (escaped) and keeps the text."""
    refusal = {"error": "invalid_grant", "error_description": NASTY}
    with Hostile(lambda seen: reply(400, refusal)) as issuer:
        config = config_for(tmp_path / "c.toml", p12, ("dev", issuer.url, [SCOPES[0]]))
        proc = agent_for(config)
        result = run_cli("--config", str(config), "get", SCOPES[0], env=ENV)
        assert_failed(result, 77, "\\x1b[2J")
        assert_escaped(result.stderr, "stderr")
        shown = run_cli("--config", str(config), "status", env=ENV)
        raw = run_cli("--config", str(config), "status", "--json", env=ENV)
    assert shown.returncode == 0 and raw.returncode == 0, shown.stderr + raw.stderr
    assert_escaped(shown.stdout, "status")
    assert not CONTROL.search(raw.stdout) and "\\u001b[2J" in raw.stdout
    [token] = json.loads(raw.stdout)["tokens"]
    assert NASTY in token["last_error"]["message"]
    assert_escaped(proc.log(), "log")
    assert not re.search(r"^2038-01-19", proc.log(), re.MULTILINE)  # no forged log line


def test_a_clients_control_characters_are_escaped_in_log_and_status(
    tmp_path: Path, home: Path, emulator: Emulator, p12: Path, agent_for: Any
) -> None:
    """A scope with ESC and C1 asked for on demand (the emulator refuses it, naming it):
    escaped on stderr, in the agent's log and in `status`."""
    config = write_config(tmp_path / "c.toml", {"dev": profile_for(emulator, p12)})
    proc = agent_for(config)
    result = run_cli("--config", str(config), "get", "evil\x1b[31m\x9b", env=ENV)
    assert_failed(result, 77, "evil\\x1b[31m\\x9b")
    shown = run_cli("--config", str(config), "status", env=ENV)
    assert shown.returncode == 0, shown.stderr
    assert_escaped(shown.stdout, "status")
    assert "evil\\x1b[31m" in proc.log()
    assert_escaped(proc.log(), "log")


def test_log_formatter_escapes_the_message_and_keeps_traceback_lines() -> None:
    """The agent's log: one line per record whatever the message holds; a traceback keeps
    its line breaks but not the control characters in it."""
    try:
        raise ValueError("inner\x1b[31m")
    except ValueError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "%s", ("a\x1bb\nc",), None)
        record.exc_info = sys.exc_info()
    for formatter in (logs.PLAIN, logs.JournalFormatter()):
        text = formatter.format(record)
        first, *trace = text.split("\n")
        assert first.endswith("a\\x1bb\\x0ac") and trace[0] == "Traceback (most recent call last):"
        assert "inner\\x1b[31m" in text and not CONTROL.search(text)


def test_status_rendering_escapes_every_field() -> None:
    """report.status: profile problems, reload errors, warnings, scopes and token errors
    shown with their control characters escaped, one line each."""
    doc = {
        "pid": 1,
        "uptime": 2.0,
        "version": "0",
        "socket": "/s",
        "env_file": "/e",
        "config": "/c\x1b",
        "reload_error": "r\x1b[1m",
        "profiles": {"p": "broken\r\nforged"},
        "warnings": {"w": "certificate\x9b"},
        "tokens": [
            {
                "profile": "dev",
                "scope": "s\x1b[31m",
                "expires_at": None,
                "next_refresh": None,
                "refreshes": 0,
                "last_error": {"message": NASTY},
            }
        ],
    }
    text = report.status(doc, now=0.0)
    assert not CONTROL.search(text)
    assert "broken\\x0d\\x0aforged" in text and "s\\x1b[31m" in text and "\\x1b[2J" in text
    assert len(text.splitlines()) == 10
