"""The emulator's admin API (Digdir's self-service API for a client's keys) over real HTTP on
loopback, with access tokens the emulator issued for real grants, and the key rules at /token.
The emulator's clock is moved with `clock_offset` (a fake clock) instead of sleeping, except
where one test pins the real-time propagation delay."""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from mpagent import grant
from mpagent.emulator import Emulator, admin
from mpagent.emulator.pki import Issued, new_rsa_key

from .conftest import run_cli
from .keystores import write_cert_pem
from .test_emulator import interruptible, x5c

ADMIN = "admin-client"  # signs with its business certificate; may read and change
READER = "reader-client"  # signs with its certificate; may only read
OTHER = "other-client"  # signs with its certificate; no admin scope
APP = "5f6b1c3e-0d7a-4a43-9d3b-6a6f2f0c1a11"  # the client whose keys are managed
APP2 = "9a1e7c55-3d0b-4f7e-8a61-2b5c9d4e0f12"
READ, WRITE, MODIFY = "idporten:dcr.read", "idporten:dcr.write", "idporten:dcr.modify"
APP_SCOPE = "test:read"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CLIENTS = {
    ADMIN: [READ, WRITE],
    READER: [READ],
    OTHER: ["test:other"],
    APP: [APP_SCOPE, MODIFY],
    APP2: [APP_SCOPE],
}
REQUIRED_TEXT = "The client requires pre-registered jwk and no key identifier (kid) provided"


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    """One access-token key for every emulator here (RSA keygen is slow)."""
    return new_rsa_key()


@pytest.fixture(scope="module")
def keys() -> list[rsa.RSAPrivateKey]:
    """The app's own keys, made at run time."""
    return [new_rsa_key() for _ in range(3)]


def new_emulator(ca: Issued, signing_key: rsa.RSAPrivateKey, **kwargs: Any) -> Emulator:
    return Emulator(clients=CLIENTS, trust=[ca.cert], signing_key=signing_key, **kwargs)


@pytest.fixture
def emu(ca: Issued, signing_key: rsa.RSAPrivateKey) -> Iterator[Emulator]:
    with new_emulator(ca, signing_key) as emulator:
        yield emulator


def public_jwk(key: rsa.RSAPrivateKey, kid: str, **extra: Any) -> dict[str, Any]:
    jwk: dict[str, Any] = dict(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True))
    return jwk | {"kid": kid, "alg": "RS256", "use": "sig"} | extra


def fresh_kid() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def signed_grant(emu: Emulator, client: str, scope: str, key: Any, headers: dict) -> str:
    body = grant.claims(
        audience=emu.issuer,
        client_id=client,
        scopes=[scope],
        now=emu.now(),
        jti=str(uuid.uuid4()),
    )
    return jwt.encode(body, key, algorithm="RS256", headers=headers)


def token_request(emu: Emulator, assertion: str) -> requests.Response:
    form = {"grant_type": JWT_BEARER, "assertion": assertion}
    return requests.post(emu.token_endpoint, data=form, timeout=5)


def cert_grant(emu: Emulator, leaf: Issued, client: str = APP, scope: str = APP_SCOPE) -> str:
    return signed_grant(emu, client, scope, leaf.key, {"x5c": x5c(leaf.cert)})


def kid_grant(emu: Emulator, key: rsa.RSAPrivateKey, kid: str, client: str = APP) -> str:
    return signed_grant(emu, client, APP_SCOPE, key, {"kid": kid})


def admin_token(emu: Emulator, leaf: Issued, client: str = ADMIN, scope: str = WRITE) -> str:
    resp = token_request(emu, cert_grant(emu, leaf, client, scope))
    assert resp.status_code == 200, resp.text
    return str(resp.json()["access_token"])


