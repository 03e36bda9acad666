"""The Maskinporten emulator over real HTTP on loopback, with grants signed by hand."""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import email.utils
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jwt
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mpagent.emulator import Emulator, rules
from mpagent.emulator.pki import Issued, make_ca, make_leaf, new_rsa_key
from mpagent.emulator.server import FAULTS
from mpagent.errors import ConfigError
from mpagent.fullcli import build_parser

from .agentproc import AgentProcess
from .conftest import CLIENT_ID, PASSWORD, SCOPES, issuer_key, run_cli, write_config

CLIENT = "5f6b1c3e-0d7a-4a43-9d3b-6a6f2f0c1a11"
SCOPE = "test:read"
OTHER_SCOPE = "test:write"
KID = "registered-key-1"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
NOW = dt.datetime.now(dt.UTC)


@dataclass
class Pki:
    ca: Issued
    other_ca: Issued
    leaf: Issued  # digitalSignature, issued by ca
    key: rsa.RSAPrivateKey  # the leaf's key, also registered under KID

    def issue(self, ca: Issued | None = None, **kwargs: Any) -> Issued:
        return make_leaf(ca or self.ca, key=self.key, **kwargs)


def interruptible() -> None:
    """In the child: SIGINT back to its default, so Ctrl-C works even when pytest itself was
    started with SIGINT ignored (a shell's background job, `pytest &`)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca, other_ca, key = make_ca(), make_ca("another CA"), new_rsa_key()
    return Pki(ca, other_ca, make_leaf(ca, key=key), key)


def new_emulator(pki: Pki, **kwargs: Any) -> Emulator:
    return Emulator(
        clients={CLIENT: [SCOPE, OTHER_SCOPE]},
        trust=[pki.ca.cert],
        jwks={KID: pki.key.public_key()},
        **{"signing_key": issuer_key(), **kwargs},
    )


@pytest.fixture(scope="module")
def emu(pki: Pki) -> Iterator[Emulator]:
    with new_emulator(pki) as emulator:
        yield emulator


@pytest.fixture
def fresh(pki: Pki) -> Iterator[Emulator]:
    """A private emulator for tests that inject faults or count requests."""
    with new_emulator(pki, hang_seconds=0.3) as emulator:
        yield emulator


def x5c(*certs: x509.Certificate) -> list[str]:
    return [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in certs]


def grant(
    emu: Emulator,
    pki: Pki,
    *,
    key: Any = None,
    headers: dict[str, Any] | None = None,
    algorithm: str = "RS256",
    drop: tuple[str, ...] = (),
    **claims: Any,
) -> str:
    now = int(time.time())
    body = {"aud": emu.issuer, "iss": CLIENT, "iat": now, "exp": now + 120}
    body |= {"jti": str(uuid.uuid4()), "scope": SCOPE} | claims
    for name in drop:
        del body[name]
    return jwt.encode(
        body,
        pki.key if key is None else key,
        algorithm=algorithm,
        headers={"x5c": x5c(pki.leaf.cert)} if headers is None else headers,
    )


def post(emu: Emulator, assertion: str, timeout: float = 5) -> requests.Response:
    form = {"grant_type": JWT_BEARER, "assertion": assertion}
    return requests.post(emu.token_endpoint, data=form, timeout=timeout)


def assert_rejected(
    resp: requests.Response, error: str, code: str | None, text: str, status: int = 400
) -> dict[str, Any]:
    body: dict[str, Any] = resp.json()
    assert resp.status_code == status, body
    assert body["error"] == error
    assert text in body["error_description"]
    assert "(trace_id: " in body["error_description"]
    if code is None:
        assert "error_uri" not in body
    else:
        assert body["error_uri"] == f"https://maskinporten.no/errors/{code}"
    return body


def outcome(emu: Emulator, pki: Pki) -> str:
    """What a client saw for one fresh grant: "token", "503", "garbage" or "lost" (hang, drop)."""
    try:
        resp = post(emu, grant(emu, pki))
    except requests.ConnectionError:
        return "lost"
    if resp.status_code == 503:
        return "503"
    return "token" if "access_token" in resp.text else "garbage"


def decode_token(emu: Emulator, resp: requests.Response, audience: Any = "unspecified") -> dict:
    jwks = requests.get(emu.issuer + "jwk", timeout=5).json()
    key = jwt.PyJWK(jwks["keys"][0])
    token = resp.json()["access_token"]
    assert jwt.get_unverified_header(token)["kid"] == jwks["keys"][0]["kid"]
    claims: dict = jwt.decode(
        token, key.key, algorithms=["RS256"], audience=audience, issuer=emu.issuer
    )
    return claims


# -- metadata and success ---------------------------------------------------------------------


def test_metadata_document_describes_the_emulator(emu: Emulator) -> None:
    """The RFC 8414 document names issuer (trailing slash), endpoints, algorithms and types."""
    resp = requests.get(emu.issuer + ".well-known/oauth-authorization-server", timeout=5)
    assert resp.status_code == 200
    assert resp.json() == {
        "issuer": emu.issuer,
        "token_endpoint": emu.issuer + "token",
        "jwks_uri": emu.issuer + "jwk",
        "token_endpoint_auth_signing_alg_values_supported": ["RS256", "RS384", "RS512"],
        "grant_types_supported": [JWT_BEARER],
        "authorization_details_types_supported": ["urn:altinn:systemuser", "urn:altinn:consent"],
    }
    assert emu.issuer.startswith("http://127.0.0.1:") and emu.issuer.endswith("/")
    assert emu.token_endpoint == emu.issuer + "token"


def test_jwk_document_holds_one_public_signing_key(emu: Emulator) -> None:
    """GET /jwk serves the access-token key as a public RS256 JWK with a kid."""
    (key,) = requests.get(emu.issuer + "jwk", timeout=5).json()["keys"]
    assert key["kty"] == "RSA" and key["alg"] == "RS256" and key["use"] == "sig" and key["kid"]
    assert "d" not in key and key == emu.jwks_document()["keys"][0]


def test_valid_certificate_grant_gets_a_verifiable_token(emu: Emulator, pki: Pki) -> None:
    """A valid x5c grant gets a Bearer token, verifiable with /jwk, for the scope and lifetime."""
    resp = post(emu, grant(emu, pki, scope=f"{SCOPE} {OTHER_SCOPE}"))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 120
    assert body["scope"] == f"{SCOPE} {OTHER_SCOPE}"
    claims = decode_token(emu, resp)
    assert claims["client_id"] == CLIENT
    assert claims["scope"] == f"{SCOPE} {OTHER_SCOPE}"
    assert claims["exp"] - claims["iat"] == 120
    assert abs(claims["iat"] - time.time()) < 5
    assert claims["consumer"] == {"authority": "iso6523-actorid-upis", "ID": "0192:999999999"}


def test_registered_kid_grant_gets_a_token(emu: Emulator, pki: Pki) -> None:
    """A grant with a registered kid (no x5c) is verified with that key and accepted."""
    resp = post(emu, grant(emu, pki, headers={"kid": KID}))
    assert resp.status_code == 200, resp.text
    assert "consumer" not in decode_token(emu, resp)


@pytest.mark.parametrize("resource", ["https://api.example/", ["https://a.example/", "b"]])
def test_resource_becomes_the_token_audience(emu: Emulator, pki: Pki, resource: Any) -> None:
    """The grant's resource (string or array) becomes the access token's aud."""
    resp = post(emu, grant(emu, pki, resource=resource))
    assert resp.status_code == 200, resp.text
    wanted = resource if isinstance(resource, str) else resource[0]
    assert decode_token(emu, resp, audience=wanted)["aud"] == resource


def test_grant_signed_via_intermediate_in_x5c_is_accepted(emu: Emulator, pki: Pki) -> None:
    """A leaf chaining to the trusted CA via an intermediate in x5c passes; without it, MP-120."""
    inter = make_intermediate(pki.ca)
    leaf = pki.issue(inter)
    ok = post(emu, grant(emu, pki, headers={"x5c": x5c(leaf.cert, inter.cert)}))
    assert ok.status_code == 200, ok.text
    refused = post(emu, grant(emu, pki, headers={"x5c": x5c(leaf.cert)}))
    assert_rejected(refused, "invalid_grant", "MP-120", "not issued by a trusted CA")


def test_consumer_org_makes_certificate_org_the_supplier(emu: Emulator, pki: Pki) -> None:
    """With consumer_org the token's consumer is that org and the certificate's org the supplier."""
    resp = post(emu, grant(emu, pki, consumer_org="123456789"))
    assert resp.status_code == 200, resp.text
    claims = decode_token(emu, resp)
    assert claims["consumer"]["ID"] == "0192:123456789"
    assert claims["supplier"]["ID"] == "0192:999999999"


def test_systemuser_authorization_details_are_accepted(emu: Emulator, pki: Pki) -> None:
    """A well-formed system-user authorization_details is accepted and copied into the token."""
    details = [
        {
            "type": "urn:altinn:systemuser",
            "systemuser_org": {"authority": "iso6523-actorid-upis", "ID": "0192:123456789"},
        }
    ]
    resp = post(emu, grant(emu, pki, authorization_details=details))
    assert resp.status_code == 200, resp.text
    assert decode_token(emu, resp)["authorization_details"] == details


def test_responses_carry_the_emulator_clock_in_date(pki: Pki) -> None:
    """The Date header follows the emulator's clock, offset included."""
    with new_emulator(pki, clock_offset=-3600) as skewed:
        resp = requests.get(skewed.issuer + "jwk", timeout=5)
    served = email.utils.parsedate_to_datetime(resp.headers["Date"]).timestamp()
    assert abs(served - (time.time() - 3600)) < 5


