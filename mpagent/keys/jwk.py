"""JWK: a private RSA JSON Web Key, full or minimal (n, e, d), with an optional kid (sent
instead of x5c, grant.py) and x5c chain."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from mpagent.keys.common import Entry, Passwords, const, ders, fail


def load_jwk(path: Path, data: bytes, passwords: Passwords) -> list[Entry]:
    try:
        jwk = json.loads(data)
    except ValueError as exc:
        raise fail(path, "unknown_format", read_as="a JWK (not valid JSON)") from exc
    if not isinstance(jwk, dict) or jwk.get("kty") != "RSA":
        found = f"JWK with kty {jwk.get('kty')!r}" if isinstance(jwk, dict) else "JSON non-object"
        raise fail(path, "not_rsa", found=found)
    if "d" not in jwk:
        raise fail(path, "no_private_key")
    key = _private_key(path, jwk)
    try:
        certs = ders(base64.b64decode(c, validate=True) for c in jwk.get("x5c", ()))
    except ValueError as exc:
        raise fail(path, "unreadable_certificate") from exc
    kid = jwk.get("kid")
    return [Entry(None, const(key), certs, None if kid is None else str(kid))]


def _private_key(path: Path, jwk: dict[str, Any]) -> rsa.RSAPrivateKey:
    def num(name: str) -> int:
        value = str(jwk[name])
        return int.from_bytes(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)), "big")

    try:
        n, e, d = num("n"), num("e"), num("d")
        if all(name in jwk for name in ("p", "q", "dp", "dq", "qi")):
            p, q, dp, dq, qi = (num(name) for name in ("p", "q", "dp", "dq", "qi"))
        else:  # a minimal JWK (n, e, d): the CRT values follow from them
            p, q = rsa.rsa_recover_prime_factors(n, e, d)
            dp, dq, qi = rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q)
        return rsa.RSAPrivateNumbers(p, q, d, dp, dq, qi, rsa.RSAPublicNumbers(e, n)).private_key()
    except (KeyError, ValueError) as exc:
        raise fail(path, "unreadable_key") from exc