def call(
    emu: Emulator,
    method: str,
    token: str | None,
    client: str = APP,
    body: Any = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> requests.Response:
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    if raw is not None:
        sent.setdefault("Content-Type", "application/json")
    url = f"{emu.admin_api}{client}/jwks"
    return requests.request(method, url, json=body, data=raw, headers=sent, timeout=5)


def refused(resp: requests.Response, status: int, error: str, text: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body: dict[str, Any] = resp.json()
    assert set(body) == {"error", "error_description"}, body
    assert body["error"] == error, body
    assert text in body["error_description"], body
    return body


def grant_refused(resp: requests.Response, text: str, code: str | None) -> None:
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["error"] == "invalid_grant"
    assert body["error_description"].startswith(text), body
    if code is None:
        assert "error_uri" not in body
    else:
        assert body["error_uri"] == f"https://maskinporten.no/errors/{code}"


# -- the wire contract -------------------------------------------------------------------------


def test_admin_api_is_under_the_issuer(emu: Emulator) -> None:
    """`admin_api` is the issuer + "clients/", as Digdir's https://api.samarbeid.digdir.no/clients/."""
    assert emu.admin_api == emu.issuer + "clients/"


def test_a_client_without_keys_reads_as_an_empty_set(emu: Emulator, leaf: Issued) -> None:
    """GET for a client that never had keys is 200 {"keys": []}."""
    resp = call(emu, "GET", admin_token(emu, leaf, scope=READ))
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"keys": []}
    assert resp.headers["Content-Type"].startswith("application/json")


def test_post_registers_a_key_and_a_kid_grant_gets_a_token(
    emu: Emulator, leaf: Issued, keys: list[rsa.RSAPrivateKey]
) -> None:
    """POST answers the set with created, last_updated and exp = now + one year per key, GET
    shows the same, and a grant signed with the key under its kid gets a private_key_jwt token."""
    kid = fresh_kid()
    before = emu.now()
    resp = call(emu, "POST", admin_token(emu, leaf), body={"keys": [public_jwk(keys[0], kid)]})
    assert resp.status_code == 200, resp.text
    document = resp.json()
    assert set(document) == {"created", "last_updated", "keys"}
    assert document["created"] == document["last_updated"]
    assert abs(_epoch(document["created"]) - before) < 5
    (key,) = document["keys"]
    assert key == public_jwk(keys[0], kid) | {"exp": key["exp"]}
    assert isinstance(key["exp"], int)
    assert 0 <= key["exp"] - (before + 365 * 86400) < 5
    assert call(emu, "GET", admin_token(emu, leaf, scope=READ)).json() == document
    assert emu.client_keys(APP) == document
    resp = token_request(emu, kid_grant(emu, keys[0], kid))
    assert resp.status_code == 200, resp.text
    claims = jwt.decode(resp.json()["access_token"], options={"verify_signature": False})
    assert claims["client_id"] == APP and claims["client_amr"] == "private_key_jwt"


def _epoch(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_post_and_put_replace_the_whole_set(
    emu: Emulator, leaf: Issued, keys: list[rsa.RSAPrivateKey], method: str
) -> None:
    """POST and PUT each replace the whole set: a key left out is gone, at the admin API and at
    /token ("Unknown key identifier"), and created stays the first upload's."""
    token = admin_token(emu, leaf)
    a, b = fresh_kid(), fresh_kid()
    first = call(
        emu, "POST", token, body={"keys": [public_jwk(keys[0], a), public_jwk(keys[1], b)]}
    )
    assert first.status_code == 200, first.text
    emu.clock_offset += 5
    second = call(emu, method, token, body={"keys": [public_jwk(keys[1], b)]})
    assert second.status_code == 200, second.text
    assert [k["kid"] for k in second.json()["keys"]] == [b]
    assert second.json()["created"] == first.json()["created"]
    assert second.json()["last_updated"] != first.json()["last_updated"]
    grant_refused(
        token_request(emu, kid_grant(emu, keys[0], a)),
        "Invalid assertion. Client authentication failed. Unknown key identifier (kid) for client",
        None,
    )
    assert token_request(emu, kid_grant(emu, keys[1], b)).status_code == 200


def test_delete_empties_the_set(emu: Emulator, leaf: Issued, keys: list[rsa.RSAPrivateKey]) -> None:
    """DELETE answers 204 without a body; the set reads empty, its kid is unknown at /token,
    and the client may sign with its certificate (x5c) again."""
    token = admin_token(emu, leaf)
    kid = fresh_kid()
    assert call(emu, "POST", token, body={"keys": [public_jwk(keys[0], kid)]}).status_code == 200
    resp = call(emu, "DELETE", token)
    assert resp.status_code == 204 and resp.content == b""
    assert call(emu, "GET", token).json() == {"keys": []}
    grant_refused(token_request(emu, kid_grant(emu, keys[0], kid)), "Invalid assertion.", None)
    assert token_request(emu, cert_grant(emu, leaf)).status_code == 200


def test_reposting_the_same_key_renews_its_exp(
    emu: Emulator, leaf: Issued, keys: list[rsa.RSAPrivateKey]
) -> None:
    """Re-posting the set unchanged restarts each key's one-year clock from the new upload."""
    token = admin_token(emu, leaf)
    body = {"keys": [public_jwk(keys[0], fresh_kid()), public_jwk(keys[1], fresh_kid())]}
    old = call(emu, "POST", token, body=body).json()
    emu.clock_offset += 1000
    new = call(emu, "POST", admin_token(emu, leaf), body=body).json()
    moved = [n["exp"] - o["exp"] for o, n in zip(old["keys"], new["keys"], strict=True)]
    assert all(999 <= m <= 1001 for m in moved), moved


def test_a_posted_exp_sooner_than_a_year_is_kept_a_later_one_is_cut(
    emu: Emulator, leaf: Issued, keys: list[rsa.RSAPrivateKey]
) -> None:
    """A key posted with its own exp (okdata-maskinporten-api does) keeps it when sooner than
    now + key lifetime, and gets now + key lifetime when later."""
    now = emu.now()
    soon, late = int(now) + 3600, int(now) + 2 * 365 * 86400
    body = {
        "keys": [
            public_jwk(keys[0], fresh_kid(), exp=soon),
            public_jwk(keys[1], fresh_kid(), exp=late),
        ]
    }
    document = call(emu, "POST", admin_token(emu, leaf), body=body).json()
    assert document["keys"][0]["exp"] == soon
    assert 0 <= document["keys"][1]["exp"] - (now + 365 * 86400) < 5


# -- /token and the registered keys --------------------------------------------------------------


def test_a_grant_with_an_expired_key_gets_mp_121(
    ca: Issued, leaf: Issued, signing_key: rsa.RSAPrivateKey, keys: list[rsa.RSAPrivateKey]
) -> None:
    """With --key-lifetime 60, a kid grant 61 s after the upload is 400 invalid_grant
    "... Expired key" with MP-121; re-posting the key makes it work again."""
    with new_emulator(ca, signing_key, key_lifetime=60) as emu:
        kid = fresh_kid()
        body = {"keys": [public_jwk(keys[0], kid)]}
        document = call(emu, "POST", admin_token(emu, leaf), body=body).json()
        assert 0 <= document["keys"][0]["exp"] - (emu.now() + 60) < 2
        assert token_request(emu, kid_grant(emu, keys[0], kid)).status_code == 200
        emu.clock_offset += 61
        grant_refused(
            token_request(emu, kid_grant(emu, keys[0], kid)),
            "Invalid assertion. Client authentication failed. Expired key (trace_id: ",
            "MP-121",
        )
        assert call(emu, "POST", admin_token(emu, leaf), body=body).status_code == 200
        assert token_request(emu, kid_grant(emu, keys[0], kid)).status_code == 200


def test_a_client_with_registered_keys_refuses_x5c_grants(
    emu: Emulator, leaf: Issued, keys: list[rsa.RSAPrivateKey]
) -> None:
    """Once a client has registered keys, a certificate (x5c) grant is refused with Digdir's
    text and no MP code; another client without keys still signs with its certificate."""
    assert token_request(emu, cert_grant(emu, leaf)).status_code == 200
    call(emu, "POST", admin_token(emu, leaf), body={"keys": [public_jwk(keys[0], fresh_kid())]})
    grant_refused(
        token_request(emu, cert_grant(emu, leaf)),
        f"Invalid assertion. Client authentication failed. {REQUIRED_TEXT} (trace_id: ",
        None,
    )
    assert token_request(emu, cert_grant(emu, leaf, APP2)).status_code == 200


def test_a_kid_of_another_client_is_unknown(
    emu: Emulator, leaf: Issued, keys: list[rsa.RSAPrivateKey]
) -> None:
    """A key registered on one client does not sign for another: "Unknown key identifier"."""
    kid = fresh_kid()
    call(emu, "POST", admin_token(emu, leaf), body={"keys": [public_jwk(keys[0], kid)]})
    grant_refused(
        token_request(emu, kid_grant(emu, keys[0], kid, client=APP2)),
        "Invalid assertion. Client authentication failed. Unknown key identifier (kid) for client",
        None,
    )


def test_a_kid_that_is_not_a_string_is_a_clear_400(
    emu: Emulator, keys: list[rsa.RSAPrivateKey]
) -> None:
    """A grant whose header kid is a JSON array is 400 invalid_request MP-011, not a 500."""
    body = grant.claims(
        audience=emu.issuer, client_id=APP, scopes=[APP_SCOPE], now=emu.now(), jti=str(uuid.uuid4())
    )
    parts = [_b64(json.dumps(x).encode()) for x in ({"alg": "RS256", "kid": ["a"]}, body)]
    signature = keys[0].sign(".".join(parts).encode(), padding.PKCS1v15(), hashes.SHA256())
    resp = token_request(emu, ".".join([*parts, _b64(signature)]))
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == "invalid_request"
    assert resp.json()["error_uri"] == "https://maskinporten.no/errors/MP-011"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_global_jwks_stay_valid_for_every_client(
    ca: Issued, leaf: Issued, signing_key: rsa.RSAPrivateKey, keys: list[rsa.RSAPrivateKey]
) -> None:
    """A key given to the constructor (`jwks=`, the CLI's --jwk) signs for any client, one with
    registered keys of its own included."""
    with new_emulator(ca, signing_key, jwks={"global-kid": keys[2].public_key()}) as emu:
        emu.register_keys(APP, [public_jwk(keys[0], fresh_kid())])
        for client in (APP, APP2):
            resp = token_request(emu, kid_grant(emu, keys[2], "global-kid", client=client))
            assert resp.status_code == 200, resp.text


def test_a_change_reaches_token_only_after_the_propagation_delay(
    ca: Issued, leaf: Issued, signing_key: rsa.RSAPrivateKey, keys: list[rsa.RSAPrivateKey]
) -> None:
    """With propagation 30 s (on the emulator's clock), a posted key shows in GET at once but
    its kid is unknown at /token until 30 s later, while x5c grants still pass; a DELETE
    likewise leaves the key usable until it has propagated."""
    with new_emulator(ca, signing_key, propagation=30) as emu:
        kid = fresh_kid()
        token = admin_token(emu, leaf)
        call(emu, "POST", token, body={"keys": [public_jwk(keys[0], kid)]})
        assert [k["kid"] for k in call(emu, "GET", token).json()["keys"]] == [kid]
        grant_refused(token_request(emu, kid_grant(emu, keys[0], kid)), "Invalid assertion.", None)
        assert token_request(emu, cert_grant(emu, leaf)).status_code == 200
        emu.clock_offset += 29
        assert token_request(emu, kid_grant(emu, keys[0], kid)).status_code == 400
        emu.clock_offset += 2
        assert token_request(emu, kid_grant(emu, keys[0], kid)).status_code == 200
        token = admin_token(emu, leaf)
        assert call(emu, "DELETE", token).status_code == 204
        assert call(emu, "GET", token).json() == {"keys": []}
        assert token_request(emu, kid_grant(emu, keys[0], kid)).status_code == 200
        emu.clock_offset += 31
        assert token_request(emu, kid_grant(emu, keys[0], kid)).status_code == 400
        assert token_request(emu, cert_grant(emu, leaf)).status_code == 200


def test_propagation_is_real_time(
    ca: Issued, leaf: Issued, signing_key: rsa.RSAPrivateKey, keys: list[rsa.RSAPrivateKey]
) -> None:
    """With propagation 0.5 s on the real clock, the new kid is refused at once and accepted
    after the delay."""
    with new_emulator(ca, signing_key, propagation=0.5) as emu:
        kid = fresh_kid()
        started = time.monotonic()
        call(emu, "POST", admin_token(emu, leaf), body={"keys": [public_jwk(keys[0], kid)]})
        assert token_request(emu, kid_grant(emu, keys[0], kid)).status_code == 400
        while token_request(emu, kid_grant(emu, keys[0], kid)).status_code != 200:
            assert time.monotonic() - started < 5
            time.sleep(0.05)
        assert time.monotonic() - started >= 0.5


def test_register_keys_is_effective_at_once(
    ca: Issued, signing_key: rsa.RSAPrivateKey, keys: list[rsa.RSAPrivateKey]
) -> None:
    """register_keys (test setup) skips the propagation delay and returns the admin view;
    a set the API would refuse, or an unknown client, is a ValueError."""
    with new_emulator(ca, signing_key, propagation=3600) as emu:
        kid = fresh_kid()
        document = emu.register_keys(APP, [public_jwk(keys[0], kid)])
        assert document == emu.client_keys(APP) and document["keys"][0]["kid"] == kid
        assert token_request(emu, kid_grant(emu, keys[0], kid)).status_code == 200
        with pytest.raises(ValueError, match=r"keys\[0\]\.alg: only RS256"):
            emu.register_keys(APP, [public_jwk(keys[0], kid, alg="RS512")])
        with pytest.raises(ValueError, match="no client with client_id 'nobody'"):
            emu.register_keys("nobody", [])
        with pytest.raises(ValueError, match="no client"):
            emu.client_keys("nobody")


# -- the set's rules -----------------------------------------------------------------------------


def test_five_keys_pass_six_are_refused(
    emu: Emulator, leaf: Issued, keys: list[rsa.RSAPrivateKey]
) -> None:
    """At most 5 keys per client: 5 are registered, 6 are 400 and the 5 stay."""
    token = admin_token(emu, leaf)
    five = [public_jwk(keys[i % 3], fresh_kid()) for i in range(5)]
    assert call(emu, "POST", token, body={"keys": five}).status_code == 200
    six = [*five, public_jwk(keys[0], fresh_kid())]
    refused(
        call(emu, "POST", token, body={"keys": six}),
        400,
        "invalid_request",
        "keys holds 6 keys; a client may have at most 5",
    )
    assert len(call(emu, "GET", token).json()["keys"]) == 5


def test_a_kid_is_unique_across_all_clients(
    emu: Emulator, leaf: Issued, keys: list[rsa.RSAPrivateKey]
) -> None:
    """A kid registered on one client is refused for another (400 naming the kid); the owner
    may post it again; once the owner drops it, another client may take it."""
    token = admin_token(emu, leaf)
    kid = fresh_kid()
    assert call(emu, "POST", token, body={"keys": [public_jwk(keys[0], kid)]}).status_code == 200
    refused(
        call(emu, "POST", token, APP2, body={"keys": [public_jwk(keys[1], kid)]}),
        400,
        "invalid_request",
        f"keys[0].kid: kid {kid!r} is already registered on another client",
    )
    assert call(emu, "POST", token, body={"keys": [public_jwk(keys[0], kid)]}).status_code == 200
    assert call(emu, "DELETE", token).status_code == 204
    assert (
        call(emu, "POST", token, APP2, body={"keys": [public_jwk(keys[1], kid)]}).status_code == 200
    )


def test_the_same_kid_with_another_key_is_refused(
    emu: Emulator, leaf: Issued, keys: list[rsa.RSAPrivateKey]
) -> None:
    """Re-posting a client's kid with another modulus (n) is 400; the old key stays."""
    token = admin_token(emu, leaf)
    kid = fresh_kid()
    call(emu, "POST", token, body={"keys": [public_jwk(keys[0], kid)]})
    refused(
        call(emu, "PUT", token, body={"keys": [public_jwk(keys[1], kid)]}),
        400,
        "invalid_request",
        f"keys[0].kid: kid {kid!r} is registered with another key (n differs)",
    )
    assert call(emu, "GET", token).json()["keys"][0]["n"] == public_jwk(keys[0], kid)["n"]


def test_a_kid_twice_in_one_set_is_refused(
    emu: Emulator, leaf: Issued, keys: list[rsa.RSAPrivateKey]
) -> None:
    """The same kid twice in one upload is 400 naming the second one."""
    kid = fresh_kid()
    body = {"keys": [public_jwk(keys[0], kid), public_jwk(keys[1], kid)]}
    refused(
        call(emu, "POST", admin_token(emu, leaf), body=body),
        400,
        "invalid_request",
        f"keys[1].kid: kid {kid!r} appears twice in the set",
    )


def _small_key() -> dict[str, Any]:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 (refused)
    return public_jwk(weak, "small")


@pytest.mark.parametrize(
    ("change", "text"),
    [
        *[
            ({name: None}, f"keys[0]: {name} is missing; every key needs kty, alg, use, e, n, kid")
            for name in admin.REQUIRED
        ],
        ({"kty": "EC"}, "keys[0].kty: must be RSA, not 'EC'"),
        ({"alg": "RS512"}, "keys[0].alg: only RS256 is supported, not 'RS512'"),
        ({"use": "enc"}, "keys[0].use: must be sig"),
        ({"kid": 7}, "keys[0].kid: must be a string"),
        ({"kid": ""}, "keys[0].kid: must be 1-200 printable characters without spaces"),
        ({"kid": "two words"}, "keys[0].kid: must be 1-200 printable characters without spaces"),
        ({"kid": "x\x1b[2J"}, "keys[0].kid: must be 1-200 printable characters without spaces"),
        ({"n": "not base64!"}, "keys[0].n: must be base64url"),
        ({"e": "AQAC"}, "keys[0].e: 65538 is not a valid RSA public exponent"),
        ({"n": "_" * 5000}, "keys[0].n: the key has 30000 bits; 2048-16384 are accepted"),
        ({"d": "AQAB"}, "keys[0]: holds private key members (d)"),
        ({"exp": "tomorrow"}, "keys[0].exp: must be a number of seconds since the epoch"),
        ({"exp": 1}, "keys[0].exp: 1 is in the past"),
    ],
)
def test_a_bad_key_is_400_naming_its_field(
    emu: Emulator, leaf: Issued, keys: list[rsa.RSAPrivateKey], change: dict[str, Any], text: str
) -> None:
    """Every key needs kty, alg, use, e, n, kid as strings; RSA, RS256, sig; a real public key
    without private members; a usable exp if any: else 400 naming the key and the field."""
    jwk = public_jwk(keys[0], fresh_kid()) | change
    jwk = {k: v for k, v in jwk.items() if v is not None}
    refused(
        call(emu, "POST", admin_token(emu, leaf), body={"keys": [jwk]}),
        400,
        "invalid_request",
        text,
    )
    assert emu.client_keys(APP) == {"keys": []}


def test_a_key_under_2048_bits_is_refused(emu: Emulator, leaf: Issued) -> None:
    """Digdir names 2048-bit keys: a 1024-bit one is 400 saying how many bits it has."""
    refused(
        call(emu, "POST", admin_token(emu, leaf), body={"keys": [_small_key()]}),
        400,
        "invalid_request",
        "keys[0].n: the key has 1024 bits; 2048-16384 are accepted",
    )


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"{", "the body is not valid JSON (line 1 column 2)"),
        (b"\xff\xfe", "the body is not UTF-8"),
        (b"[" * 20000 + b"]" * 20000, "the body is not usable JSON"),
        (b"", "the body is not valid JSON"),
        (b"[]", 'the body must be a JWK Set: {"keys": [...]}'),
        (b'{"jwks": []}', 'the body must be a JWK Set: {"keys": [...]}'),
        (b'{"keys": {}}', "keys must be an array of JWKs"),
        (b'{"keys": [1]}', "keys[0]: must be a JWK object"),
        (b'{"keys": [{"kty": ["RSA"]}]}', "keys[0].kty: must be a string"),
    ],
)
def test_a_bad_body_is_400_never_a_crash(
    emu: Emulator, leaf: Issued, raw: bytes, text: str
) -> None:
    """Broken JSON, the wrong shape or wrong types are 400 with what is wrong, never a 500."""
    refused(call(emu, "POST", admin_token(emu, leaf), raw=raw), 400, "invalid_request", text)