# -- rejections -------------------------------------------------------------------------------


def test_wrong_aud_is_rejected(emu: Emulator, pki: Pki) -> None:
    """An aud other than the issuer gets MP-110 "Invalid JWT claim aud"."""
    resp = post(emu, grant(emu, pki, aud="https://maskinporten.no/"))
    assert_rejected(resp, "invalid_grant", "MP-110", "Invalid JWT claim aud")


def test_token_endpoint_as_aud_is_rejected(emu: Emulator, pki: Pki) -> None:
    """The token endpoint URL as aud gets MP-110, with a hint to use the issuer."""
    resp = post(emu, grant(emu, pki, aud=emu.token_endpoint))
    body = assert_rejected(resp, "invalid_grant", "MP-110", "Invalid JWT claim aud")
    assert "token endpoint" in body["error_description"]


def test_aud_without_trailing_slash_is_rejected(emu: Emulator, pki: Pki) -> None:
    """The issuer without its trailing slash gets MP-110: the comparison is exact."""
    resp = post(emu, grant(emu, pki, aud=emu.issuer.rstrip("/")))
    assert_rejected(resp, "invalid_grant", "MP-110", "trailing slash")


def test_unknown_client_is_rejected(emu: Emulator, pki: Pki) -> None:
    """An iss that is no registered client gets MP-100 "Client not found"."""
    resp = post(emu, grant(emu, pki, iss="no-such-client"))
    assert_rejected(resp, "invalid_grant", "MP-100", "Client not found")


