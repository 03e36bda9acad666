"""A local Maskinporten emulator: real HTTP on loopback, enforcing the grant rules of
MASKINPORTEN.md §2-§4 (see `rules`) with Maskinporten's error shape, codes and texts, and
serving Digdir's self-service admin API for its clients' keys under `admin_api` (see `admin`)
and Altinn 3's token exchange at `altinn_exchange` (see `altinn`).

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
import math
import random
import re
import secrets
import socketserver
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

import mpagent.emulator.admin as admin
import mpagent.emulator.altinn as altinn
import mpagent.emulator.rules as rules
from mpagent.altinn import systemuser_org_of
from mpagent.errors import ConfigError

log = logging.getLogger("mpagent.emulator")  # the package's name: bench and tests listen to it

METADATA_PATH = "/.well-known/oauth-authorization-server"
MAX_BODY = 1 << 20
# Five keys with certificate chains in x5c fit many times over; anything bigger is a mistake.
MAX_ADMIN_BODY = 64 << 10
ADMIN_PATH = re.compile(r"/clients/([^/]+)/jwks")
# An admin call's bearer token: signature and presence by PyJWT, times against the emulator's
# own clock (now() with clock_offset), iss by hand.
TOKEN_OPTIONS: Any = {"require": ["iss", "exp"]} | dict.fromkeys(
    ("verify_exp", "verify_iat", "verify_nbf", "verify_aud", "verify_iss"), False
)
FAULTS = ("503", "hang", "garbage", "drop")
# The exchange's own faults: the token endpoint's, and Altinn refusing a token it should take.
EXCHANGE_FAULTS = ("401", *FAULTS)
# Altinn publishes the exchanged tokens' keys under its OpenID path (Altinn/altinn-authentication
# tests: GET /authentication/api/v1/openid/.well-known/openid-configuration/jwks).
ALTINN_DISCOVERY = altinn.OPENID_PATH + ".well-known/openid-configuration"
ALTINN_JWKS = ALTINN_DISCOVERY + "/jwks"


class Emulator:
    """Maskinporten on loopback. Binds at construction (so `issuer` is known), serves after
    `start()` or `serve_forever()`, and runs once: after `stop()` it is done.

    Access tokens live `lifetimes[client_id]` seconds, else `token_lifetime`, as production
    gives each client its registered access_token_lifetime.

    Faults: `inject()` queues them; once the queue is empty, each POST /token fails with
    probability `fail_ratio`, its kind drawn uniformly from FAULTS by `random.Random(seed)`.

    Keys: `jwks` are valid for every client (kid grants). Each client also has its own key
    set, changed through the admin API (`admin_api`) or `register_keys`; a registered key lives
    `key_lifetime` seconds from upload, and a change reaches /token `propagation` seconds after
    it was made.

    Altinn: GET `altinn_exchange` exchanges an unexpired access token this emulator issued for
    an Altinn token signed by `altinn_signing_key` (made on first use unless given), living
    `altinn_lifetime` seconds. `systemusers` ({client_id: organisation numbers}) says for which
    organisations a client has a system user; a system-user grant for any other is refused with
    MP-303. Without it (None) every organisation is taken to have one and the grant's
    authorization_details reach the token as sent.

    Issuer: `http://HOST:PORT/`, with the slash as Maskinporten's; `issuer_slash=False` drops
    it, as Skyporten's `https://sky.maskinporten.no` (MASKINPORTEN.md §1, §7; Digdir's Skyporten
    page shows "issuer":"https://test.sky.maskinporten.no" beside its ".../token" endpoint).
    The paths served are the same either way; only the issuer, which aud must equal exactly,
    and the URLs built from it change.
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
        signing_key: rsa.RSAPrivateKey | None = None,
        key_lifetime: float = admin.DEFAULT_KEY_LIFETIME,
        propagation: float = 0.0,
        altinn_signing_key: rsa.RSAPrivateKey | None = None,
        altinn_lifetime: int = altinn.DEFAULT_LIFETIME,
        systemusers: Mapping[str, Iterable[str]] | None = None,
        issuer_slash: bool = True,
    ) -> None:
        if not 0.0 <= fail_ratio <= 1.0:
            raise ValueError(f"fail_ratio {fail_ratio} must be between 0 and 1")
        if not (math.isfinite(key_lifetime) and key_lifetime > 0):
            raise ValueError(f"key_lifetime {key_lifetime} must be a positive number of seconds")
        if not (math.isfinite(propagation) and propagation >= 0):
            raise ValueError(f"propagation {propagation} must be 0 or more seconds")
        if isinstance(altinn_lifetime, bool) or not isinstance(altinn_lifetime, int):
            raise ValueError(f"altinn_lifetime {altinn_lifetime!r} must be whole seconds")
        if altinn_lifetime < 1:
            raise ValueError(f"altinn_lifetime {altinn_lifetime} must be at least 1 second")
        self.clients = {
            cid: frozenset(s.split() if isinstance(s, str) else s)
            for cid, s in dict(clients).items()
        }
        self.trust = list(trust)
        self.jwks = dict(jwks)
        self.key_sets = admin.KeyStore(self.clients, lifetime=key_lifetime, propagation=propagation)
        self.token_lifetime = token_lifetime
        self.lifetimes = dict(lifetimes or {})
        self.clock_offset = clock_offset
        self.hang_seconds = hang_seconds
        self.fail_ratio = fail_ratio
        # Fault injection for soak tests, not security: a seeded PRNG makes a run repeatable.
        self._random = random.Random(seed)  # noqa: S311
        # A throwaway key by default; tests pass one key to many emulators (RSA keygen is slow).
        self._key = signing_key or _new_key()
        self._kid = _kid_of(self._key)
        self.altinn_lifetime = altinn_lifetime
        self.systemusers = None if systemusers is None else _systemusers(systemusers)
        # Altinn's key, made on first use: an emulator that never exchanges pays no keygen.
        self._altinn_key = altinn_signing_key
        self._altinn_lock = threading.Lock()
        self._lock = threading.Lock()
        self._faults: collections.deque[str] = collections.deque()
        self._exchange_faults: collections.deque[str] = collections.deque()
        self._exchanges = 0
        self._altinn_issued = 0
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
        self._slash = "/" if issuer_slash else ""

    @property
    def issuer(self) -> str:
        return f"http://{self._host}:{self._server.server_address[1]}{self._slash}"

    @property
    def token_endpoint(self) -> str:
        return self.issuer.rstrip("/") + "/token"

    @property
    def admin_api(self) -> str:
        """The self-service API's base: `{admin_api}{client_id}/jwks`, as Digdir's
        `https://api.samarbeid.digdir.no/clients/`."""
        return self.issuer.rstrip("/") + "/clients/"

    @property
    def altinn_exchange(self) -> str:
        """Altinn's token exchange, as `https://platform.tt02.altinn.no` + EXCHANGE_PATH."""
        return self.issuer.rstrip("/") + altinn.EXCHANGE_PATH

    @property
    def altinn_issuer(self) -> str:
        """The iss of the Altinn tokens, as Altinn's `{platform}/authentication/api/v1/openid/`."""
        return self.issuer.rstrip("/") + altinn.OPENID_PATH

    @property
    def exchange_requests(self) -> int:
        """GET requests to the exchange so far, faults and refusals included."""
        with self._lock:
            return self._exchanges

    @property
    def altinn_tokens_issued(self) -> int:
        with self._lock:
            return self._altinn_issued

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

    def clear_faults(self) -> None:
        """Forget the token faults still queued: the issuer answers again."""
        with self._lock:
            self._faults.clear()

    def inject_exchange(self, fault: str, count: int = 1) -> None:
        """Queue faults for the next `count` exchange requests: one of EXCHANGE_FAULTS ("401" is
        Altinn refusing the token; the others as at /token)."""
        if fault not in EXCHANGE_FAULTS:
            kinds = ", ".join(EXCHANGE_FAULTS)
            raise ValueError(f"unknown exchange fault {fault!r}; choose one of {kinds}")
        with self._lock:
            self._exchange_faults.extend([fault] * count)

    def _next_exchange_fault(self) -> str | None:
        with self._lock:
            self._exchanges += 1
            return self._exchange_faults.popleft() if self._exchange_faults else None

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
            "jwks_uri": self.issuer.rstrip("/") + "/jwk",
            "token_endpoint_auth_signing_alg_values_supported": list(rules.ALGORITHMS),
            "grant_types_supported": [rules.JWT_BEARER],
            "authorization_details_types_supported": list(rules.AUTHORIZATION_DETAIL_FIELDS),
        }

    def jwks_document(self) -> dict[str, Any]:
        return {"keys": [_public_jwk(self._key, self._kid)]}

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
            client_keys=lambda client_id: self.key_sets.effective(client_id, now),
        )
        if self.systemusers is not None:
            altinn.check_systemuser(
                grant["iss"], grant.get("authorization_details"), self.systemusers
            )
        replay_key = grant.get("jti") or hashlib.sha256(assertion.encode()).hexdigest()
        self._remember(replay_key, grant["exp"], now)
        for warning in rules.grant_warnings(grant):
            log.warning("grant from client %s: %s", grant["iss"], warning)
        lifetime = self.lifetimes.get(grant["iss"], self.token_lifetime)
        claims = rules.access_token_claims(
            grant, issuer=self.issuer, org=org, now=now, lifetime=lifetime, jti=str(uuid.uuid4())
        )
        if self.systemusers is not None and "authorization_details" in claims:
            claims["authorization_details"] = altinn.token_details(
                claims["authorization_details"], grant["iss"], org
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

    # -- the admin API (Digdir's self-service API, MASKINPORTEN.md §8)

    def register_keys(self, client_id: str, jwks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Replace a client's key set as a POST would, but effective at /token at once (test
        setup). Returns the admin view; a set the API would refuse raises ValueError."""
        try:
            self.key_sets.register(client_id, {"keys": [dict(k) for k in jwks]}, self.now())
        except admin.AdminRefusal as refusal:
            raise ValueError(refusal.description) from None
        return self.client_keys(client_id)

    def client_keys(self, client_id: str) -> dict[str, Any]:
        """What GET {admin_api}{client_id}/jwks answers now (the newest set, propagated or not)."""
        try:
            return self.key_sets.admin_view(client_id).document()
        except admin.AdminRefusal as refusal:
            raise ValueError(refusal.description) from None

    def handle_admin(
        self, method: str, client_id: str, authorization: str | None, content_type: str, body: bytes
    ) -> tuple[int, dict[str, Any] | None]:
        """The status and JSON body (None: no body) answering one admin API request."""
        now = self.now()
        try:
            scopes = admin.READ_SCOPES if method == "GET" else admin.CHANGE_SCOPES
            self._authorise(authorization, scopes, now)
            if not self.key_sets.knows(client_id):
                raise admin.AdminRefusal(
                    404, "not_found", f"no client with client_id {client_id!r}"
                )
            if method == "GET":
                return 200, self.key_sets.admin_view(client_id).document()
            if method == "DELETE":
                self.key_sets.delete(client_id, now)
                log.info("admin: client %s: every key removed%s", client_id, self._delay())
                return 204, None
            new = self.key_sets.replace(client_id, _json_body(content_type, body), now)
        except admin.AdminRefusal as refusal:
            what = f"{refusal.status} {refusal.description}"
            log.info("admin: %s for client %r refused: %s", method, client_id, what)
            return refusal.status, refusal.body()
        kids = ", ".join(k.kid for k in new.keys) or "none"
        log.info("admin: client %s: key set replaced, kids %s%s", client_id, kids, self._delay())
        return 200, new.document()

    def _delay(self) -> str:
        if not self.key_sets.propagation:
            return ""
        return f"; reaches /token in {self.key_sets.propagation:g} s"

    def _authorise(self, authorization: str | None, scopes: frozenset[str], now: float) -> None:
        """The call carries an access token this emulator issued, unexpired, with one of
        `scopes` (RFC 6750 errors: invalid_token 401, insufficient_scope 403)."""
        wanted = " or ".join(sorted(scopes))
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            text = f"send Authorization: Bearer <a Maskinporten access token with scope {wanted}>"
            raise admin.AdminRefusal(401, "invalid_token", text)
        try:
            claims = self.verify_access_token(token.strip())
        except (jwt.InvalidTokenError, ValueError):
            raise admin.AdminRefusal(
                401, "invalid_token", f"the access token was not issued by {self.issuer}"
            ) from None
        exp = claims["exp"]
        if not isinstance(exp, int | float) or exp <= now:
            raise admin.AdminRefusal(
                401, "invalid_token", "the access token has expired; fetch a new one"
            )
        granted = set(str(claims.get("scope", "")).split())
        if not granted & scopes:
            has = " ".join(sorted(granted)) or "(none)"
            text = f"the access token has scope {has}; this request needs {wanted}"
            raise admin.AdminRefusal(403, "insufficient_scope", text)
        # Digdir: "Selvbetjeningsklienten må bruke virksomhetssertifikat" (felleslosninger/docs
        # oidc_api_admin.md): the admin client authenticates with a business certificate.
        if claims.get("client_amr") != "virksomhetssertifikat":
            text = (
                f"client {claims.get('client_id')} signed its grant with a registered key (kid); "
                "the admin API takes only tokens of a client that signs with its business "
                "certificate (x5c)"
            )
            raise admin.AdminRefusal(403, "access_denied", text)

    def verify_access_token(self, token: str) -> dict[str, Any]:
        """The claims of an access token this emulator issued: its signature and iss, with exp
        present; times are the caller's to check. jwt.InvalidTokenError or ValueError else."""
        claims: dict[str, Any] = jwt.decode(
            token, self._key.public_key(), algorithms=["RS256"], options=TOKEN_OPTIONS
        )
        if claims["iss"] != self.issuer:
            raise ValueError(f"iss is not {self.issuer}")
        return claims

    # -- Altinn 3's token exchange (emulator/altinn.py)

    def handle_exchange(self, authorization: str | None, query: str) -> tuple[int, bytes, str]:
        """(status, body, content type) answering one GET of the exchange (faults aside)."""
        key, kid = self._altinn_signing()
        status, body, kind = altinn.handle_exchange(
            authorization,
            query,
            verify=self.verify_access_token,
            signing_key=key,
            lifetime=self.altinn_lifetime,
            now=self.now(),
            issuer=self.altinn_issuer,
            kid=kid,
        )
        if status != 200:  # the body is a short reason of ours, never the token
            log.info("Altinn exchange refused (%d): %s", status, body.decode())
            return status, body, kind
        with self._lock:
            self._altinn_issued += 1
        claims = jwt.decode(body, options={"verify_signature": False})
        org = systemuser_org_of(claims.get("authorization_details"))
        system_user = f" for the system user of {org}" if org else ""
        client, lifetime = claims.get("client_id"), self.altinn_lifetime
        log.info("Altinn token issued to client %s%s, %d s", client, system_user, lifetime)
        return status, body, kind

    def _altinn_signing(self) -> tuple[rsa.RSAPrivateKey, str]:
        with self._altinn_lock:
            if self._altinn_key is None:
                self._altinn_key = _new_key()
            return self._altinn_key, _kid_of(self._altinn_key)

    def altinn_jwks_document(self) -> dict[str, Any]:
        key, kid = self._altinn_signing()
        return {"keys": [_public_jwk(key, kid)]}

    def altinn_discovery(self) -> dict[str, Any]:
        base = self.issuer.rstrip("/")
        return {"issuer": self.altinn_issuer, "jwks_uri": base + ALTINN_JWKS}

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
        key_lifetime: float = admin.DEFAULT_KEY_LIFETIME,
        propagation: float = 0.0,
        altinn_lifetime: int = altinn.DEFAULT_LIFETIME,
        systemusers: Sequence[str] = (),
        issuer_slash: bool = True,
    ) -> Emulator:
        """An emulator from CLI-style arguments; bad input raises ConfigError naming it."""
        _check_lifetime(token_lifetime, f"--token-lifetime {token_lifetime}")
        if altinn_lifetime < 1:
            raise ConfigError(f"--altinn-lifetime {altinn_lifetime}: must be at least 1 second")
        try:
            users = altinn.parse_systemusers(list(systemusers)) if systemusers else None
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not (math.isfinite(key_lifetime) and key_lifetime > 0):
            raise ConfigError(
                f"--key-lifetime {key_lifetime:g}: must be a number of seconds above 0"
            )
        if not (math.isfinite(propagation) and propagation >= 0):
            raise ConfigError(
                f"--propagation {propagation:g}: must be a number of seconds, 0 or more"
            )
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
                key_lifetime=key_lifetime,
                propagation=propagation,
                altinn_lifetime=altinn_lifetime,
                systemusers=users,
                issuer_slash=issuer_slash,
            )
        except OSError as exc:
            raise ConfigError(
                f"--host/--port: cannot listen on {host}:{port} ({exc.strerror or exc}); "
                "choose another address or port 0 for any free port"
            ) from exc


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _kid_of(key: rsa.RSAPrivateKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()[:12]).decode()