def test_a_nan_exp_is_refused(emu: Emulator, leaf: Issued, keys: list[rsa.RSAPrivateKey]) -> None:
    """exp NaN (Python's json reads it) is 400 naming exp, not a crash."""
    jwk = json.dumps(public_jwk(keys[0], fresh_kid())).rstrip("}") + ', "exp": NaN}'
    body = ('{"keys": [' + jwk + "]}").encode()
    refused(
        call(emu, "POST", admin_token(emu, leaf), raw=body),
        400,
        "invalid_request",
        "keys[0].exp: must be a number of seconds since the epoch",
    )


def test_a_body_that_is_not_json_by_content_type_is_refused(emu: Emulator, leaf: Issued) -> None:
    """A POST with Content-Type text/plain is 400 naming Content-Type."""
    resp = call(
        emu, "POST", admin_token(emu, leaf), raw=b"{}", headers={"Content-Type": "text/plain"}
    )
    refused(resp, 400, "invalid_request", "Content-Type must be application/json, not text/plain")


def test_a_body_over_the_limit_is_413(emu: Emulator, leaf: Issued) -> None:
    """A body over 64 KiB is 413 with the limit, and the emulator keeps serving."""
    big = b'{"keys": [], "pad": "' + b"x" * (70 << 10) + b'"}'
    refused(
        call(emu, "POST", admin_token(emu, leaf), raw=big),
        413,
        "invalid_request",
        "at most 65536 bytes",
    )
    assert call(emu, "GET", admin_token(emu, leaf)).status_code == 200