def test_unregistered_scope_is_rejected(emu: Emulator, pki: Pki) -> None:
    """A scope not registered on the client gets MP-200 invalid_scope naming the scope."""
    resp = post(emu, grant(emu, pki, scope=f"{SCOPE} other:scope"))
    text = "Token request contains invalid scopes for client, other:scope"
    assert_rejected(resp, "invalid_scope", "MP-200", text)


def test_expired_certificate_is_rejected(emu: Emulator, pki: Pki) -> None:
    """An expired certificate gets MP-120, saying it expired."""
    old = pki.issue(not_before=NOW - dt.timedelta(days=30), not_after=NOW - dt.timedelta(days=1))
    resp = post(emu, grant(emu, pki, headers={"x5c": x5c(old.cert)}))
    body = assert_rejected(
        resp, "invalid_grant", "MP-120", "The JWT is signed with an invalid certificate."
    )
    assert "expired" in body["error_description"]


def test_non_repudiation_certificate_is_accepted(emu: Emulator, pki: Pki) -> None:
    """A nonRepudiation-only certificate signs grants, as Digdir's own test keystore does."""
    signing = pki.issue(usage="nonRepudiation")
    resp = post(emu, grant(emu, pki, headers={"x5c": x5c(signing.cert)}))
    assert resp.status_code == 200, resp.text


def test_certificate_without_signing_usage_is_rejected(emu: Emulator, pki: Pki) -> None:
    """A certificate whose key usage allows no signature at all gets MP-120 saying so."""
    encipher = pki.issue(usage="keyEncipherment")
    resp = post(emu, grant(emu, pki, headers={"x5c": x5c(encipher.cert)}))
    assert_rejected(
        resp,
        "invalid_grant",
        "MP-120",
        "The JWT is signed with an invalid certificate. (certificate key usage allows no signature)",
    )


def test_certificate_from_untrusted_ca_is_rejected(emu: Emulator, pki: Pki) -> None:
    """A certificate from a CA the emulator does not trust gets MP-120."""
    stranger = pki.issue(pki.other_ca)
    resp = post(emu, grant(emu, pki, headers={"x5c": x5c(stranger.cert)}))
    assert_rejected(resp, "invalid_grant", "MP-120", "not issued by a trusted CA")


def test_x5c_as_plain_string_is_rejected(emu: Emulator, pki: Pki) -> None:
    """x5c sent as a string instead of an array gets MP-123 "Invalid JWT header x5c"."""
    resp = post(emu, grant(emu, pki, headers={"x5c": x5c(pki.leaf.cert)[0]}))
    assert_rejected(resp, "invalid_grant", "MP-123", "Invalid JWT header x5c")


def test_unknown_kid_is_rejected(emu: Emulator, pki: Pki) -> None:
    """A kid that is not registered gets "Unknown key identifier (kid) for client"."""
    resp = post(emu, grant(emu, pki, headers={"kid": "nope"}))
    assert_rejected(resp, "invalid_grant", None, "Unknown key identifier (kid) for client")


def test_bad_signature_is_rejected(emu: Emulator, pki: Pki) -> None:
    """A grant signed with a key other than the certificate's gets MP-124."""
    resp = post(emu, grant(emu, pki, key=pki.other_ca.key))
    assert_rejected(resp, "invalid_grant", "MP-124", "Invalid JWT signature")


def test_unsupported_alg_is_rejected(emu: Emulator, pki: Pki) -> None:
    """A grant with an alg other than RS256/384/512 is refused before any key is used."""
    resp = post(emu, grant(emu, pki, key="shared-secret-of-32-bytes-length!", algorithm="HS256"))
    assert_rejected(resp, "invalid_grant", "MP-011", "HS256 is not supported")


def test_rs512_grant_is_accepted(emu: Emulator, pki: Pki) -> None:
    """RS512 is one of the supported grant algorithms."""
    assert post(emu, grant(emu, pki, algorithm="RS512")).status_code == 200


def test_replayed_jti_is_rejected(emu: Emulator, pki: Pki) -> None:
    """The same grant (jti) sent twice gets MP-012 "Grant is used before" the second time."""
    assertion = grant(emu, pki)
    assert post(emu, assertion).status_code == 200
    assert_rejected(post(emu, assertion), "invalid_grant", "MP-012", "Grant is used before")


def test_unknown_claim_is_rejected(emu: Emulator, pki: Pki) -> None:
    """A claim neither documented nor known to pass production (client_id) gets MP-011."""
    resp = post(emu, grant(emu, pki, client_id=CLIENT))
    body = assert_rejected(resp, "invalid_grant", "MP-011", "Invalid assertion")
    assert "claims not allowed in a grant: client_id" in body["error_description"]


def test_nbf_is_accepted(emu: Emulator, pki: Pki) -> None:
    """A grant with nbf = iat, as NAV's digdirator sends to production, gets a token."""
    now = int(time.time())
    resp = post(emu, grant(emu, pki, iat=now, nbf=now, exp=now + 120))
    assert resp.status_code == 200, resp.text


def test_nbf_in_the_future_is_rejected(emu: Emulator, pki: Pki) -> None:
    """An nbf more than 10 s ahead of the emulator's clock is refused, naming nbf."""
    now = int(time.time())
    resp = post(emu, grant(emu, pki, iat=now, nbf=now + 60, exp=now + 120))
    body = assert_rejected(resp, "invalid_grant", None, "JWT is not valid yet")
    reason = r"nbf is (59|60) s ahead of Maskinporten's clock; set nbf to iat, or leave it out"
    assert re.search(reason, body["error_description"]), body


