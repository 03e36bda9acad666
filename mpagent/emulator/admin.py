"""Digdir's self-service admin API for the emulator's clients (MASKINPORTEN.md §8): each client's
registered key set (JWKS), its rules, and its propagation to `/token`.

Pure: no sockets and no clock reads; every call takes `now`. `KeyStore` keeps, per client, the
set the admin API shows (the newest) and the versions on their way to `/token`, each effective
`propagation` seconds after it was made. Refusals raise `AdminRefusal` with the HTTP status and
the `{"error", "error_description"}` body the server sends.

Evidence for the rules, cited below by name:
- [docs] Digdir, "REST-API for administrasjon av OIDC-integrasjoner", felleslosninger/docs
  _docs/ID-porten/oidc/oidc_api_admin.md ("Bruk av asymmetrisk nøkkel").
- [mp-api] Digdir, "Selvbetjening av Maskinporten via API", felleslosninger/docs
  _docs/Maskinporten/maskinporten_sjolvbetjening_api.md.
- [digdirator] nais/digdirator pkg/digdir/types/types.go (JwksResponse) and pkg/digdir/client.go.
- [okdata] oslokommune/okdata-maskinporten-api maskinporten_api/keys.py and resources/maskinporten.py.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import math
import re
import threading
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey, RSAPublicNumbers

# [docs] "et Set som er en array av flere (inntil 5) JWK-representasjoner".
LIMIT = 5
# [docs] "Man må alltid sende inn nøkkeldefinisjonen (kty,alg,use,e,n)"; kid is what a grant
# names ("kid velges av kunde selv") and what /token looks the key up by.
REQUIRED = ("kty", "alg", "use", "e", "n", "kid")
# [docs] "Kun RS256 med nøkkellengde 2048 støttes". The docs name 2048 only, but production takes
# longer keys: [okdata] generates 4096-bit keys and registers them. So: at least 2048 bits.
MIN_BITS = 2048
MAX_BITS = 16384  # OpenSSL's own limit for an RSA modulus
# Keys live one year from upload (MASKINPORTEN.md §5, §8: MP-121 "Expired key"; re-posting the
# same key renews it).
DEFAULT_KEY_LIFETIME = 365 * 86400
# RFC 7517 §6.3.2: the members that make a JWK private. A public key set never holds them.
PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth")
# Not documented: the emulator's guard, so that a kid can be shown in a message and sent in a
# JOSE header as it is. Digdir's examples are plain names ("min_egen_nokkel").
MAX_KID = 200

# The scopes of the admin API (MASKINPORTEN.md §8, [mp-api]'s scope table): dcr.read reads;
# dcr.write creates and dcr.modify changes registrations, and both include reading.
READ_SCOPES = frozenset({"idporten:dcr.read", "idporten:dcr.write", "idporten:dcr.modify"})
CHANGE_SCOPES = frozenset({"idporten:dcr.write", "idporten:dcr.modify"})


class AdminRefusal(Exception):
    """An admin API error: HTTP `status` and a `{"error", "error_description"}` body."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description

    def body(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


def _bad(description: str) -> AdminRefusal:
    return AdminRefusal(400, "invalid_request", description)


@dataclass(frozen=True)
class RegisteredKey:
    """One key of a client's set: the public JWK as posted (without exp), its expiry."""

    jwk: Mapping[str, Any]
    exp: int  # epoch seconds; the key is refused at /token from then on (MP-121)
    public_key: RSAPublicKey

    @property
    def kid(self) -> str:
        return str(self.jwk["kid"])

    def expired(self, now: float) -> bool:
        return now >= self.exp


@dataclass(frozen=True)
class KeySet:
    """A client's registered keys; `created`/`last_updated` are epoch seconds, None when empty."""

    keys: tuple[RegisteredKey, ...] = ()
    created: float | None = None
    last_updated: float | None = None

    def get(self, kid: str) -> RegisteredKey | None:
        return next((k for k in self.keys if k.kid == kid), None)

    def document(self) -> dict[str, Any]:
        """What GET answers: [digdirator]'s JwksResponse shape (created, last_updated, and the
        JWKS), with each key's exp, which [okdata] reads as `int(key["exp"])`."""
        if not self.keys:
            return {"keys": []}
        return {
            "created": _iso(self.created),
            "last_updated": _iso(self.last_updated),
            "keys": [{**k.jwk, "exp": k.exp} for k in self.keys],
        }


EMPTY = KeySet()


def _iso(when: float | None) -> str | None:
    if when is None:
        return None
    return dt.datetime.fromtimestamp(int(when), dt.UTC).isoformat()


def parse_upload(
    document: Any,
    *,
    client_id: str,
    current: KeySet,
    owners: Mapping[str, str],
    now: float,
    lifetime: float,
) -> KeySet:
    """The new set for a POST/PUT body, once every rule holds; AdminRefusal (400) naming the
    field otherwise. `owners` maps each kid registered anywhere to its client."""
    # [mp-api]'s example body is {"keys": [...]}, the RFC 7517 JWK Set; so is [okdata]'s and
    # [digdirator]'s (a jose.JSONWebKeySet).
    if not isinstance(document, dict) or "keys" not in document:
        raise _bad('the body must be a JWK Set: {"keys": [...]}')
    keys = document["keys"]
    if not isinstance(keys, list):
        raise _bad("keys must be an array of JWKs")
    if len(keys) > LIMIT:
        raise _bad(f"keys holds {len(keys)} keys; a client may have at most {LIMIT}")
    parsed = [_parse_key(jwk, f"keys[{i}]", now, lifetime) for i, jwk in enumerate(keys)]
    seen: set[str] = set()
    for i, key in enumerate(parsed):
        where = f"keys[{i}].kid"
        if key.kid in seen:
            raise _bad(f"{where}: kid {key.kid!r} appears twice in the set")
        seen.add(key.kid)
        # [docs] "kid ... må være unik innenfor alle ID-porten/Maskinportens kunder"; [mp-api]
        # "'kid'-verdien må være unik blant alle Maskinportens kunder".
        owner = owners.get(key.kid)
        if owner is not None and owner != client_id:
            raise _bad(
                f"{where}: kid {key.kid!r} is already registered on another client; "
                "choose a kid unique across all of Maskinporten's customers"
            )
        # Not in Digdir's docs: a kid names one key for good (that is what uniqueness across all
        # customers is for), so the same kid with another modulus is refused rather than taken
        # as a silent key swap under a name grants already use.
        old = current.get(key.kid)
        if old is not None and old.jwk["n"] != key.jwk["n"]:
            raise _bad(
                f"{where}: kid {key.kid!r} is registered with another key (n differs); "
                "give a new key a new kid"
            )
    if not parsed:
        return EMPTY
    created = current.created if current.keys else now
    return KeySet(tuple(parsed), created=created, last_updated=now)


def _parse_key(jwk: Any, where: str, now: float, lifetime: float) -> RegisteredKey:
    if not isinstance(jwk, dict):
        raise _bad(f"{where}: must be a JWK object")
    for name in REQUIRED:
        if name not in jwk:
            raise _bad(f"{where}: {name} is missing; every key needs {', '.join(REQUIRED)}")
        if not isinstance(jwk[name], str):
            raise _bad(f"{where}.{name}: must be a string")
    private = [m for m in PRIVATE_MEMBERS if m in jwk]
    if private:
        raise _bad(
            f"{where}: holds private key members ({', '.join(private)}); "
            "register the public key only and keep the private key to yourself"
        )
    kid = jwk["kid"]
    if not 0 < len(kid) <= MAX_KID or not kid.isprintable() or any(c.isspace() for c in kid):
        raise _bad(f"{where}.kid: must be 1-{MAX_KID} printable characters without spaces")
    # [docs] "Kun RS256 ... støttes som algoritme": an RSA key, for signatures.
    if jwk["kty"] != "RSA":
        raise _bad(f"{where}.kty: must be RSA, not {jwk['kty']!r}")
    if jwk["alg"] != "RS256":
        raise _bad(f"{where}.alg: only RS256 is supported, not {jwk['alg']!r}")
    if jwk["use"] != "sig":
        raise _bad(f"{where}.use: must be sig (a key for signing grants), not {jwk['use']!r}")
    n = _b64url_uint(jwk["n"], f"{where}.n")
    e = _b64url_uint(jwk["e"], f"{where}.e")
    if not MIN_BITS <= n.bit_length() <= MAX_BITS:
        bits = f"{MIN_BITS}-{MAX_BITS}"
        raise _bad(f"{where}.n: the key has {n.bit_length()} bits; {bits} are accepted")
    if e < 3 or e % 2 == 0 or e >= n:
        raise _bad(f"{where}.e: {e} is not a valid RSA public exponent (AQAB is 65537)")
    try:
        public_key = RSAPublicNumbers(e, n).public_key()
    except ValueError as exc:
        raise _bad(f"{where}: n and e are not a valid RSA public key") from exc
    exp = _expiry(jwk.get("exp"), f"{where}.exp", now, lifetime)
    public = {k: v for k, v in jwk.items() if k != "exp"}
    return RegisteredKey(public, exp, public_key)


def _expiry(posted: Any, where: str, now: float, lifetime: float) -> int:
    """now + lifetime, or a posted exp when it is sooner. The server owns the clock: without
    exp a key lives the full lifetime from this upload, so re-posting renews it (MASKINPORTEN.md
    §8). A shorter exp is honoured: [okdata] posts keys with its own exp (fewer days for keys
    under rotation); one longer than a year from upload is cut to a year."""
    full = math.ceil(now + lifetime)
    if posted is None:
        return full
    if not isinstance(posted, int | float) or isinstance(posted, bool) or not math.isfinite(posted):
        raise _bad(f"{where}: must be a number of seconds since the epoch, or left out")
    if posted <= now:
        raise _bad(f"{where}: {posted:.0f} is in the past; leave exp out for the full lifetime")
    return min(full, math.ceil(posted))


def _b64url_uint(value: str, where: str) -> int:
    """RFC 7518 §6.3.1: n and e are base64url without padding, big-endian unsigned."""
    if not value or not re.fullmatch(r"[A-Za-z0-9_-]+", value):
        raise _bad(f"{where}: must be base64url (A-Z a-z 0-9 - _) without padding")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError) as exc:
        raise _bad(f"{where}: is not valid base64url") from exc
    return int.from_bytes(raw, "big")