# -- authorisation -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE"])
def test_no_token_is_401_with_a_bearer_challenge(emu: Emulator, method: str) -> None:
    """Without Authorization every method is 401 invalid_token with WWW-Authenticate: Bearer."""
    resp = call(emu, method, None, body={"keys": []})
    refused(resp, 401, "invalid_token", "send Authorization: Bearer <a Maskinporten access token")
    assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


def test_a_bad_or_foreign_token_is_401(
    emu: Emulator, ca: Issued, leaf: Issued, signing_key: rsa.RSAPrivateKey
) -> None:
    """Basic auth, a token that is no JWT, one signed by another key, and one from another
    emulator (same key, other issuer) are each 401; a token that has expired is 401 too."""
    issuer_text = f"the access token was not issued by {emu.issuer}"
    basic = call(emu, "GET", None, headers={"Authorization": "Basic dXNlcjpwdw=="})
    refused(basic, 401, "invalid_token", "send Authorization: Bearer")
    refused(call(emu, "GET", "not-a-jwt"), 401, "invalid_token", issuer_text)
    good = jwt.decode(admin_token(emu, leaf), options={"verify_signature": False})
    forged = jwt.encode(good, new_rsa_key(), algorithm="RS256")
    refused(call(emu, "GET", forged), 401, "invalid_token", issuer_text)
    with new_emulator(ca, signing_key) as other:
        foreign = admin_token(other, leaf)
    refused(call(emu, "GET", foreign), 401, "invalid_token", issuer_text)
    token = admin_token(emu, leaf)
    emu.clock_offset += 121
    refused(call(emu, "GET", token), 401, "invalid_token", "the access token has expired")


