"""A local Maskinporten emulator: real HTTP on loopback, enforcing the grant rules of
MASKINPORTEN.md §2-§4 (see `rules`) with Maskinporten's error shape, codes and texts.

For development and CI only: it issues tokens signed by a throwaway key generated at start-up.
`Emulator` holds the state (seen jtis, injected and random faults, counters) and `_Handler` only
speaks HTTP.
"""

from __future__ import annotations

import base64
import collections
import email.utils
import hashlib
import json
import logging
import random
import secrets
import socketserver
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

import mpagent.emulator.rules as rules
from mpagent.errors import ConfigError

log = logging.getLogger("mpagent.emulator")  # the package's name: bench and tests listen to it

METADATA_PATH = "/.well-known/oauth-authorization-server"
MAX_BODY = 1 << 20
FAULTS = ("503", "hang", "garbage", "drop")


class Emulator:
    """Maskinporten on loopback. Binds at construction (so `issuer` is known), serves after
    `start()` or `serve_forever()`, and runs once: after `stop()` it is done.

    Access tokens live `lifetimes[client_id]` seconds, else `token_lifetime`, as production
    gives each client its registered access_token_lifetime.

    Faults: `inject()` queues them; once the queue is empty, each POST /token fails with
    probability `fail_ratio`, its kind drawn uniformly from FAULTS by `random.Random(seed)`.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clients: Mapping[str, Iterable[str]] | Iterable[tuple[str, Iterable[str]]] = (),
        trust: Iterable[x509.Certificate] = (),
        jwks: Mapping[str, RSAPublicKey] | Iterable[tuple[str, RSAPublicKey]] = (),
        token_lifetime: int = rules.DEFAULT_TOKEN_LIFETIME,
        lifetimes: Mapping[str, int] | None = None,
        clock_offset: float = 0.0,
        hang_seconds: float = 30.0,
        fail_ratio: float = 0.0,
        seed: int | None = None,
    ) -> None:
        if not 0.0 <= fail_ratio <= 1.0:
            raise ValueError(f"fail_ratio {fail_ratio} must be between 0 and 1")
        self.clients = {
            cid: frozenset(s.split() if isinstance(s, str) else s)
            for cid, s in dict(clients).items()
        }
        self.trust = list(trust)
        self.jwks = dict(jwks)
        self.token_lifetime = token_lifetime
        self.lifetimes = dict(lifetimes or {})
        self.clock_offset = clock_offset
        self.hang_seconds = hang_seconds
        self.fail_ratio = fail_ratio
        # Fault injection for soak tests, not security: a seeded PRNG makes a run repeatable.
        self._random = random.Random(seed)  # noqa: S311
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        der = self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self._kid = base64.urlsafe_b64encode(hashlib.sha256(der).digest()[:12]).decode()
        self._lock = threading.Lock()
        self._faults: collections.deque[str] = collections.deque()
        self._seen: dict[str, float] = {}  # jti -> grant exp, pruned once passed
        self._requests = 0
        self._issued = 0
        self._served = dict.fromkeys(FAULTS, 0)
        self._stopping = threading.Event()
        self._serving = False
        self._thread: threading.Thread | None = None
        self._server = _Server((host, port), _Handler)
        self._server.emulator = self
        self._host = host

    @property
    def issuer(self) -> str:
        return f"http://{self._host}:{self._server.server_address[1]}/"

    @property
    def token_endpoint(self) -> str:
        return self.issuer + "token"

    @property
    def token_requests(self) -> int:
        with self._lock:
            return self._requests

    @property
    def tokens_issued(self) -> int:
        with self._lock:
            return self._issued

    @property
    def faults_served(self) -> dict[str, int]:
        """Faults served so far, injected and random, by kind (a snapshot)."""
        with self._lock:
            return dict(self._served)

    def now(self) -> float:
        return time.time() + self.clock_offset

    # -- lifecycle

    def start(self) -> Emulator:
        self._serving = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="mpagent-emulator", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._serving = True
        try:
            self._server.serve_forever(0.05)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def stop(self) -> None:
        self._stopping.set()  # wakes hanging requests
        serving, self._serving = self._serving, False
        if serving:
            self._server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server.server_close()

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults

    def inject(self, fault: str, count: int = 1) -> None:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; choose one of {', '.join(FAULTS)}")
        with self._lock:
            self._faults.extend([fault] * count)

    def _next_fault(self) -> str | None:
        """Counts a POST /token and picks its fault: the next injected, else maybe a random one."""
        with self._lock:
            self._requests += 1
            if self._faults:
                fault = self._faults.popleft()
            elif self.fail_ratio and self._random.random() < self.fail_ratio:
                fault = self._random.choice(FAULTS)
            else:
                return None
            self._served[fault] += 1
            return fault

    # -- documents

    def metadata(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "token_endpoint": self.token_endpoint,
            "jwks_uri": self.issuer + "jwk",
            "token_endpoint_auth_signing_alg_values_supported": list(rules.ALGORITHMS),
            "grant_types_supported": [rules.JWT_BEARER],
            "authorization_details_types_supported": list(rules.AUTHORIZATION_DETAIL_FIELDS),
        }

    def jwks_document(self) -> dict[str, Any]:
        jwk: dict[str, Any] = dict(
            jwt.algorithms.RSAAlgorithm.to_jwk(self._key.public_key(), as_dict=True)
        )
        jwk.update(kid=self._kid, alg="RS256", use="sig")
        return {"keys": [jwk]}

    # -- the token endpoint

    def handle_token(self, content_type: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """The status and JSON body answering one POST /token (faults aside)."""
        try:
            response = self._issue(rules.parse_form(content_type, body))
        except rules.Rejection as rejection:
            log.info("token request rejected: %s %s", rejection.code or "-", rejection.description)
            return 400, rejection.body(trace_id=secrets.token_hex(16))
        return 200, response

    def _issue(self, assertion: str) -> dict[str, Any]:
        now = self.now()
        grant, org = rules.validate_grant(
            assertion,
            issuer=self.issuer,
            clients=self.clients,
            jwks=self.jwks,
            trust=self.trust,
            now=now,
        )
        replay_key = grant.get("jti") or hashlib.sha256(assertion.encode()).hexdigest()
        self._remember(replay_key, grant["exp"], now)
        for warning in rules.grant_warnings(grant):
            log.warning("grant from client %s: %s", grant["iss"], warning)
        lifetime = self.lifetimes.get(grant["iss"], self.token_lifetime)
        claims = rules.access_token_claims(
            grant, issuer=self.issuer, org=org, now=now, lifetime=lifetime, jti=str(uuid.uuid4())
        )
        token = jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self._kid})
        with self._lock:
            self._issued += 1
        log.info("token issued to client %s for scope %s", grant["iss"], grant["scope"])
        return {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": lifetime,
            "scope": grant["scope"],
        }

    def _remember(self, jti: str, exp: float, now: float) -> None:
        with self._lock:
            if jti in self._seen:
                raise rules.Rejection("invalid_grant", "Grant is used before", "MP-012")
            self._seen = {j: e for j, e in self._seen.items() if e > now}
            self._seen[jti] = exp

    # -- CLI

    @classmethod
    def from_files(
        cls,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clients: Sequence[str] = (),
        trust: Sequence[Path | str] = (),
        jwks: Sequence[str] = (),
        token_lifetime: int = rules.DEFAULT_TOKEN_LIFETIME,
    ) -> Emulator:
        """An emulator from CLI-style arguments; bad input raises ConfigError naming it."""
        _check_lifetime(token_lifetime, f"--token-lifetime {token_lifetime}")
        parsed = [_parse_client(spec) for spec in clients]
        registered = {client_id: scopes for client_id, scopes, _ in parsed}
        lifetimes = {client_id: life for client_id, _, life in parsed if life is not None}
        anchors = [cert for path in trust for cert in _load_trust(Path(path))]
        keys = dict(_load_jwk(spec) for spec in jwks)
        try:
            return cls(
                host=host,
                port=port,
                clients=registered,
                trust=anchors,
                jwks=keys,
                token_lifetime=token_lifetime,
                lifetimes=lifetimes,
            )
        except OSError as exc:
            raise ConfigError(
                f"--host/--port: cannot listen on {host}:{port} ({exc.strerror or exc}); "
                "choose another address or port 0 for any free port"
            ) from exc


CLIENT_SYNTAX = "CLIENT_ID=SCOPE[,SCOPE...][;lifetime=SECONDS]"


def _parse_client(spec: str) -> tuple[str, list[str], int | None]:
    """`ID=a:read,a:write;lifetime=3599`: the client, its scopes and its own token lifetime."""
    head, *options = spec.split(";")
    client_id, _, scopes = head.partition("=")
    names = [s.strip() for s in scopes.split(",") if s.strip()]
    if not client_id.strip() or not names:
        raise ConfigError(f"--client {spec!r}: expected {CLIENT_SYNTAX}")
    lifetime: int | None = None
    for option in options:
        key, _, value = (part.strip() for part in option.partition("="))
        if key != "lifetime" or lifetime is not None:
            what = "lifetime is given twice" if key == "lifetime" else f"unknown option {key!r}"
            raise ConfigError(f"--client {spec!r}: {what}; expected {CLIENT_SYNTAX}")
        if not (value.isascii() and value.isdigit()):
            raise ConfigError(
                f"--client {spec!r}: lifetime {value!r} is not a whole number of seconds"
            )
        lifetime = int(value)
        _check_lifetime(lifetime, f"--client {spec!r}: lifetime {lifetime}")
    return client_id.strip(), names, lifetime


def _check_lifetime(seconds: int, named: str) -> None:
    if seconds < 1:
        raise ConfigError(f"{named}: must be at least 1 second")
    if seconds > rules.MAX_TOKEN_LIFETIME:
        raise ConfigError(
            f"{named}: Maskinporten gives a client at most {rules.MAX_TOKEN_LIFETIME} s "
            f"(2 hours); use {rules.MAX_TOKEN_LIFETIME} or less"
        )


def _load_trust(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"--trust {path}: cannot read ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise ConfigError(f"--trust {path}: holds no PEM certificate") from exc


def _load_jwk(spec: str) -> tuple[str, RSAPublicKey]:
    kid, _, name = spec.partition("=")
    if not kid.strip() or not name:
        raise ConfigError(f"--jwk {spec!r}: expected KID=public-key.pem")
    try:
        key = serialization.load_pem_public_key(Path(name).read_bytes())
    except OSError as exc:
        raise ConfigError(f"--jwk {spec!r}: cannot read {name} ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise ConfigError(
            f"--jwk {spec!r}: {name} is not a PEM public key (openssl rsa -pubout makes one)"
        ) from exc
    if not isinstance(key, RSAPublicKey):
        raise ConfigError(f"--jwk {spec!r}: {name} is not an RSA key")
    return kid.strip(), key


# -- HTTP -----------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() must not wait for a hanging or idle connection
    request_queue_size = 64  # the default 5 drops SYNs under a burst: a 1 s client stall
    emulator: Emulator

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn), slow on some hosts.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 30  # an idle connection must not pin a thread forever

    def do_GET(self) -> None:
        path = self.path.partition("?")[0]
        if path == METADATA_PATH:
            self._send_json(200, self.server.emulator.metadata())
        elif path == "/jwk":
            self._send_json(200, self.server.emulator.jwks_document())
        else:
            self._send_json(404, {"error": "not_found"})

    def do_POST(self) -> None:
        if self.path.partition("?")[0] != "/token":
            self._send_json(404, {"error": "not_found"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self._send_json(413, {"error": "invalid_request"})
            return
        body = self.rfile.read(length)
        emulator = self.server.emulator
        fault = emulator._next_fault()
        if fault is not None:
            self._fault(fault)
            return
        try:
            status, payload = emulator.handle_token(self.headers.get_content_type(), body)
        except Exception:  # connection boundary: answer 500 rather than drop, and say why
            log.exception("token request failed inside the emulator")
            status, payload = 500, {"error": "server_error"}
        self._send_json(status, payload)

    def _fault(self, fault: str) -> None:
        log.info("injected fault: %s", fault)
        if fault == "503":
            self._send(503, b"<html><body>503 Service Unavailable</body></html>\n", "text/html")
        elif fault == "garbage":
            self._send(200, b"<html><body>Maintenance</body></html>\n", "text/html")
        elif fault == "hang":
            self.server.emulator._stopping.wait(self.server.emulator.hang_seconds)
        self.close_connection = True  # "hang" and "drop" end here without a response

    def _send_json(self, status: int, payload: Mapping[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json;charset=UTF-8")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def date_time_string(self, timestamp: float | None = None) -> str:
        when = self.server.emulator.now() if timestamp is None else timestamp
        return email.utils.formatdate(when, usegmt=True)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet; request lines could carry secrets in a query string
