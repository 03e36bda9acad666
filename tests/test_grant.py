"""The JWT grant: claims and header exactly as Maskinporten requires."""

from __future__ import annotations

import base64
import json

import jwt
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from mpagent import grant
from mpagent.emulator import pki
from mpagent.keys import SigningKey
from mpagent.tokens import scope_string


@pytest.fixture(scope="module")
def key() -> SigningKey:
    ca = pki.make_ca()
    leaf = pki.make_leaf(ca)
    return SigningKey(private_key=leaf.key, chain=(leaf.cert, ca.cert), kid=None, source="test")


def header_of(token: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))


def test_claims_from_one_clock_reading() -> None:
    """iat and exp come from one reading: exp - iat is exactly 120 even at .999 s."""
    body = grant.claims(audience="A/", client_id="c", scopes=["s"], now=1000.999, jti="j")
    assert body == {"aud": "A/", "iss": "c", "iat": 1000, "exp": 1120, "jti": "j", "scope": "s"}


def test_scope_set_is_canonical() -> None:
    """Scopes are split on spaces, de-duplicated and sorted, so one set is one token."""
    assert scope_string(["b a", "a", "c"]) == "a b c"


def test_optional_claims_are_added() -> None:
    """Configured optional claims go into the body as given."""
    extra = {"resource": "https://api/", "consumer_org": "123456789"}
    body = grant.claims(audience="A", client_id="c", scopes=["s"], now=0, jti="j", extra=extra)
    assert body["resource"] == "https://api/" and body["consumer_org"] == "123456789"


def test_x5c_header_is_array_of_standard_base64_der(key: SigningKey) -> None:
    """x5c is a JSON array of standard-base64 DER certificates, leaf first; no kid."""
    token = grant.sign(key, {"a": 1})
    header = header_of(token)
    assert "kid" not in header and header["alg"] == "RS256"
    assert header["x5c"] == [
        base64.b64encode(c.public_bytes(Encoding.DER)).decode() for c in key.chain
    ]
    assert jwt.decode(token, key.private_key.public_key(), algorithms=["RS256"]) == {"a": 1}


def test_kid_replaces_x5c(key: SigningKey) -> None:
    """With a kid configured the header carries kid and no certificate."""
    header = header_of(grant.sign(key, {"a": 1}, kid="my-key", algorithm="RS512"))
    assert header["kid"] == "my-key" and "x5c" not in header and header["alg"] == "RS512"


def test_jwk_own_kid_is_used(key: SigningKey) -> None:
    """A key that carries its own kid (a JWK) signs in kid mode when none is configured."""
    jwk_key = SigningKey(private_key=key.private_key, chain=(), kid="jwk-kid", source="jwk")
    assert header_of(grant.sign(jwk_key, {}))["kid"] == "jwk-kid"