def _public_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = dict(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True))
    return jwk | {"kid": kid, "alg": "RS256", "use": "sig"}


def _systemusers(users: Mapping[str, Iterable[str]]) -> dict[str, frozenset[str]]:
    """{client_id: organisation numbers}, "0192:" dropped; a lone string is one number."""
    return {
        client: frozenset(
            o.strip().removeprefix(altinn.ORG_PREFIX)
            for o in ([orgs] if isinstance(orgs, str) else orgs)
        )
        for client, orgs in users.items()
    }


def _json_body(content_type: str, body: bytes) -> Any:
    """A POST/PUT body as JSON; AdminRefusal 400 saying what is wrong with it."""
    if content_type != "application/json":
        text = f"Content-Type must be application/json, not {content_type}"
        raise admin.AdminRefusal(400, "invalid_request", text)
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise admin.AdminRefusal(400, "invalid_request", "the body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        text = f"the body is not valid JSON (line {exc.lineno} column {exc.colno})"
        raise admin.AdminRefusal(400, "invalid_request", text) from None
    except (ValueError, RecursionError):  # too deep, or an integer too long to convert
        raise admin.AdminRefusal(400, "invalid_request", "the body is not usable JSON") from None


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
        elif path == altinn.EXCHANGE_PATH:
            self._exchange()
        elif path == ALTINN_DISCOVERY:
            self._send_json(200, self.server.emulator.altinn_discovery())
        elif path == ALTINN_JWKS:
            self._send_json(200, self.server.emulator.altinn_jwks_document())
        else:
            self._admin("GET")

    def _exchange(self) -> None:
        emulator = self.server.emulator
        fault = emulator._next_exchange_fault()
        if fault == "401":
            log.info("injected fault: 401 at the exchange")
            self._send(401, b"the token was refused (injected fault)", altinn.TEXT)
            return
        if fault is not None:
            self._fault(fault)
            return
        try:
            status, body, kind = emulator.handle_exchange(
                self.headers.get("Authorization"), self.path.partition("?")[2]
            )
        except Exception:  # connection boundary: answer 500 rather than drop, and say why
            log.exception("exchange request failed inside the emulator")
            status, body, kind = 500, b"server error; see the emulator's log", altinn.TEXT
        self._send(status, body, kind)

    def do_PUT(self) -> None:
        self._admin("PUT")

    def do_DELETE(self) -> None:
        self._admin("DELETE")

    def do_POST(self) -> None:
        if self.path.partition("?")[0] != "/token":
            self._admin("POST")
            return
        body = self._body(MAX_BODY)
        if body is None:
            self._send_json(413, {"error": "invalid_request"})
            return
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

    def _body(self, limit: int) -> bytes | None:
        """The request body, or None when Content-Length is bad or over `limit` (then the
        connection closes: the unread body must not be taken for the next request)."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= limit:
            self.close_connection = True
            return None
        return self.rfile.read(length)

    def _admin(self, method: str) -> None:
        """`/clients/{client_id}/jwks`; anything else is 404."""
        match = ADMIN_PATH.fullmatch(self.path.partition("?")[0])
        if match is None:
            self._send_json(404, {"error": "not_found", "error_description": "no such path"})
            return
        body = b""
        if method in ("POST", "PUT"):
            limited = self._body(MAX_ADMIN_BODY)
            if limited is None:
                text = f"the body must be at most {MAX_ADMIN_BODY} bytes, with a Content-Length"
                self._send_json(413, {"error": "invalid_request", "error_description": text})
                return
            body = limited
        emulator = self.server.emulator
        try:
            status, payload = emulator.handle_admin(
                method,
                unquote(match.group(1)),
                self.headers.get("Authorization"),
                self.headers.get_content_type(),
                body,
            )
        except Exception:  # connection boundary: answer 500 rather than drop, and say why
            log.exception("admin request failed inside the emulator")
            status, payload = 500, {"error": "server_error", "error_description": "see its log"}
        if payload is None:
            self._send(status, b"", None)
            return
        headers = None
        if status == 401:  # RFC 6750 §3: a 401 names the scheme and the error
            headers = {"WWW-Authenticate": f'Bearer error="{payload["error"]}"'}
        self._send_json(status, payload, headers)

    def _fault(self, fault: str) -> None:
        log.info("injected fault: %s", fault)
        if fault == "503":
            self._send(503, b"<html><body>503 Service Unavailable</body></html>\n", "text/html")
        elif fault == "garbage":
            self._send(200, b"<html><body>Maintenance</body></html>\n", "text/html")
        elif fault == "hang":
            self.server.emulator._stopping.wait(self.server.emulator.hang_seconds)
        self.close_connection = True  # "hang" and "drop" end here without a response

    def _send_json(
        self, status: int, payload: Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> None:
        body = json.dumps(payload).encode()
        self._send(status, body, "application/json;charset=UTF-8", headers)

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str | None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        if status != 204:
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def date_time_string(self, timestamp: float | None = None) -> str:
        when = self.server.emulator.now() if timestamp is None else timestamp
        return email.utils.formatdate(when, usegmt=True)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet; request lines could carry secrets in a query string
