"""Talking to Maskinporten: metadata discovery, the token request, and error classification.

The only module that imports requests. 4xx answers become IssuerRejected (never retried);
timeouts, connection errors, 5xx, 429, redirects and bodies that are not the expected JSON
become IssuerUnavailable (retried with backoff by the agent).

An issuer is not trusted with more than its answers: the signed grant goes only to an https
token endpoint (plain http only between loopback hosts, for the emulator) and never follows a
redirect; each request has a total deadline and a size limit, however slowly it is answered.
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
import json
import logging
import math
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import requests
import requests.adapters
import urllib3.exceptions

from mpagent.config import ENVIRONMENTS, is_loopback
from mpagent.errors import IssuerRejected, IssuerUnavailable
from mpagent.tokens import Token

log = logging.getLogger(__name__)
E = TypeVar("E", bound=BaseException)

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
METADATA_PATH = ".well-known/oauth-authorization-server"
# Digdir documents Skyporten's metadata at the OpenID path ("Open https://test.sky.maskinporten.no
# /.well-known/openid-configuration", docs.digdir.no maskinporten_skyporten_aws), not RFC 8414's.
OPENID_METADATA_PATH = ".well-known/openid-configuration"
_METADATA_PATHS = {"sky-test": OPENID_METADATA_PATH, "sky": OPENID_METADATA_PATH}
SKEW_WARNING = 5.0  # Maskinporten allows 10 s; warn at half of that.
SKEW_ALLOWED = 10.0
# Environments whose clock skew has been logged: once per process, not once per response.
_skew_warned: set[str] = set()
# A token answer is under 2 KiB, the metadata under 4 KiB: more is not Maskinporten.
MAX_ANSWER = 64 * 1024
# Production lifetimes are 120 s to a few hours (MASKINPORTEN.md §7); a longer one is a
# broken or hostile issuer, and a token kept that long outlives any revocation.
MAX_LIFETIME = 86_400
METADATA_REDIRECTS = 3
_MP_CODE = re.compile(r"(MP-\d+)")
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


@dataclass(frozen=True)
class Endpoints:
    issuer: str  # the grant's `aud`
    token_endpoint: str


@dataclass(frozen=True)
class Answer:
    """One HTTP answer, read whole within its request's deadline."""

    url: str
    status: int
    reason: str
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)  # ValueError if it is not JSON


