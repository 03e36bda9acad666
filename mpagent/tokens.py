"""What a token is, what identifies it, and when to refresh it. Pure: every function takes
the time and the randomness it needs as arguments, so the policy is tested exactly. The value
types (`Token`, `fingerprint`, `scope_string`) live here too: this module imports nothing from
mpagent, so the policy pulls in no I/O.

With Maskinporten's 120-second tokens the defaults give:
- soft deadline (background refresh starts) 50-60 % into the lifetime: 60-72 s, the
  jitter spreading keys that were fetched together;
- hard deadline (a `get` waits for the refresh instead of answering from the cache) when
  less than the minimum remaining life is left: 10 s, or a quarter of the lifetime for
  short-lived tokens;
- failures back off exponentially from 1 s to 60 s, each wait randomised between half and
  all of its nominal value; a rejection starts higher (15 s) because retrying it quickly
  cannot help.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# One scope token, RFC 6749 §3.3: printable ASCII but space, `"` and `\`.
SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")

SOFT_FRACTION = 0.5
SOFT_JITTER = 0.1
DEFAULT_MIN_TTL = 10.0
MIN_TTL_FRACTION = 0.25
BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0
REJECTED_BACKOFF_BASE = 15.0


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
        fp = fingerprint(self.access_token)  # never the token itself
        return f"Token(scope={self.scope!r}, expires_at={self.expires_at:.0f}, fp={fp})"


def fingerprint(secret: str) -> str:
    """What logs show instead of a token: its length and last four characters."""
    return f"…{secret[-4:]}({len(secret)})"


def scope_string(scopes: Iterable[str]) -> str:
    """The canonical scope set: split on spaces, de-duplicated, sorted."""
    return " ".join(sorted({s for entry in scopes for s in entry.split()}))


@dataclass(frozen=True, order=True)
class TokenKey:
    """Everything that changes a token's identity; one token per key."""

    profile: str
    environment: str
    client_id: str
    key_id: str  # kid, or the signing certificate's fingerprint
    scope: str  # canonical: sorted, de-duplicated, space-separated
    claims: str  # canonical JSON of the optional claims
    # The Altinn exchange URL, "" for none: a Maskinporten token and the Altinn token it was
    # exchanged for never share a key (a cache keyed without the target served the wrong kind).
    exchange: str = ""

    def __str__(self) -> str:
        return f"{self.profile}:{self.scope}"


def min_ttl(requested: float | None, lifetime: float) -> float:
    """The least remaining life a served token must have."""
    if requested is not None:
        return requested
    return min(DEFAULT_MIN_TTL, lifetime * MIN_TTL_FRACTION)


def soft_deadline(token: Token, rand: float) -> float:
    """When to start a background refresh; `rand` in [0, 1) spreads keys apart."""
    return token.requested_at + token.lifetime * (SOFT_FRACTION + SOFT_JITTER * rand)


def hard_deadline(token: Token, requested_min_ttl: float | None = None) -> float:
    """After this a `get` must not be answered from this token."""
    return token.expires_at - min_ttl(requested_min_ttl, token.lifetime)


def usable(token: Token | None, now: float, requested_min_ttl: float | None = None) -> bool:
    return token is not None and now < hard_deadline(token, requested_min_ttl)


def acceptable(token: Token, now: float) -> bool:
    """A fresh answer that is already past its hard deadline is a failure, not a token."""
    return usable(token, now)


def backoff(failures: int, rand: float, *, rejected: bool = False) -> float:
    """Seconds to wait after the `failures`-th consecutive failure (1, 2, ...)."""
    base = REJECTED_BACKOFF_BASE if rejected else BACKOFF_BASE
    nominal = min(BACKOFF_CAP, base * 2 ** max(0, failures - 1))
    return nominal * (0.5 + 0.5 * rand)


def unverified_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, base64url-decoded (padding optional) without checking the
    signature; {} for anything that is not a JWT with a JSON object payload."""
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3:
        return {}
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError, RecursionError):  # Unicode/JSONDecodeError: ValueError
        return {}
    return payload if isinstance(payload, dict) else {}