def test_scopes_decide_read_and_change(
    emu: Emulator, leaf: Issued, keys: list[rsa.RSAPrivateKey]
) -> None:
    """dcr.read reads but cannot change (403 insufficient_scope naming the scopes needed);
    dcr.write and dcr.modify change; a token without an admin scope cannot even read."""
    read = admin_token(emu, leaf, READER, READ)
    assert call(emu, "GET", read).status_code == 200
    for method in ("POST", "PUT", "DELETE"):
        refused(
            call(emu, method, read, body={"keys": []}),
            403,
            "insufficient_scope",
            f"the access token has scope {READ}; this request needs {MODIFY} or {WRITE}",
        )
    assert call(emu, "DELETE", admin_token(emu, leaf, ADMIN, WRITE)).status_code == 204
    other = admin_token(emu, leaf, OTHER, "test:other")
    refused(
        call(emu, "GET", other),
        403,
        "insufficient_scope",
        f"this request needs {MODIFY} or {READ} or {WRITE}",
    )


def test_a_token_of_a_client_signing_with_a_kid_is_403(
    emu: Emulator, leaf: Issued, keys: list[rsa.RSAPrivateKey]
) -> None:
    """The admin client must use its business certificate: a dcr.modify token obtained with a
    registered key (kid) is 403 access_denied."""
    kid = fresh_kid()
    emu.register_keys(APP, [public_jwk(keys[0], kid)])
    grant_ = signed_grant(emu, APP, MODIFY, keys[0], {"kid": kid})
    resp = token_request(emu, grant_)
    assert resp.status_code == 200, resp.text
    refused(
        call(emu, "GET", resp.json()["access_token"]),
        403,
        "access_denied",
        "the admin API takes only tokens of a client that signs with its business certificate",
    )


