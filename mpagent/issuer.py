"""Talking to Maskinporten: metadata discovery, the token request, and error classification.

The only module that imports requests. 4xx answers become IssuerRejected (never retried);
timeouts, connection errors, 5xx, 429 and bodies that are not the expected JSON become
IssuerUnavailable (retried with backoff by the agent).
"""

from __future__ import annotations

import email.utils
import logging
import re
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import requests

from mpagent.config import ENVIRONMENTS
from mpagent.errors import IssuerRejected, IssuerUnavailable

log = logging.getLogger(__name__)
E = TypeVar("E", bound=BaseException)

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
METADATA_PATH = ".well-known/oauth-authorization-server"
SKEW_WARNING = 5.0  # Maskinporten allows 10 s; warn at half of that.
SKEW_ALLOWED = 10.0
# Environments whose clock skew has been logged: once per process, not once per response.
_skew_warned: set[str] = set()
_MP_CODE = re.compile(r"(MP-\d+)")
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


@dataclass(frozen=True)
class Endpoints:
    issuer: str  # the grant's `aud`
    token_endpoint: str


@dataclass(frozen=True, repr=False)
class Token:
    access_token: str
    token_type: str
    scope: str
    requested_at: float  # wall clock, read before the request was sent
    expires_at: float  # requested_at + expires_in: absolute

    @property
    def lifetime(self) -> float:
        return self.expires_at - self.requested_at

    def __repr__(self) -> str:
        return f"Token(scope={self.scope!r}, expires_at={self.expires_at:.0f}, fp={fingerprint(self.access_token)})"


def fingerprint(secret: str) -> str:
    """What logs show instead of a token: its length and last four characters."""
    return f"…{secret[-4:]}({len(secret)})"


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
        self.timeout = (connect_timeout, read_timeout)
        self.clock = clock
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "mpagent"
        self.skew: float | None = None  # issuer clock minus ours, from the last Date header
        self._endpoints: Endpoints | None = None

    def endpoints(self) -> Endpoints:
        if self._endpoints is None:
            self._endpoints = self._discover()
        return self._endpoints

    def metadata_url(self) -> str:
        return (
            ENVIRONMENTS.get(self.environment, self.environment).rstrip("/") + "/" + METADATA_PATH
        )

    def metadata(self) -> dict[str, Any]:
        """The RFC 8414 metadata document; also notes the clock skew from its Date header."""
        url = self.metadata_url()
        sent_at = self.clock()
        response = self._send("GET", url)
        self._note_skew(response, sent_at)
        return self._json(response, url)

    def _discover(self) -> Endpoints:
        if self.environment in ENVIRONMENTS:  # known: no request needed
            base = ENVIRONMENTS[self.environment]
            return Endpoints(issuer=base, token_endpoint=base + "token")
        url = self.metadata_url()
        body = self.metadata()
        issuer, endpoint = body.get("issuer"), body.get("token_endpoint")
        if not isinstance(issuer, str) or not isinstance(endpoint, str):
            raise IssuerUnavailable(
                f"metadata at {url} lacks issuer or token_endpoint; is {self.environment} a Maskinporten issuer?"
            )
        return Endpoints(issuer=issuer, token_endpoint=endpoint)

    def request_token(self, assertion: str) -> Token:
        endpoint = self.endpoints().token_endpoint
        requested_at = self.clock()
        response = self._send(
            "POST", endpoint, data={"grant_type": JWT_BEARER, "assertion": assertion}
        )
        self._note_skew(response, requested_at)
        if 400 <= response.status_code < 500 and response.status_code != 429:
            raise rejection(response, self.skew)
        body = self._json(response, endpoint)
        return parse_token(body, requested_at, endpoint)

    def _send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        try:
            response = self.session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise IssuerUnavailable(unreachable(exc, url, self.timeout)) from exc
        if response.status_code == 429 or response.status_code >= 500:
            raise IssuerUnavailable(
                f"{url} answered HTTP {response.status_code}; Maskinporten is failing, will retry"
            )
        return response

    def _json(self, response: requests.Response, url: str) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise IssuerUnavailable(
                f"{url} answered HTTP {response.status_code} with a body that is not a JSON object"
            )
        return body

    def _note_skew(self, response: requests.Response, sent_at: float) -> None:
        skew = skew_from_date(response.headers.get("Date"), sent_at, self.clock())
        if skew is None:
            return
        self.skew = skew
        if abs(skew) <= SKEW_WARNING + 0.5:
            _skew_warned.discard(self.environment)  # in step again: warn anew if it drifts
        elif self.environment not in _skew_warned:
            _skew_warned.add(self.environment)
            log.warning("%s (it allows %g s)", clock_hint(skew), SKEW_ALLOWED)


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
    if isinstance(exc, requests.Timeout):
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
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
        raise IssuerUnavailable(
            f"{url} answered with expires_in = {expires_in!r}, not a positive number"
        )
    return Token(
        access_token=access_token,
        token_type=str(body.get("token_type") or "Bearer"),
        scope=str(body.get("scope") or ""),
        requested_at=requested_at,
        expires_at=requested_at + float(expires_in),
    )


def rejection(response: requests.Response, skew: float | None = None) -> IssuerRejected:
    """Maskinporten's error JSON as an IssuerRejected, its description shown verbatim; `skew`
    (from the Date header) says how far off the clock is when that is the likely cause."""
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    error = str(body.get("error") or f"http_{response.status_code}")
    description = str(body.get("error_description") or response.reason or "no description")
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
        status=response.status_code,
    )


HINTS = {
    "MP-100": "check client_id and that the client belongs to this environment (test vs prod)",
    "MP-110": "the grant's aud must be the issuer; check `environment`",
    "MP-120": "check the certificate: test certificates work only in test, production ones only in prod; "
    "it must be valid; if it lacks key usage digitalSignature, try the authentication certificate",
    "MP-121": "the registered key is older than a year; upload a new key and set kid",
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
    "Unknown key identifier": "register the key's public JWK on the client, or correct `kid`",
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