def test_sub_equal_to_client_id_is_accepted(emu: Emulator, pki: Pki) -> None:
    """sub = the client id, as in Altinn's system-user example, gets a token."""
    assert post(emu, grant(emu, pki, sub=CLIENT)).status_code == 200


def test_sub_other_than_client_id_is_rejected(emu: Emulator, pki: Pki) -> None:
    """A sub that is not the client id gets MP-011 saying what sub must be."""
    resp = post(emu, grant(emu, pki, sub="someone-else"))
    assert_rejected(resp, "invalid_grant", "MP-011", "sub must be the client id")


def test_missing_scope_is_rejected(emu: Emulator, pki: Pki) -> None:
    """A grant without scope is an invalid parameter (MP-011)."""
    resp = post(emu, grant(emu, pki, drop=("scope",)))
    assert_rejected(resp, "invalid_grant", "MP-011", "missing claim scope")


def test_iat_ahead_of_emulator_clock_is_rejected(pki: Pki) -> None:
    """A grant more than 10 s ahead of the emulator's clock gets "Issue time is after now"."""
    with new_emulator(pki, clock_offset=-30) as behind:
        resp = post(behind, grant(behind, pki))
    assert_rejected(resp, "invalid_grant", None, "Issue time is after now")


def test_iat_within_ten_seconds_of_skew_is_accepted(pki: Pki) -> None:
    """Up to 10 s of clock difference either way is tolerated."""
    for offset in (-8, 8):
        with new_emulator(pki, clock_offset=offset) as skewed:
            assert post(skewed, grant(skewed, pki)).status_code == 200


def test_iat_far_behind_emulator_clock_is_rejected(emu: Emulator, pki: Pki) -> None:
    """A grant issued more than 10 s before the emulator's now is refused (MP-011)."""
    now = int(time.time())
    resp = post(emu, grant(emu, pki, iat=now - 30, exp=now + 60))
    assert_rejected(resp, "invalid_grant", "MP-011", "behind")


@pytest.mark.parametrize("lifetime", [121, 180])
def test_grant_lifetime_up_to_180_seconds_is_accepted_with_a_warning(
    emu: Emulator, pki: Pki, lifetime: int, caplog: pytest.LogCaptureFixture
) -> None:
    """exp - iat of 121 (the Java tool) to 180 (the server's limit) passes, logging a warning."""
    now = int(time.time())
    with caplog.at_level(logging.WARNING, logger="mpagent.emulator"):
        resp = post(emu, grant(emu, pki, iat=now, exp=now + lifetime))
    assert resp.status_code == 200, resp.text
    [record] = [r for r in caplog.records if r.name == "mpagent.emulator"]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        f"grant from client {CLIENT}: exp - iat is {lifetime} s: accepted, as production allows "
        "up to 180 s, but Maskinporten's docs say at most 120; compute iat and exp from one "
        "clock reading"
    )


def test_grant_lifetime_of_120_seconds_logs_no_warning(
    emu: Emulator, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """The documented exp - iat = 120, what our own client sends, passes without a warning."""
    with caplog.at_level(logging.WARNING, logger="mpagent.emulator"):
        assert post(emu, grant(emu, pki)).status_code == 200
    assert [r for r in caplog.records if r.name == "mpagent.emulator"] == []


def test_grant_lifetime_over_180_seconds_is_rejected(emu: Emulator, pki: Pki) -> None:
    """exp - iat = 181 is refused with MP-011, as production answers 400 over 180 s."""
    now = int(time.time())
    resp = post(emu, grant(emu, pki, iat=now, exp=now + 181))
    assert_rejected(resp, "invalid_grant", "MP-011", "exp - iat is 181 s; at most 180")


def test_expired_grant_is_rejected(emu: Emulator, pki: Pki) -> None:
    """A grant whose exp has passed gets MP-130 "JWT is expired"."""
    now = int(time.time())
    resp = post(emu, grant(emu, pki, iat=now - 100, exp=now - 1))
    assert_rejected(resp, "invalid_grant", "MP-130", "JWT is expired")


def test_unknown_authorization_details_type_is_rejected(emu: Emulator, pki: Pki) -> None:
    """An authorization_details object of an unknown type gets MP-301."""
    resp = post(emu, grant(emu, pki, authorization_details=[{"type": "urn:example:other"}]))
    assert_rejected(resp, "invalid_authorization_details", "MP-301", "urn:example:other")


def test_unknown_authorization_details_field_is_rejected(emu: Emulator, pki: Pki) -> None:
    """An authorization_details object with an unknown field gets MP-302."""
    details = [{"type": "urn:altinn:consent", "id": "x", "from": "y", "extra": 1}]
    resp = post(emu, grant(emu, pki, authorization_details=details))
    assert_rejected(resp, "invalid_authorization_details", "MP-302", "extra")


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"consumer_org": "12345678"}, "9-digit"),
        ({"consumer_org": "123456789", "iss_onbehalfof": "sub"}, "iss_onbehalfof"),
    ],
)
def test_bad_consumer_org_is_rejected(
    emu: Emulator, pki: Pki, claims: dict[str, Any], reason: str
) -> None:
    """consumer_org must be 9 digits and never comes with iss_onbehalfof."""
    assert_rejected(post(emu, grant(emu, pki, **claims)), "invalid_grant", "MP-011", reason)