def test_an_unknown_client_is_404_and_other_paths_too(emu: Emulator, leaf: Issued) -> None:
    """An authorised call for a client the emulator does not know is 404 naming it; a path
    other than /clients/{id}/jwks is 404."""
    token = admin_token(emu, leaf)
    refused(
        call(emu, "GET", token, "nobody"), 404, "not_found", "no client with client_id 'nobody'"
    )
    refused(
        call(emu, "POST", token, "no%0Abody", body={"keys": []}),
        404,
        "not_found",
        "no client with client_id 'no\\nbody'",
    )
    for path in (
        "clients/",
        f"clients/{APP}",
        f"clients/{APP}/jwks/extra",
        f"clients/{APP}/secret",
    ):
        resp = requests.get(
            emu.issuer + path, headers={"Authorization": f"Bearer {token}"}, timeout=5
        )
        refused(resp, 404, "not_found", "no such path")


def test_admin_calls_are_logged_without_the_token(
    emu: Emulator, leaf: Issued, keys: list[rsa.RSAPrivateKey], caplog: pytest.LogCaptureFixture
) -> None:
    """A change is logged with the client and its kids, a refusal with its reason; the bearer
    token never appears in the log."""
    token = admin_token(emu, leaf)
    kid = fresh_kid()
    with caplog.at_level("INFO", logger="mpagent.emulator"):
        call(emu, "POST", token, body={"keys": [public_jwk(keys[0], kid)]})
        call(emu, "POST", token, body={"keys": {}})
    text = caplog.text
    assert f"admin: client {APP}: key set replaced, kids {kid}" in text
    assert "refused: 400 keys must be an array of JWKs" in text
    assert token not in text and token[-20:] not in text


