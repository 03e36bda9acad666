"""Build and sign the JWT grant (RFC 7523 §2.1) exactly as Maskinporten enforces it.

Pure given the key, the time and the jti: the caller passes `now` and `jti` in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jwt

from mpagent.keys import SigningKey
from mpagent.tokens import scope_string

# Maskinporten refuses exp - iat > 120; both come from one clock reading, so it is exact.
GRANT_LIFETIME = 120


def claims(
    *,
    audience: str,
    client_id: str,
    scopes: Iterable[str],
    now: float,
    jti: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    iat = int(now)
    body: dict[str, Any] = {
        "aud": audience,
        "iss": client_id,
        "iat": iat,
        "exp": iat + GRANT_LIFETIME,
        "jti": jti,
        "scope": scope_string(scopes),
    }
    body.update(extra or {})
    return body


def headers(key: SigningKey, kid: str | None) -> dict[str, Any]:
    """`kid` for a registered key (the configured one, else the JWK's own), else `x5c`."""
    chosen = kid or key.kid
    if chosen:
        return {"kid": chosen}
    return {"x5c": key.x5c()}


def sign(
    key: SigningKey, body: Mapping[str, Any], *, kid: str | None = None, algorithm: str = "RS256"
) -> str:
    return jwt.encode(dict(body), key.private_key, algorithm=algorithm, headers=headers(key, kid))