@pytest.mark.parametrize(
    "form",
    [
        {"grant_type": "client_credentials", "assertion": "x.y.z"},
        {"grant_type": JWT_BEARER},
        {"grant_type": JWT_BEARER, "assertion": "not-a-jwt"},
    ],
)
def test_malformed_token_request_is_rejected(emu: Emulator, form: dict[str, str]) -> None:
    """A wrong grant_type, a missing or non-JWT assertion gets invalid_request MP-011."""
    resp = requests.post(emu.token_endpoint, data=form, timeout=5)
    assert_rejected(resp, "invalid_request", "MP-011", "Invalid assertion. Invalid parameter value")


def test_json_body_is_rejected(emu: Emulator, pki: Pki) -> None:
    """The token request must be form-encoded, not JSON."""
    resp = requests.post(
        emu.token_endpoint, json={"grant_type": JWT_BEARER, "assertion": grant(emu, pki)}, timeout=5
    )
    assert_rejected(resp, "invalid_request", "MP-011", "x-www-form-urlencoded")


# -- faults and counting ------------------------------------------------------------------------


def test_503_fault_then_success(fresh: Emulator, pki: Pki) -> None:
    """An injected 503 answers one request; the next one succeeds."""
    fresh.inject("503")
    first = post(fresh, grant(fresh, pki))
    assert first.status_code == 503 and "Date" in first.headers
    assert post(fresh, grant(fresh, pki)).status_code == 200


def test_garbage_fault_is_200_without_json(fresh: Emulator, pki: Pki) -> None:
    """An injected garbage answer is a 200 whose body is not JSON."""
    fresh.inject("garbage")
    resp = post(fresh, grant(fresh, pki))
    assert resp.status_code == 200
    with pytest.raises(requests.JSONDecodeError):
        resp.json()
    assert post(fresh, grant(fresh, pki)).json()["token_type"] == "Bearer"


def test_drop_fault_closes_without_response(fresh: Emulator, pki: Pki) -> None:
    """An injected drop closes the connection with no response at all."""
    fresh.inject("drop")
    with pytest.raises(requests.ConnectionError):
        post(fresh, grant(fresh, pki))
    assert post(fresh, grant(fresh, pki)).status_code == 200


def test_hang_fault_times_out_then_drops(fresh: Emulator, pki: Pki) -> None:
    """An injected hang outlasts a client read timeout, then drops after hang_seconds."""
    fresh.inject("hang", count=2)
    with pytest.raises(requests.ReadTimeout):
        post(fresh, grant(fresh, pki), timeout=0.1)
    started = time.monotonic()
    with pytest.raises(requests.ConnectionError):
        post(fresh, grant(fresh, pki), timeout=5)
    assert 0.2 < time.monotonic() - started < 2
    assert post(fresh, grant(fresh, pki)).status_code == 200


def test_stop_ends_a_hang(pki: Pki) -> None:
    """stop() releases a hanging request at once instead of waiting hang_seconds."""
    emulator = new_emulator(pki, hang_seconds=30).start()
    emulator.inject("hang")
    errors: list[Exception] = []

    def call() -> None:
        try:
            post(emulator, grant(emulator, pki), timeout=10)
        except requests.RequestException as exc:
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    while emulator.token_requests == 0:
        time.sleep(0.01)
    started = time.monotonic()
    emulator.stop()
    caller.join(timeout=5)
    assert time.monotonic() - started < 2
    assert len(errors) == 1 and isinstance(errors[0], requests.ConnectionError)


def test_serve_forever_returns_after_stop(pki: Pki) -> None:
    """serve_forever() blocks serving requests until stop() is called from another thread."""
    emulator = new_emulator(pki)
    server = threading.Thread(target=emulator.serve_forever)
    server.start()
    assert requests.get(emulator.issuer + "jwk", timeout=5).status_code == 200
    emulator.stop()
    server.join(timeout=5)
    assert not server.is_alive()


def test_serve_forever_stops_quietly_on_ctrl_c() -> None:
    """SIGINT ends a blocking serve_forever() cleanly: exit 0, nothing on stderr."""
    script = (
        "from mpagent.emulator import Emulator\n"
        "e = Emulator()\n"
        "print(e.issuer, flush=True)\n"
        "e.serve_forever()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=interruptible,
    ) as proc:
        try:
            assert proc.stdout is not None
            issuer = proc.stdout.readline().decode().strip()
            assert requests.get(issuer + "jwk", timeout=5).status_code == 200
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=5)
        finally:
            proc.kill()  # a no-op once it has exited; never a hung test
    assert proc.returncode == 0, stderr.decode()
    assert stderr == b""


def test_emulator_checks_certificates_without_mpagent_keys(pki: Pki, tmp_path: Path) -> None:
    """The emulator package judges a grant's certificate with its own code: issuing a token
    for a trusted x5c and refusing an untrusted one never imports mpagent.keys (the client)."""
    trust = tmp_path / "ca.pem"
    trust.write_bytes(pki.ca.cert.public_bytes(serialization.Encoding.PEM))
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from mpagent.emulator import Emulator\n"
        f"clients = [{CLIENT!r} + '=' + {SCOPE!r}]\n"
        "with Emulator.from_files(clients=clients, trust=[Path(sys.argv[1])]) as emu:\n"
        "    print(emu.issuer, emu.token_endpoint, flush=True)\n"
        "    sys.stdin.readline()\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('mpagent'))))\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script, str(trust)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        issuer, token_endpoint = proc.stdout.readline().split()
        emu: Any = SimpleNamespace(issuer=issuer, token_endpoint=token_endpoint)
        trusted = post(emu, grant(emu, pki))
        stranger = pki.issue(pki.other_ca)
        refused = post(emu, grant(emu, pki, headers={"x5c": x5c(stranger.cert)}))
        out, err = proc.communicate("\n", timeout=10)
    assert proc.returncode == 0, err
    assert "access_token" in trusted.json(), trusted.text
    assert_rejected(refused, "invalid_grant", "MP-120", "not issued by a trusted CA")
    loaded = out.split()
    assert "mpagent.emulator.rules" in loaded
    assert [m for m in loaded if m.startswith("mpagent.keys")] == []