# -- pure rules --------------------------------------------------------------------------------


def test_keystore_versions_propagate_on_a_fake_clock(keys: list[rsa.RSAPrivateKey]) -> None:
    """KeyStore with plain times: each change is in the admin view at once and effective
    `propagation` later, changes in flight arrive in order, and DELETE propagates too."""
    store = admin.KeyStore([APP], lifetime=1000, propagation=10)
    a = {"keys": [public_jwk(keys[0], "a")]}
    b = {"keys": [public_jwk(keys[1], "b")]}
    store.replace(APP, a, now=100)
    store.replace(APP, b, now=105)
    assert [k.kid for k in store.admin_view(APP).keys] == ["b"]
    assert [[k.kid for k in store.effective(APP, t).keys] for t in (109, 110, 114, 115)] == [
        [],
        ["a"],
        ["a"],
        ["b"],
    ]
    store.delete(APP, now=200)
    assert store.admin_view(APP).keys == ()
    assert [k.kid for k in store.effective(APP, 209).keys] == ["b"]
    assert store.effective(APP, 210).keys == ()
    assert store.effective("nobody", 0).keys == ()


def test_key_expiry_is_exact(keys: list[rsa.RSAPrivateKey]) -> None:
    """A key posted at t with lifetime L expires at ceil(t + L): valid before, expired from then."""
    store = admin.KeyStore([APP], lifetime=60)
    (key,) = store.replace(APP, {"keys": [public_jwk(keys[0], "a")]}, now=100.5).keys
    assert key.exp == math.ceil(160.5) == 161
    assert not key.expired(160.9) and key.expired(161)