class Issuer:
    """One HTTP session towards one Maskinporten environment."""

    def __init__(
        self,
        environment: str,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.environment = environment
        self.timeout = (connect_timeout, read_timeout)  # a whole request: one of each (send)
        self.clock = clock
        self.session = new_session()
        self.skew: float | None = None  # issuer clock minus ours, from the last Date header
        self._endpoints: Endpoints | None = None

    @property
    def url(self) -> str:
        """The issuer's URL, as configured (`test` and `prod` spelled out)."""
        return ENVIRONMENTS.get(self.environment, self.environment)

    def endpoints(self) -> Endpoints:
        if self._endpoints is None:
            self._endpoints = self._discover()
        return self._endpoints

    def metadata_url(self) -> str:
        return self.url.rstrip("/") + "/" + _METADATA_PATHS.get(self.environment, METADATA_PATH)

    def metadata(self) -> dict[str, Any]:
        """The RFC 8414 metadata document; also notes the clock skew from its Date header."""
        sent_at = self.clock()
        answer = self._get_metadata(self.metadata_url())
        self._note_skew(answer, sent_at)
        return self._json(answer)

    def _get_metadata(self, url: str) -> Answer:
        """GET the metadata, following a redirect only within the issuer's own origin: the
        document says where the grants go, so no other host may answer it. (Maskinporten
        answers the RFC 8414 URL directly; a same-origin redirect changes no trust.)"""
        for _ in range(METADATA_REDIRECTS + 1):
            answer = self._send("GET", url)
            target = redirect_target(answer)
            if target is None:
                return answer
            if _origin(target) != _origin(url):
                raise IssuerUnavailable(
                    f"{redirected(answer, target)}; mpagent follows a redirect of the metadata "
                    "only within the issuer's origin (the metadata says where the grants go); "
                    "check `environment`"
                )
            url = target
        raise IssuerUnavailable(
            f"{url} redirects more than {METADATA_REDIRECTS} times; check `environment`"
        )

    def _discover(self) -> Endpoints:
        if self.environment in ENVIRONMENTS:  # known: no request needed
            issuer = ENVIRONMENTS[self.environment]  # the aud exactly, slash or none
            return Endpoints(issuer=issuer, token_endpoint=issuer.rstrip("/") + "/token")
        return endpoints_from(self.metadata(), self.url, self.metadata_url())

    def request_token(self, assertion: str) -> Token:
        endpoint = self.endpoints().token_endpoint
        requested_at = self.clock()
        answer = self._send(
            "POST", endpoint, data={"grant_type": JWT_BEARER, "assertion": assertion}
        )
        self._note_skew(answer, requested_at)
        target = redirect_target(answer)
        if target is not None:
            raise IssuerUnavailable(
                f"{redirected(answer, target)}; mpagent does not follow redirects of the token "
                "request (that would send the signed grant there); behind a captive portal "
                "(guest Wi-Fi), log in to it, else check `environment`"
            )
        if 400 <= answer.status < 500 and answer.status != 429:
            raise rejection(answer, self.skew)
        body = self._json(answer)
        return parse_token(body, requested_at, endpoint)

    def _send(self, method: str, url: str, **kwargs: Any) -> Answer:
        answer = send(self.session, method, url, self.timeout, **kwargs)
        if answer.status == 429 or answer.status >= 500:
            raise IssuerUnavailable(
                f"{url} answered HTTP {answer.status}; Maskinporten is failing, will retry"
            )
        return answer

    def _json(self, answer: Answer) -> dict[str, Any]:
        try:
            body = answer.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise IssuerUnavailable(
                f"{answer.url} answered HTTP {answer.status} with a body that is not a JSON object"
            )
        return body

    def _note_skew(self, answer: Answer, sent_at: float) -> None:
        skew = skew_from_date(answer.headers.get("Date"), sent_at, self.clock())
        if skew is None:
            return
        self.skew = skew
        if abs(skew) <= SKEW_WARNING + 0.5:
            _skew_warned.discard(self.environment)  # in step again: warn anew if it drifts
        elif self.environment not in _skew_warned:
            _skew_warned.add(self.environment)
            log.warning("%s (it allows %g s)", clock_hint(skew), SKEW_ALLOWED)


def new_session() -> requests.Session:
    """A session whose requests a Deadline can end, however slowly they are answered."""
    session = requests.Session()
    session.headers["User-Agent"] = "mpagent"
    for prefix in ("https://", "http://"):
        session.mount(prefix, _DeadlineAdapter())
    return session


def send(
    session: requests.Session,
    method: str,
    url: str,
    timeout: tuple[float, float],
    *,
    setting: str = "`environment`",
    expected: str = "Maskinporten's answers are a few KiB",
    prefix: str = "",
    details: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Answer:
    """One request (Maskinporten, Digdir's admin API, Altinn's exchange), its answer read
    whole within connect + read timeout (per-read timeouts cannot bound an answer that comes
    a byte at a time: each byte restarts them) and MAX_ANSWER bytes; a redirect is returned,
    never followed. A failure to get an answer is IssuerUnavailable, `prefix` + what went
    wrong, naming `setting` (where the URL comes from) and carrying `details`."""
    extra = dict(details or {})
    deadline = Deadline(sum(timeout))
    try:
        with deadline:
            response = session.request(
                method, url, timeout=timeout, allow_redirects=False, stream=True, **kwargs
            )
            with response:
                too_big = IssuerUnavailable(
                    f"{prefix}{url} answered with more than {MAX_ANSWER // 1024} KiB "
                    f"({expected}); check {setting}",
                    **extra,
                )
                body = read_limited(response, too_big)
    except requests.RequestException as exc:
        if deadline.expired:
            raise IssuerUnavailable(
                f"{prefix}{url} did not send its whole answer within {sum(timeout):g} s "
                "(connect_timeout + read_timeout); try again, or raise [http] read_timeout",
                **extra,
            ) from exc
        cause = unreachable(exc, url, timeout).replace("`environment`", setting)
        raise IssuerUnavailable(f"{prefix}{cause}", **extra) from exc
    return Answer(url, response.status_code, response.reason or "", response.headers, body)


def read_limited(response: requests.Response, too_big: Exception) -> bytes:
    """The body, at most MAX_ANSWER bytes; `too_big` is raised for a longer one (each caller
    says what it expected and which setting to check)."""
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > MAX_ANSWER:
        raise too_big
    body = bytearray()
    for chunk in response.iter_content(16 * 1024):
        body += chunk
        if len(body) > MAX_ANSWER:
            raise too_big
    return bytes(body)


# -- where the grant may go ------------------------------------------------------------------


def endpoints_from(document: dict[str, Any], environment: str, url: str) -> Endpoints:
    """The endpoints a metadata document (fetched from `url`) names, if the grant may go
    to its token endpoint."""
    issuer, endpoint = document.get("issuer"), document.get("token_endpoint")
    if not isinstance(issuer, str) or not isinstance(endpoint, str):
        raise IssuerUnavailable(
            f"metadata at {url} lacks issuer or token_endpoint; is {environment} a Maskinporten issuer?"
        )
    problem = token_endpoint_problem(environment, endpoint)
    if problem:
        raise IssuerUnavailable(
            f"metadata at {url} names the token endpoint {endpoint}, which is {problem}; "
            "check `environment`"
        )
    return Endpoints(issuer=issuer, token_endpoint=endpoint)


def token_endpoint_problem(environment: str, endpoint: str) -> str | None:
    """Why the signed grant must not be sent to `endpoint` (None: it may). It must be https;
    plain http only from an issuer that is itself a loopback http URL (the emulator) to a
    loopback host, where nobody can read or change it on the way."""
    issuer, target = urllib.parse.urlsplit(environment), urllib.parse.urlsplit(endpoint)
    if not target.hostname:
        return "not a URL with a host"
    if target.scheme == "https":
        return None
    local = issuer.scheme == "http" and is_loopback(issuer.hostname or "")
    if target.scheme == "http" and local and is_loopback(target.hostname):
        return None
    return (
        "not https: the signed grant goes over https only (plain http only between loopback hosts)"
    )


def other_host(environment: str, endpoint: str) -> str | None:
    """The token endpoint's host when it is not the issuer's (doctor warns), else None."""
    host = urllib.parse.urlsplit(endpoint).hostname
    return host if host != urllib.parse.urlsplit(environment).hostname else None


def redirect_target(answer: Answer) -> str | None:
    """Where a 3xx answer points ("" without a Location), None for any other answer."""
    if not 300 <= answer.status < 400:
        return None
    location = answer.headers.get("Location")
    return urllib.parse.urljoin(answer.url, location) if location else ""


def redirected(answer: Answer, target: str) -> str:
    where = _origin(target) or "nowhere (no Location header)"
    return f"{answer.url} answered HTTP {answer.status}, a redirect to {where}"


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""


# -- the total deadline ----------------------------------------------------------------------

_current = threading.local()  # the Deadline of the request this thread is making


class Deadline:
    """Ends one request (connection, TLS handshake, headers and body) after `seconds`,
    however slowly the server sends: at the deadline a timer shuts the request's socket
    down, which wakes the read blocked on it. Used as a context manager around the request
    on the thread that makes it; the session's connections report their sockets to it."""

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> Deadline:
        _current.deadline = self
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        _current.deadline = None
        with self._lock:
            self._sock = None  # kept alive in the pool, it is no longer ours to end

    def watch(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            if self.expired:
                _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            _shut(self._sock)


def _shut(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            # socket.socket's own shutdown, also for an SSLSocket: the TLS layer is not
            # thread-safe, the file descriptor is.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _watch(sock: socket.socket | None) -> None:
    deadline: Deadline | None = getattr(_current, "deadline", None)
    if deadline is not None:
        deadline.watch(sock)


class _DeadlineAdapter(requests.adapters.HTTPAdapter):
    """Gives every connection pool it uses (direct, through a proxy, SOCKS) a connection
    class that reports its socket to the current Deadline."""

    def get_connection_with_tls_context(self, *args: Any, **kwargs: Any) -> Any:
        return _watched(super().get_connection_with_tls_context(*args, **kwargs))

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:  # requests < 2.32.2 uses it
        return _watched(super().get_connection(*args, **kwargs))


def _watched(pool: Any) -> Any:
    if not getattr(pool.ConnectionCls, "reports_to_deadline", False):
        pool.ConnectionCls = _watched_class(pool.ConnectionCls)
    return pool


@functools.cache
def _watched_class(base: Any) -> Any:
    """`base` (a urllib3 connection class) reporting its socket when it is made (so the
    handshake is covered) and whenever it waits for an answer (a reused connection)."""

    class Watched(base):
        reports_to_deadline = True

        def _new_conn(self) -> Any:
            sock = super()._new_conn()
            _watch(sock)
            return sock

        def getresponse(self, *args: Any, **kwargs: Any) -> Any:
            _watch(self.sock)
            return super().getresponse(*args, **kwargs)

    Watched.__name__ = Watched.__qualname__ = f"Watched{base.__name__}"
    return Watched


def clock_hint(skew: float) -> str:
    """How far off this machine's clock is (skew = issuer's clock minus ours), and the fix."""
    side = "behind" if skew > 0 else "ahead of"
    return (
        f"this machine's clock is {abs(skew):.0f} s {side} Maskinporten's; "
        "fix the system clock (enable NTP, e.g. `timedatectl set-ntp true`)"
    )


def unreachable(exc: requests.RequestException, url: str, timeout: tuple[float, float]) -> str:
    """What requests' exception means, for a person: DNS, refused, TLS, timeout or other."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or url
    port = parts.port or (443 if parts.scheme == "https" else 80)
    causes = list(_causes(exc))
    if isinstance(exc, requests.ConnectTimeout):
        return (
            f"cannot reach {url}: connecting to {host}:{port} timed out after {timeout[0]:g} s; "
            "check the network, or raise [http] connect_timeout"
        )
    # A read that times out in the body comes wrapped in a ConnectionError.
    if isinstance(exc, requests.Timeout) or _first(causes, urllib3.exceptions.ReadTimeoutError):
        return (
            f"{url} did not answer: timed out after {timeout[1]:g} s; "
            "try again, or raise [http] read_timeout"
        )
    if dns := _first(causes, socket.gaierror):
        return (
            f"cannot reach {url}: cannot resolve {host} ({dns.strerror}); "
            "check the network (DNS) and `environment`"
        )
    if _first(causes, ConnectionRefusedError):
        return f"cannot reach {url}: connection refused by {host}:{port}; check `environment`"
    if untrusted := _first(causes, ssl.SSLCertVerificationError):
        return (
            f"cannot reach {url}: TLS certificate of {host} not trusted: "
            f"{untrusted.verify_message or untrusted.reason}; if a proxy inspects TLS, set "
            "REQUESTS_CA_BUNDLE to a file with its CA certificate"
        )
    if tls := _first(causes, ssl.SSLError):
        return (
            f"cannot reach {url}: TLS with {host} failed ({tls.reason or tls}); check "
            "`environment` (http or https?)"
        )
    if closed := _first(causes, ConnectionError):  # the builtin: reset, or closed (http.client)
        return (
            f"cannot reach {url}: {host} closed the connection without an answer "
            f"({closed.strerror or closed}); try again"
        )
    strerror = next((c.strerror for c in causes if isinstance(c, OSError) and c.strerror), None)
    return f"cannot reach {url}: {strerror or causes[-1]}; check the network and `environment`"


def _first(causes: list[BaseException], kind: type[E]) -> E | None:
    return next((c for c in causes if isinstance(c, kind)), None)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """exc and what it wraps: requests and urllib3 nest the OS error in args and `reason`."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        inner = [getattr(current, "reason", None), current.__cause__, current.__context__]
        inner += current.args
        todo += [e for e in inner if isinstance(e, BaseException)]


def skew_from_date(date: str | None, sent: float, received: float) -> float | None:
    """The issuer's clock minus ours: its Date header (one-second resolution) against the
    middle of the round trip."""
    if not date:
        return None
    try:
        theirs = email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return None
    return theirs - (sent + received) / 2


def parse_token(body: dict[str, Any], requested_at: float, url: str) -> Token:
    access_token, expires_in = body.get("access_token"), body.get("expires_in")
    if not isinstance(access_token, str) or not access_token:
        raise IssuerUnavailable(f"{url} answered without an access_token")
    if not _B64TOKEN.fullmatch(access_token):
        # RFC 6750 b64token: anything else could break the socket protocol or the env file.
        raise IssuerUnavailable(f"{url} answered with an access_token that is not a bearer token")
    return Token(
        access_token=access_token,
        token_type=str(body.get("token_type") or "Bearer"),
        scope=str(body.get("scope") or ""),
        requested_at=requested_at,
        expires_at=requested_at + lifetime(expires_in, url),
    )


def lifetime(expires_in: object, url: str) -> float:
    """`expires_in` in seconds: a positive finite number (JSON allows 1e400, which is
    infinite, and Python's parser NaN and Infinity), at most MAX_LIFETIME."""
    number = expires_in if isinstance(expires_in, int | float) else None
    if isinstance(expires_in, bool) or number is None or not number > 0 or not _finite(number):
        shown = repr(expires_in)
        shown = shown if len(shown) <= 24 else shown[:20] + "…"
        raise IssuerUnavailable(
            f"{url} answered with expires_in = {shown}, not a positive finite number of "
            "seconds; the issuer is broken, will retry"
        )
    if number > MAX_LIFETIME:
        log.warning(
            "%s answered with expires_in of more than a day; the token is used for %d s only",
            url,
            MAX_LIFETIME,
        )
        return float(MAX_LIFETIME)
    return float(number)


def _finite(number: float) -> bool:
    return isinstance(number, int) or math.isfinite(number)  # an int of 400 digits is finite


def rejection(answer: Answer, skew: float | None = None) -> IssuerRejected:
    """Maskinporten's error JSON as an IssuerRejected, its description shown verbatim; `skew`
    (from the Date header) says how far off the clock is when that is the likely cause."""
    try:
        body = answer.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    error = str(body.get("error") or f"http_{answer.status}")
    description = str(body.get("error_description") or answer.reason or "no description")
    found = _MP_CODE.search(str(body.get("error_uri") or "")) or _MP_CODE.search(description)
    mp_code = found.group(1) if found else None
    code = f" [{mp_code}]" if mp_code else ""
    hint = hint_for(mp_code, error, description, skew)
    return IssuerRejected(
        f"Maskinporten refused the grant: {error}{code}: {description}"
        + (f" — {hint}" if hint else ""),
        error=error,
        error_description=description,
        mp_code=mp_code,
        status=answer.status,
    )


HINTS = {
    "MP-100": "check client_id and that the client belongs to this environment (test vs prod)",
    "MP-110": "the grant's aud must be the issuer; check `environment`",
    "MP-120": "check the certificate: test certificates work only in test, production ones only in prod; "
    "it must be valid; if it lacks key usage digitalSignature, try the authentication certificate",
    # Keys live one year from upload; posting the same key again renews it (Digdir). The
    # profile is filled in by whoever knows it (exchange, doctor); else it reads as a slot.
    "MP-121": "the registered key expired (keys live one year from upload); renew it: "
    "mpagent keys renew --profile <profile>, and set auto_renew = true to have the agent do it",
    "MP-122": "the certificate belongs to another organisation than the client",
    "MP-124": "the signature does not match: wrong alias or key",
    "MP-130": "the grant expired on arrival; check the local clock (NTP)",
    "MP-012": "a grant was reused; this is a bug, please report it",
    "MP-200": "register the scope on the client in Digdir's self-service portal",
    "MP-201": "the scope is not available to Maskinporten clients (wrong integration type)",
    "MP-250": "the API owner has not granted your organisation this scope",
    "MP-251": "the customer (consumer_org) has not delegated the access to you in Altinn",
    "invalid_scope": "register the scope on the client in Digdir's self-service portal",
}
# Refusals without an MP code, recognised by their description.
HINTS_BY_TEXT = {
    "Issue time is after now": "this machine's clock is ahead of Maskinporten's; enable NTP",
    "Unknown key identifier": (
        "register the key's public JWK on the client (`mpagent keys list` shows what is "
        "registered), or correct `kid`; a key registered in the last minutes may not have "
        "reached Maskinporten yet: wait, then `mpagent refresh`"
    ),
    "requires pre-registered jwk": "the client has registered keys: set `kid` to one of them",
}


# Refusals that mean the grant's iat/exp disagree with Maskinporten's clock.
CLOCK_CODES = ("MP-130",)
CLOCK_TEXTS = ("Issue time is after now", "JWT is expired")


def hint_for(
    mp_code: str | None, error: str | None, description: str, skew: float | None = None
) -> str:
    """The next step for a refusal: the clock when it is off by more than Maskinporten allows
    or the refusal is about time, else by MP code, by description, by error."""
    about_time = mp_code in CLOCK_CODES or any(text in description for text in CLOCK_TEXTS)
    if skew is not None and (abs(skew) > SKEW_ALLOWED or (about_time and abs(skew) >= 1)):
        return clock_hint(skew)
    if mp_code in HINTS:
        return HINTS[mp_code]
    for text, hint in HINTS_BY_TEXT.items():
        if text in description:
            return hint
    return HINTS.get(error or "", "")