def test_faults_are_consumed_in_order(fresh: Emulator, pki: Pki) -> None:
    """Faults queue up: each injected fault answers exactly one request, first in first out."""
    fresh.inject("503", count=2)
    fresh.inject("garbage")
    statuses = [post(fresh, grant(fresh, pki)) for _ in range(4)]
    assert [r.status_code for r in statuses] == [503, 503, 200, 200]
    assert "access_token" not in statuses[2].text
    assert "access_token" in statuses[3].json()


def test_unknown_fault_is_refused(fresh: Emulator) -> None:
    """inject() refuses a fault kind it does not know."""
    with pytest.raises(ValueError, match="unknown fault"):
        fresh.inject("slow")


def test_token_requests_counts_every_post(fresh: Emulator, pki: Pki) -> None:
    """token_requests counts POST /token: successes, rejections and faulted ones; not GETs."""
    fresh.inject("drop")
    with pytest.raises(requests.ConnectionError):
        post(fresh, grant(fresh, pki))
    post(fresh, grant(fresh, pki))
    post(fresh, grant(fresh, pki, iss="unknown"))
    requests.get(fresh.issuer + "jwk", timeout=5)
    assert fresh.token_requests == 3


def test_token_requests_is_thread_safe(fresh: Emulator) -> None:
    """Concurrent requests are all counted."""
    threads = [
        threading.Thread(target=requests.post, args=(fresh.token_endpoint,), kwargs={"timeout": 5})
        for _ in range(20)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fresh.token_requests == 20


def test_injected_faults_are_counted_by_kind(fresh: Emulator, pki: Pki) -> None:
    """faults_served counts injected faults per kind; tokens_issued counts only tokens."""
    fresh.inject("503", count=2)
    fresh.inject("drop")
    assert [outcome(fresh, pki) for _ in range(4)] == ["503", "503", "lost", "token"]
    assert fresh.faults_served == {"503": 2, "hang": 0, "garbage": 0, "drop": 1}
    assert fresh.tokens_issued == 1 and fresh.token_requests == 4


def test_fail_ratio_one_faults_every_request(pki: Pki) -> None:
    """With fail_ratio=1.0 every POST /token faults, and a seed's draws cover all four kinds."""
    with new_emulator(pki, hang_seconds=0.05, fail_ratio=1.0, seed=1) as emulator:
        assert "token" not in [outcome(emulator, pki) for _ in range(12)]
        served = emulator.faults_served
        assert sum(served.values()) == 12 and all(served[kind] for kind in FAULTS)
        assert emulator.tokens_issued == 0 and emulator.token_requests == 12


def test_fail_ratio_half_mixes_tokens_and_faults(pki: Pki) -> None:
    """With fail_ratio=0.5 some requests get tokens, the rest fault; the counters add up."""
    with new_emulator(pki, hang_seconds=0.05, fail_ratio=0.5, seed=1) as emulator:
        seen = [outcome(emulator, pki) for _ in range(40)]
        assert 0 < seen.count("token") < 40
        assert emulator.tokens_issued == seen.count("token")
        assert emulator.token_requests == 40
        assert emulator.tokens_issued + sum(emulator.faults_served.values()) == 40


def test_seed_repeats_faults_after_the_injected_ones(pki: Pki) -> None:
    """The same seed gives the same random faults; injected faults go first and draw nothing."""
    runs = []
    for injected in (0, 1):
        with new_emulator(pki, hang_seconds=0.05, fail_ratio=0.5, seed=4) as emulator:
            emulator.inject("garbage", count=injected)
            runs.append(([outcome(emulator, pki) for _ in range(10 + injected)], emulator))
    (plain, first), (queued, second) = runs
    assert queued == ["garbage", *plain]
    expected = dict(first.faults_served, garbage=first.faults_served["garbage"] + 1)
    assert second.faults_served == expected


def test_counters_add_up_under_concurrent_requests(pki: Pki) -> None:
    """token_requests == tokens_issued + faults served, with random faults and parallel clients."""
    with new_emulator(pki, hang_seconds=0.05, fail_ratio=0.5, seed=2) as emulator:
        threads = [threading.Thread(target=outcome, args=(emulator, pki)) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        served = sum(emulator.faults_served.values())
        assert emulator.token_requests == 20 == emulator.tokens_issued + served


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_fail_ratio_outside_zero_to_one_is_refused(pki: Pki, ratio: float) -> None:
    """A fail_ratio that is no probability raises ValueError."""
    with pytest.raises(ValueError, match="fail_ratio"):
        new_emulator(pki, fail_ratio=ratio)


# -- the rules as plain values --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("iat", "exp", "nbf", "text"),
    [
        (10, 130, None, None),
        (-10, 1, None, None),
        (11, 131, None, "Issue time is after now"),
        (0, 180, None, None),
        (0, 181, None, "exp - iat is 181 s"),
        (-11, 1, None, "behind"),
        (-100, 0, None, "JWT is expired"),
        (0, 120, 10, None),
        (0, 120, 11, "JWT is not valid yet"),
        (0, 120, "soon", "must be numbers"),
    ],
)
def test_grant_time_limits_are_exact(iat: int, exp: int, nbf: Any, text: str | None) -> None:
    """±10 s of skew for iat and nbf and 180 s of grant lifetime pass; one second more does not."""
    now, issuer = 1_700_000_000, "https://mp.example/"
    claims = {"aud": issuer, "iss": CLIENT, "iat": now + iat, "exp": now + exp, "scope": SCOPE}
    if nbf is not None:
        claims["nbf"] = now + nbf if isinstance(nbf, int) else nbf

    def check() -> None:
        rules.check_claims(claims, issuer=issuer, clients={CLIENT: frozenset({SCOPE})}, now=now)

    if text is None:
        check()
    else:
        with pytest.raises(rules.Rejection, match=text):
            check()


# -- from_files ---------------------------------------------------------------------------------


def write_pem(path: Path, *certs: x509.Certificate) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


def test_from_files_builds_a_working_emulator(tmp_path: Path, pki: Pki) -> None:
    """from_files parses CLIENT=scopes, multi-cert PEM trust files and KID=pem keys."""
    trust = write_pem(tmp_path / "trust.pem", pki.other_ca.cert, pki.ca.cert)
    public = tmp_path / "key.pem"
    public.write_bytes(
        pki.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    emulator = Emulator.from_files(
        host="127.0.0.1",
        port=0,
        clients=[f"{CLIENT}={SCOPE},{OTHER_SCOPE}", "other=a:b"],
        trust=[trust],
        jwks=[f"{KID}={public}"],
        token_lifetime=60,
    )
    with emulator:
        assert emulator.clients == {CLIENT: {SCOPE, OTHER_SCOPE}, "other": {"a:b"}}
        by_cert = post(emulator, grant(emulator, pki, scope=OTHER_SCOPE))
        by_kid = post(emulator, grant(emulator, pki, headers={"kid": KID}))
    assert by_cert.json()["expires_in"] == 60
    assert by_kid.status_code == 200


def test_client_lifetime_sets_expires_in_and_token_exp(pki: Pki) -> None:
    """A client's own lifetime is its tokens' expires_in and exp - iat; others get the default."""
    clients = {CLIENT: [SCOPE], "other": [SCOPE]}
    with Emulator(
        clients=clients, trust=[pki.ca.cert], token_lifetime=90, lifetimes={CLIENT: 3599}
    ) as emulator:
        own = post(emulator, grant(emulator, pki))
        default = post(emulator, grant(emulator, pki, iss="other"))
        assert own.json()["expires_in"] == 3599
        claims = decode_token(emulator, own)
        assert claims["exp"] - claims["iat"] == 3599
        assert default.json()["expires_in"] == 90
        assert decode_token(emulator, default)["client_id"] == "other"


def test_from_files_reads_a_client_lifetime(tmp_path: Path, pki: Pki) -> None:
    """--client ID=scopes;lifetime=S gives that client S-second tokens, up to 7200."""
    trust = write_pem(tmp_path / "trust.pem", pki.ca.cert)
    specs = [f"{CLIENT}={SCOPE}; lifetime = 7200", "other=a:b"]
    with Emulator.from_files(clients=specs, trust=[trust], token_lifetime=60) as emulator:
        assert emulator.clients == {CLIENT: {SCOPE}, "other": {"a:b"}}
        assert emulator.lifetimes == {CLIENT: 7200} and emulator.token_lifetime == 60
        resp = post(emulator, grant(emulator, pki))
    assert resp.json()["expires_in"] == 7200


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"clients": ["no-equals-sign"]}, "--client"),
        ({"clients": ["id="]}, "--client"),
        ({"clients": ["id=a;lifetime=7201"]}, "--client 'id=a;lifetime=7201': lifetime 7201"),
        ({"clients": ["id=a;lifetime=0"]}, "at least 1 second"),
        ({"clients": ["id=a;lifetime=1h"]}, "lifetime '1h' is not a whole number of seconds"),
        ({"clients": ["id=a;ttl=60"]}, "unknown option 'ttl'"),
        ({"clients": ["id=a;lifetime=60;lifetime=90"]}, "lifetime is given twice"),
        ({"token_lifetime": 7201}, "--token-lifetime 7201: Maskinporten gives a client at most"),
        ({"trust": ["/nonexistent/ca.pem"]}, "--trust"),
        ({"jwks": ["just-a-kid"]}, "--jwk"),
        ({"jwks": ["kid=/nonexistent/key.pem"]}, "--jwk"),
        ({"token_lifetime": 0}, "--token-lifetime"),
    ],
)
def test_from_files_bad_input_names_the_argument(kwargs: dict[str, Any], named: str) -> None:
    """Bad CLI-style input raises ConfigError naming the offending argument."""
    args: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "clients": [], "trust": []}
    args |= {"jwks": [], "token_lifetime": 120} | kwargs
    with pytest.raises(ConfigError, match=named):
        Emulator.from_files(**args)


