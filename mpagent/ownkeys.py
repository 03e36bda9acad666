"""A client's own registered keys, as values: the key set Digdir's admin API returns, the set
to post back, the 5-key limit, and which keys expire soon. Pure: stdlib and mpagent.errors only.

The wire shape (PLAN13, Digdir's self-service API for integration management): GET
`/clients/{id}/jwks` answers `{"created", "last_updated", "keys": [JWK + "exp"]}`; POST replaces
the whole set with `{"keys": [JWK]}`, and every posted key's one-year clock restarts (MP-121
"Expired key" after a year; re-posting the same key renews it). At most 5 keys.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mpagent.errors import AdminApiError

LIMIT = 5  # Digdir: at most 5 keys in a client's set
RENEW_DAYS = 30  # warn and renew under this (nais/digdirator renews at 30 days left)
REQUIRED = ("kty", "alg", "use", "kid", "n", "e")  # Digdir: every key needs these
DELETE_HINT = "delete one: mpagent keys delete KID"
MAX_EPOCH = 253402300800  # 10000-01-01T00:00:00Z: datetime's last year is 9999


@dataclass(frozen=True)
class RegisteredKey:
    kid: str
    jwk: Mapping[str, Any]  # the public JWK as posted: without exp
    expires: float | None = None  # epoch seconds; None: not registered yet, or not said

    def days_left(self, now: float) -> float | None:
        return None if self.expires is None else (self.expires - now) / 86400

    @classmethod
    def new(cls, jwk: Mapping[str, Any]) -> RegisteredKey:
        """A key about to be registered (its public JWK, kid included)."""
        return cls(kid=str(jwk["kid"]), jwk={k: v for k, v in jwk.items() if k != "exp"})


@dataclass(frozen=True)
class KeySet:
    keys: tuple[RegisteredKey, ...]
    last_updated: str | None = None

    def kids(self) -> list[str]:
        return [k.kid for k in self.keys]

    def get(self, kid: str | None) -> RegisteredKey | None:
        return next((k for k in self.keys if k.kid == kid), None)


def parse_keyset(document: Any, where: str) -> KeySet:
    """The key set in an admin API answer from `where` (a URL). Every key must carry what
    Digdir requires, as it is posted back unchanged on renew; anything else is an
    AdminApiError naming the field."""
    if not isinstance(document, dict):
        raise _bad(where, "the body", "is not a JSON object")
    raw = document.get("keys", [])  # a client without keys may answer without the member
    if not isinstance(raw, list):
        raise _bad(where, "keys", "is not a list")
    keys = tuple(_key(entry, f"keys[{i}]", where) for i, entry in enumerate(raw))
    updated = document.get("last_updated")
    if updated is not None and not isinstance(updated, str):
        raise _bad(where, "last_updated", "is not a string")
    return KeySet(keys, updated)


def _key(entry: Any, field: str, where: str) -> RegisteredKey:
    if not isinstance(entry, dict):
        raise _bad(where, field, "is not a JSON object")
    for name in REQUIRED:
        value = entry.get(name)
        if not isinstance(value, str) or not value:
            raise _bad(where, f"{field}.{name}", "is missing or not a non-empty string")
    exp = entry.get("exp")
    if exp is not None and not _epoch(exp):
        raise _bad(where, f"{field}.exp", "is not a number of seconds since 1970 (before 10000)")
    jwk = {k: v for k, v in entry.items() if k != "exp"}
    return RegisteredKey(entry["kid"], jwk, None if exp is None else float(exp))


def _epoch(value: Any) -> bool:
    """A time mpagent can show: finite seconds from 1970 to the year 9999 (milliseconds,
    NaN or 1e300 would crash a date; the API has no reason to send them)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and 0 <= value < MAX_EPOCH


def _bad(where: str, field: str, problem: str) -> AdminApiError:
    return AdminApiError(
        f"{where} answered with a key set whose {field} {problem}; is admin_api the admin API "
        "(https://api.samarbeid.digdir.no/clients/ or its test twin)?",
        field=field,
    )


def upload_body(keys: Iterable[RegisteredKey]) -> dict[str, Any]:
    """What POST takes: the whole set, each key without exp (the API sets it)."""
    return {"keys": [dict(k.jwk) for k in keys]}


def with_key(ks: KeySet, new: RegisteredKey) -> tuple[RegisteredKey, ...]:
    """The set with `new` added (merged, never replacing the others); refused at LIMIT."""
    if ks.get(new.kid) is not None:
        raise AdminApiError(
            f"kid {new.kid!r} is already registered on the client; choose another kid",
            kid=new.kid,
        )
    if len(ks.keys) >= LIMIT:
        raise AdminApiError(
            f"the client already has {len(ks.keys)} registered keys, the most the admin API "
            f"allows ({LIMIT}): {', '.join(ks.kids())}; {DELETE_HINT}",
            kids=ks.kids(),
        )
    return (*ks.keys, new)


def without_key(ks: KeySet, kid: str) -> tuple[RegisteredKey, ...]:
    if ks.get(kid) is None:
        raise AdminApiError(
            f"no registered key has kid {kid!r} (registered: {', '.join(ks.kids()) or 'none'}); "
            "see `mpagent keys list`",
            kid=kid,
        )
    return tuple(k for k in ks.keys if k.kid != kid)


def expiring(ks: KeySet, now: float, days: float = RENEW_DAYS) -> list[RegisteredKey]:
    """The keys with fewer than `days` days left (expired ones included)."""
    return [k for k in ks.keys if (left := k.days_left(now)) is not None and left < days]


def expiry_text(key: RegisteredKey, now: float) -> str:
    """`2027-12-02 (365 days)`, `2026-12-01 (expired)`, or `unknown`."""
    left = key.days_left(now)
    if key.expires is None or left is None:
        return "unknown"
    day = dt.datetime.fromtimestamp(key.expires, dt.UTC).strftime("%Y-%m-%d")
    return f"{day} ({'expired' if left <= 0 else f'{int(left)} days'})"


def table(ks: KeySet, now: float, signing: str | None, held: Collection[str]) -> list[str]:
    """`mpagent keys list`: a header and one row per key; `*` marks the kid the profile signs
    with, `here` the kids whose private key this machine holds."""
    updated = ks.last_updated or "unknown"  # every POST restarts every key: no key's own date
    rows = [("", "kid", "set updated", "expires", "private key")]
    for k in ks.keys:
        mark = "*" if k.kid == signing else ""
        rows.append((mark, k.kid, updated, expiry_text(k, now), "here" if k.kid in held else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def warnings(ks: KeySet, now: float, signing: str | None) -> list[str]:
    """What a person must act on: keys expiring within RENEW_DAYS, a signing kid not in the set."""
    found = []
    soon = expiring(ks, now)
    if soon:
        found.append(
            f"{', '.join(k.kid for k in soon)} expire(s) within {RENEW_DAYS} days (MP-121 "
            '"Expired key" after that); renew: mpagent keys renew'
        )
    if signing is not None and ks.get(signing) is None:
        found.append(
            f"the profile signs with kid {signing!r}, which is not registered on the client"
        )
    return found