# -- the CLI ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_key_lifetime_and_propagation(
    tmp_path: Path, ca: Issued, leaf: Issued, keys: list[rsa.RSAPrivateKey]
) -> None:
    """`mpagent emulator --key-lifetime 60 --propagation 1`: a POSTed key gets exp = now + 60,
    its kid is refused at /token at first and accepted about a second later, and the log
    says when the change reaches /token."""
    trust = write_cert_pem(tmp_path / "ca.pem", [ca.cert])
    log = tmp_path / "emulator.log"
    command = [
        sys.executable,
        "-m",
        "mpagent",
        "emulator",
        "--trust",
        str(trust),
        "--client",
        f"{ADMIN}={READ},{WRITE}",
        "--client",
        f"{APP}={APP_SCOPE}",
        "--key-lifetime",
        "60",
        "--propagation",
        "1",
    ]
    with (
        log.open("wb") as stderr,
        subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            preexec_fn=interruptible,
        ) as proc,
    ):
        assert proc.stdout is not None
        try:
            issuer = proc.stdout.readline().decode().strip()
            assert issuer.startswith("http://127.0.0.1:"), log.read_text()
            emu: Any = _Remote(issuer)
            kid = fresh_kid()
            resp = call(
                emu, "POST", admin_token(emu, leaf), body={"keys": [public_jwk(keys[0], kid)]}
            )
            assert resp.status_code == 200, resp.text
            assert 0 <= resp.json()["keys"][0]["exp"] - (time.time() + 60) < 3
            started = time.monotonic()
            assert token_request(emu, kid_grant(emu, keys[0], kid)).status_code == 400
            while token_request(emu, kid_grant(emu, keys[0], kid)).status_code != 200:
                assert time.monotonic() - started < 10, log.read_text()
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            finally:
                proc.kill()
    assert (
        f"admin: client {APP}: key set replaced, kids {kid}; reaches /token in 1 s"
        in log.read_text()
    )


class _Remote:
    """The parts of Emulator the helpers above use, for an emulator in another process."""

    def __init__(self, issuer: str) -> None:
        self.issuer = issuer
        self.token_endpoint = issuer + "token"
        self.admin_api = issuer + "clients/"

    @staticmethod
    def now() -> float:
        return time.time()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--key-lifetime", "0"], "--key-lifetime 0: must be a number of seconds above 0"),
        (["--propagation", "-1"], "--propagation -1: must be a number of seconds, 0 or more"),
        (["--propagation", "nan"], "--propagation nan: must be a number of seconds, 0 or more"),
    ],
)
def test_cli_bad_key_lifetime_or_propagation_exits_78(args: list[str], message: str) -> None:
    """`mpagent emulator` with a key lifetime of 0 or a negative or NaN propagation exits 78
    with one line naming the option."""
    result = run_cli("emulator", *args, timeout=30)
    assert result.returncode == 78, result.stderr
    assert result.stderr == f"mpagent: {message}\n"


def test_constructor_refuses_bad_key_lifetime_and_propagation(ca: Issued) -> None:
    """Emulator(key_lifetime=0) and Emulator(propagation=-1) are ValueErrors, before binding."""
    with pytest.raises(ValueError, match="key_lifetime"):
        Emulator(key_lifetime=0, signing_key=ca.key)
    with pytest.raises(ValueError, match="propagation"):
        Emulator(propagation=-1, signing_key=ca.key)