def test_from_files_rejects_non_pem_trust_file(tmp_path: Path) -> None:
    """A trust file without a PEM certificate raises ConfigError naming --trust and the file."""
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"--trust .*ca\.pem"):
        Emulator.from_files(host="127.0.0.1", port=0, clients=[], trust=[bogus], jwks=[],
                            token_lifetime=120)  # fmt: skip


def test_from_files_port_in_use_is_a_config_error(emu: Emulator) -> None:
    """A port that is already taken raises ConfigError instead of OSError."""
    port = int(emu.issuer.rsplit(":", 1)[1].strip("/"))
    with pytest.raises(ConfigError, match="cannot listen"):
        Emulator.from_files(host="127.0.0.1", port=port, clients=[], trust=[], jwks=[],
                            token_lifetime=120)  # fmt: skip


# -- the `mpagent emulator` command -----------------------------------------------------------


@contextlib.contextmanager
def emulator_process(tmp_path: Path, *args: str) -> Iterator[tuple[Any, Path]]:
    """The real `mpagent emulator` command: its issuer (stdout's first line) and its stderr log."""
    log = tmp_path / "emulator.log"
    command = [sys.executable, "-m", "mpagent", "emulator", *args]
    with (
        log.open("wb") as stderr,
        subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            preexec_fn=interruptible,
        ) as proc,
    ):
        assert proc.stdout is not None
        try:
            issuer = proc.stdout.readline().decode().strip()
            assert issuer.startswith("http://127.0.0.1:"), log.read_text()
            yield SimpleNamespace(issuer=issuer, token_endpoint=issuer + "token"), log
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            finally:
                proc.kill()  # a no-op once it has exited; never a hung test