@dataclass
class _Client:
    # (effective_at, set), oldest first; the last is what the admin API shows.
    versions: list[tuple[float, KeySet]] = field(default_factory=lambda: [(-math.inf, EMPTY)])


class KeyStore:
    """Every client's key set, with propagation: a change is shown by `admin_view` at once and
    reaches `effective` (what /token checks) `propagation` seconds later. Digdir: a change
    reaches ID-porten/Maskinporten in 0-2 minutes ([docs]: "Overføring av
    integrasjonskonfigurasjon, 0-2 minutter"); NAIS has seen up to 15 (MASKINPORTEN.md §8).
    Thread-safe: the HTTP server calls it from one thread per request. `clients` is read live
    (the emulator's own mapping), so a client added later has an (empty) set too."""

    def __init__(
        self,
        clients: Container[str],
        *,
        lifetime: float = DEFAULT_KEY_LIFETIME,
        propagation: float = 0.0,
    ) -> None:
        self.lifetime = lifetime
        self.propagation = propagation
        self._known = clients
        self._clients: dict[str, _Client] = {}
        self._lock = threading.Lock()

    def knows(self, client_id: str) -> bool:
        return client_id in self._known

    def admin_view(self, client_id: str) -> KeySet:
        with self._lock:
            return self._client(client_id).versions[-1][1]

    def effective(self, client_id: str, now: float) -> KeySet:
        """The set /token checks: the newest version whose propagation is done."""
        with self._lock:
            entry = self._clients.get(client_id)
            if entry is None or not self.knows(client_id):
                return EMPTY
            oldest = entry.versions[0][1]
            return next((s for at, s in reversed(entry.versions) if at <= now), oldest)

    def replace(self, client_id: str, document: Any, now: float) -> KeySet:
        """POST/PUT: the whole set is replaced ([docs]: "både POST og PUT erstatter evt.
        eksisterende JWKS"; no operations on single keys)."""
        with self._lock:
            entry, new = self._parse(client_id, document, now)
            self._add(entry, new, now + self.propagation, now)
            return new

    def delete(self, client_id: str, now: float) -> None:
        """DELETE: the set is empty (MASKINPORTEN.md §8: how the last key is removed)."""
        with self._lock:
            entry = self._client(client_id)
            self._add(entry, EMPTY, now + self.propagation, now)

    def register(self, client_id: str, document: Any, now: float) -> KeySet:
        """Like `replace`, but effective at /token at once: test setup."""
        with self._lock:
            entry, new = self._parse(client_id, document, now)
            entry.versions = [(-math.inf, new)]
            return new

    def _parse(self, client_id: str, document: Any, now: float) -> tuple[_Client, KeySet]:
        """The client's entry and the set an upload makes of it (the lock held)."""
        entry = self._client(client_id)
        new = parse_upload(
            document,
            client_id=client_id,
            current=entry.versions[-1][1],
            owners=self._owners(),
            now=now,
            lifetime=self.lifetime,
        )
        return entry, new

    def _client(self, client_id: str) -> _Client:
        if not self.knows(client_id):
            raise AdminRefusal(404, "not_found", f"no client with client_id {client_id!r}")
        return self._clients.setdefault(client_id, _Client())

    def _owners(self) -> dict[str, str]:
        """kid -> client, over what the admin API shows for every client."""
        return {
            key.kid: client_id
            for client_id, entry in self._clients.items()
            for key in entry.versions[-1][1].keys
        }

    @staticmethod
    def _add(entry: _Client, new: KeySet, effective_at: float, now: float) -> None:
        versions = [*entry.versions, (effective_at, new)]
        # Drop what can never be effective again: everything before the newest effective one.
        live = max(i for i, (at, _) in enumerate(versions) if at <= now)
        entry.versions = versions[live:]