def test_cli_client_lifetime_reaches_get_json_and_a_long_grant_is_logged(
    tmp_path: Path, home: Path, ca: Issued, leaf: Issued, p12: Path
) -> None:
    """`mpagent emulator --client 'ID=S;lifetime=3599'`: get --json (agent and --no-agent) shows
    that lifetime, and a 121 s grant is served with a warning in the emulator's log."""
    trust = write_pem(tmp_path / "ca.pem", ca.cert)
    client = f"{CLIENT_ID}={SCOPES[0]},{SCOPES[1]};lifetime=3599"
    with emulator_process(tmp_path, "--trust", str(trust), "--client", client) as (emu, log):
        profile = {"environment": emu.issuer, "client_id": CLIENT_ID, "scopes": [SCOPES[0]]}
        config = write_config(tmp_path / "config.toml", {"dev": profile | {"keystore": p12}})
        env = {"MPAGENT_KEYSTORE_PASSWORD": PASSWORD, "MPAGENT_NO_AUTOSTART": "1"}
        agent = AgentProcess(config, tmp_path / "agent.log", env=env).wait_ready()
        try:
            through_agent = run_cli("--config", str(config), "get", SCOPES[0], "--json", env=env)
        finally:
            agent.stop()
        here = run_cli("--config", str(config), "get", SCOPES[1], "--json", "--no-agent", env=env)
        now = int(time.time())
        claims = {"aud": emu.issuer, "iss": CLIENT_ID, "iat": now, "exp": now + 121}
        claims |= {"jti": str(uuid.uuid4()), "scope": SCOPES[0]}
        long = jwt.encode(claims, leaf.key, algorithm="RS256", headers={"x5c": x5c(leaf.cert)})
        resp = post(emu, long)
    for result in (through_agent, here):
        assert result.returncode == 0, result.stderr
        assert 3590 <= json.loads(result.stdout)["expires_in"] <= 3599, result.stdout
    assert resp.status_code == 200, resp.text
    assert resp.json()["expires_in"] == 3599
    text = log.read_text()
    assert f"WARNING grant from client {CLIENT_ID}: exp - iat is 121 s: accepted" in text
    assert text.count(f"INFO token issued to client {CLIENT_ID}") == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--client", "app=a:read;lifetime=7201"],
            "--client 'app=a:read;lifetime=7201': lifetime 7201: Maskinporten gives a client "
            "at most 7200 s (2 hours); use 7200 or less",
        ),
        (
            ["--client", "app=a:read;ttl=60"],
            "--client 'app=a:read;ttl=60': unknown option 'ttl'; "
            "expected CLIENT_ID=SCOPE[,SCOPE...][;lifetime=SECONDS]",
        ),
        (
            ["--client", "app=a:read;lifetime=1h"],
            "--client 'app=a:read;lifetime=1h': lifetime '1h' is not a whole number of seconds",
        ),
        (
            ["--client", "app:a:read"],
            "--client 'app:a:read': expected CLIENT_ID=SCOPE[,SCOPE...][;lifetime=SECONDS]",
        ),
        (
            ["--token-lifetime", "7201"],
            "--token-lifetime 7201: Maskinporten gives a client at most 7200 s (2 hours); "
            "use 7200 or less",
        ),
    ],
)
def test_cli_bad_lifetime_or_client_syntax_exits_78_naming_it(
    args: list[str], message: str
) -> None:
    """`mpagent emulator` with a bad --client or a lifetime over 7200 s exits 78 with one line."""
    result = run_cli("emulator", *args, timeout=30)
    assert result.returncode == 78, result.stderr
    assert result.stdout == ""
    assert result.stderr == f"mpagent: {message}\n"


def test_cli_help_describes_every_emulator_option_with_its_default() -> None:
    """`mpagent emulator --help` exits 0 and every option has a help text stating its default."""
    [subparsers] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    options = [a for a in subparsers.choices["emulator"]._actions if a.dest != "help"]
    own = {"host", "port", "client", "trust", "jwk", "token_lifetime"}
    assert own <= {a.dest for a in options}
    for action in options:
        assert action.help and "(default: " in action.help, action.option_strings
    result = run_cli("emulator", "--help", timeout=30)
    assert result.returncode == 0, result.stderr
    flat = " ".join(result.stdout.split())
    for action in options:
        assert " ".join(action.help.split()) in flat, action.help
    assert "lifetime=3599" in flat and "(default: 120, Maskinporten's default)" in flat


def make_intermediate(ca: Issued) -> Issued:
    key = new_rsa_key()
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "throwaway intermediate")])
    usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(key, cert)
