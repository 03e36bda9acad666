"""The emulator's Altinn 3 parts over real HTTP on loopback: the token exchange
(GET /authentication/api/v1/exchange/maskinporten) with access tokens from real grants, its
refusals and faults, its lifetime option, and system users at /token (MP-303)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa

from mpagent import altinn
from mpagent.emulator import Emulator
from mpagent.emulator.pki import new_rsa_key
from mpagent.errors import ConfigError

from .conftest import issuer_key, run_cli
from .test_emulator import (
    CLIENT,
    SCOPE,
    Pki,
    assert_rejected,
    emulator_process,
    grant,
    post,
    write_pem,
)
from .test_emulator import pki as _pki

pki = _pki  # test_emulator's PKI fixture (module scope), shared rather than copied

SERVICEOWNER_SCOPE = "altinn:serviceowner/instances.read"
OTHER_CLIENT = "9a1e7c55-3d0b-4f7e-8a61-2b5c9d4e0f12"
VENDOR = "999999999"  # the organisation number in the test leaf certificate
CUSTOMER = "310702641"  # valid MOD11 check digits
OTHER_CUSTOMER = "123456785"
UNKNOWN_CUSTOMER = "974760673"
NO_TIMES: Any = {"verify_exp": False, "verify_iat": False, "verify_nbf": False}


@pytest.fixture(scope="module")
def altinn_key() -> rsa.RSAPrivateKey:
    """One Altinn signing key for every emulator here (RSA keygen is slow)."""
    return new_rsa_key()


def new_emulator(pki: Pki, altinn_key: rsa.RSAPrivateKey | None, **kwargs: Any) -> Emulator:
    clients = {CLIENT: [SCOPE, SERVICEOWNER_SCOPE], OTHER_CLIENT: [SCOPE]}
    return Emulator(
        clients=clients,
        trust=[pki.ca.cert],
        signing_key=issuer_key(),
        altinn_signing_key=altinn_key,
        **kwargs,
    )


@pytest.fixture(scope="module")
def emu(pki: Pki, altinn_key: rsa.RSAPrivateKey) -> Iterator[Emulator]:
    """Customers CUSTOMER and OTHER_CUSTOMER have a system user for CLIENT; none for others."""
    users = {CLIENT: [CUSTOMER, f"0192:{OTHER_CUSTOMER}"]}
    with new_emulator(pki, altinn_key, systemusers=users) as emulator:
        yield emulator


@pytest.fixture
def fresh(pki: Pki, altinn_key: rsa.RSAPrivateKey) -> Iterator[Emulator]:
    """A private emulator for tests that move its clock, inject faults or count."""
    with new_emulator(pki, altinn_key, hang_seconds=0.3) as emulator:
        yield emulator


def access_token(emu: Any, pki: Pki, **claims: Any) -> str:
    resp = post(emu, grant(emu, pki, **claims))
    assert resp.status_code == 200, resp.text
    return str(resp.json()["access_token"])


def exchange(
    emu: Any, token: str | None, query: str = "", authorization: str | None = None
) -> requests.Response:
    headers = (
        {"Authorization": authorization or f"Bearer {token}"} if token or authorization else {}
    )
    url = emu.issuer.rstrip("/") + altinn.EXCHANGE_PATH + (f"?{query}" if query else "")
    return requests.get(url, headers=headers, timeout=5)


def verified(emu: Emulator, resp: requests.Response) -> dict[str, Any]:
    """The Altinn token's claims, verified with the key the emulator publishes for it."""
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("text/plain")
    discovery = requests.get(emu.issuer + "authentication/api/v1/openid/.well-known/"
                             "openid-configuration", timeout=5).json()  # fmt: skip
    assert discovery["issuer"] == emu.altinn_issuer
    (jwk,) = requests.get(discovery["jwks_uri"], timeout=5).json()["keys"]
    assert jwt.get_unverified_header(resp.text) == {"alg": "RS256", "typ": "JWT", "kid": jwk["kid"]}
    claims: dict[str, Any] = jwt.decode(
        resp.text, jwt.PyJWK(jwk).key, algorithms=["RS256"], issuer=emu.altinn_issuer
    )
    return claims


def unverified(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


# -- the exchange ----------------------------------------------------------------------------


def test_exchange_gives_an_altinn_token_for_its_own_access_token(emu: Emulator, pki: Pki) -> None:
    """An access token from a real grant gets an RS256 Altinn token (text/plain) verifiable
    with the published Altinn key, not the Maskinporten one, with Altinn's claims."""
    token = access_token(emu, pki)
    resp = exchange(emu, token)
    claims = verified(emu, resp)
    assert emu.altinn_exchange == emu.issuer + "authentication/api/v1/exchange/maskinporten"
    assert claims["iss"] == emu.issuer + "authentication/api/v1/openid/"
    assert claims["client_id"] == CLIENT and claims["scope"] == SCOPE
    assert claims["urn:altinn:orgNumber"] == VENDOR
    assert claims["consumer"] == {"authority": "iso6523-actorid-upis", "ID": f"0192:{VENDOR}"}
    assert claims["urn:altinn:authenticatemethod"] == "maskinporten"
    assert claims["exp"] - claims["iat"] == 1800 and abs(claims["iat"] - time.time()) < 5
    mp_key = jwt.PyJWK(requests.get(emu.issuer + "jwk", timeout=5).json()["keys"][0]).key
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(resp.text, mp_key, algorithms=["RS256"], options={"verify_aud": False})


def test_altinn_token_outlives_the_maskinporten_token(pki: Pki, altinn_key: Any) -> None:
    """altinn_lifetime sets the Altinn token's exp - iat, not capped at the Maskinporten
    token's exp (as in Altinn's tt02), so the client's altinn_expiry takes the earlier."""
    with new_emulator(pki, altinn_key, altinn_lifetime=600, token_lifetime=60) as emulator:
        token = access_token(emulator, pki)
        resp = exchange(emulator, token)
        claims = verified(emulator, resp)
    assert claims["exp"] - claims["iat"] == 600
    mp_exp = unverified(token)["exp"]
    assert claims["exp"] > mp_exp
    assert altinn.altinn_expiry(resp.text, mp_exp) == mp_exp


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        (None, "send Authorization: Bearer"),
        ("Basic dXNlcjpwdw==", "send Authorization: Bearer"),
        ("Bearer not-a-jwt", "not issued by this Maskinporten"),
    ],
)
def test_exchange_without_a_readable_bearer_token_is_401(
    emu: Emulator, authorization: str | None, reason: str
) -> None:
    """No Authorization, another scheme or an unreadable token: 401 with a short reason."""
    resp = exchange(emu, None, authorization=authorization)
    assert resp.status_code == 401 and reason in resp.text


def test_exchange_refuses_foreign_and_exchanged_tokens(emu: Emulator, pki: Pki) -> None:
    """A token signed by another key, one from another issuer, and an Altinn token sent back
    to the exchange all get 401, and the answer never holds the token."""
    token = access_token(emu, pki)
    foreign = jwt.encode(unverified(token), new_rsa_key(), algorithm="RS256")
    other_issuer = jwt.encode(unverified(token) | {"iss": "https://maskinporten.no/"},
                              issuer_key(), algorithm="RS256")  # fmt: skip
    altinn_token = exchange(emu, token).text
    for bad in (foreign, other_issuer, altinn_token):
        resp = exchange(emu, bad)
        assert resp.status_code == 401, resp.text
        assert "not issued by this Maskinporten" in resp.text and bad not in resp.text


def test_exchange_refuses_a_token_expired_by_the_emulator_clock(fresh: Emulator, pki: Pki) -> None:
    """A token past its exp by the emulator's own clock (clock_offset) gets 401 "expired"."""
    token = access_token(fresh, pki)
    assert exchange(fresh, token).status_code == 200
    fresh.clock_offset = 121  # the access token lives 120 s
    resp = exchange(fresh, token)
    assert resp.status_code == 401 and "expired" in resp.text


def test_test_flag_gives_testdepartementet(emu: Emulator, pki: Pki) -> None:
    """?test=true makes a service-owner token Testdepartementet's (urn:altinn:org ttd); a test
    value that is no boolean is 400."""
    token = access_token(emu, pki, scope=SERVICEOWNER_SCOPE)
    assert verified(emu, exchange(emu, token, "test=true"))["urn:altinn:org"] == "ttd"
    assert "urn:altinn:org" not in verified(emu, exchange(emu, token))
    assert exchange(emu, token, "test=maybe").status_code == 400


def test_exchange_faults_counters_and_the_given_key(
    fresh: Emulator, pki: Pki, altinn_key: Any
) -> None:
    """inject_exchange("401"/"503") fails the next exchanges, then they work again, signed by
    the given Altinn key; exchange_requests counts every GET, altinn_tokens_issued the tokens;
    /token is untouched."""
    token = access_token(fresh, pki)
    fresh.inject_exchange("401")
    fresh.inject_exchange("503")
    assert exchange(fresh, token).status_code == 401
    assert exchange(fresh, token).status_code == 503
    resp = exchange(fresh, token)
    assert resp.status_code == 200
    jwt.decode(resp.text, altinn_key.public_key(), algorithms=["RS256"], options=NO_TIMES)
    assert fresh.exchange_requests == 3 and fresh.altinn_tokens_issued == 1
    assert fresh.token_requests == 1 and fresh.tokens_issued == 1
    with pytest.raises(ValueError, match="unknown exchange fault 'teapot'"):
        fresh.inject_exchange("teapot")


def test_altinn_key_is_made_on_first_use(pki: Pki) -> None:
    """Without altinn_signing_key the Altinn key is made at the first exchange (an emulator
    that never exchanges pays no keygen) and then kept: two tokens, one kid."""
    with new_emulator(pki, None) as emulator:
        assert emulator._altinn_key is None
        token = access_token(emulator, pki)
        first, second = exchange(emulator, token), exchange(emulator, token)
        verified(emulator, first)
        verified(emulator, second)
    assert (
        jwt.get_unverified_header(first.text)["kid"]
        == jwt.get_unverified_header(second.text)["kid"]
    )


def test_altinn_lifetime_must_be_positive(pki: Pki) -> None:
    """altinn_lifetime below 1 (or not whole seconds) is refused at construction."""
    for bad in (0, -5, 1.5):
        with pytest.raises(ValueError, match="altinn_lifetime"):
            new_emulator(pki, None, altinn_lifetime=bad)


# -- system users ----------------------------------------------------------------------------


def test_systemuser_grant_gets_token_with_systemuser_identifiers(emu: Emulator, pki: Pki) -> None:
    """A grant for an organisation with a system user for the client is accepted; the access
    token's authorization_details hold what was sent plus systemuser_id and system_id (as
    Maskinporten's), and the Altinn token carries them as one object."""
    details = altinn.systemuser_details(CUSTOMER, "ref-1")
    token = access_token(emu, pki, authorization_details=details)
    (detail,) = unverified(token)["authorization_details"]
    assert {k: detail[k] for k in details[0]} == details[0]
    assert detail["system_id"] == f"{VENDOR}_emulator" and len(detail["systemuser_id"]) == 1
    claims = verified(emu, exchange(emu, token))
    assert claims["authorization_details"] == detail
    assert altinn.systemuser_org_of(claims["authorization_details"]) == CUSTOMER
    assert claims["urn:altinn:orgNumber"] == VENDOR  # the vendor authenticated, as in tt02


def test_two_customers_give_two_tokens_each_with_its_org(emu: Emulator, pki: Pki) -> None:
    """One token per customer organisation, each with that organisation inside, and a stable
    system-user id per organisation."""
    ids: dict[str, set[str]] = {}
    for org in (CUSTOMER, OTHER_CUSTOMER, CUSTOMER):
        token = access_token(emu, pki, authorization_details=altinn.systemuser_details(org))
        claims = verified(emu, exchange(emu, token))
        assert altinn.systemuser_org_of(claims["authorization_details"]) == org
        ids.setdefault(org, set()).add(claims["authorization_details"]["systemuser_id"][0])
    assert len(ids[CUSTOMER]) == 1 and ids[CUSTOMER] != ids[OTHER_CUSTOMER]


def test_systemuser_grant_without_system_user_is_mp303(emu: Emulator, pki: Pki) -> None:
    """An organisation without a system user for the client, or a client with none at all,
    gets MP-303 invalid_altinn_customer_configuration naming client and organisation."""
    unknown = altinn.systemuser_details(UNKNOWN_CUSTOMER)
    resp = post(emu, grant(emu, pki, authorization_details=unknown))
    body = assert_rejected(resp, "invalid_altinn_customer_configuration", "MP-303", CLIENT)
    assert f"0192:{UNKNOWN_CUSTOMER}" in body["error_description"]
    other = grant(
        emu, pki, iss=OTHER_CLIENT, authorization_details=altinn.systemuser_details(CUSTOMER)
    )
    assert_rejected(
        post(emu, other), "invalid_altinn_customer_configuration", "MP-303", OTHER_CLIENT
    )


def test_two_systemuser_details_in_one_grant_are_mp303(emu: Emulator, pki: Pki) -> None:
    """Two urn:altinn:systemuser objects in one grant are refused (MP-303), even when both
    organisations have a system user for the client: one object per grant."""
    details = altinn.systemuser_details(CUSTOMER) + altinn.systemuser_details(OTHER_CUSTOMER)
    resp = post(emu, grant(emu, pki, authorization_details=details))
    assert_rejected(resp, "invalid_altinn_customer_configuration", "MP-303", "Only one")


NON_ASCII = "١٢٣٤٥٦٧٨٥"  # 123456785 in Arabic-Indic digits: a regex \d takes them


def test_organisation_numbers_in_non_ascii_digits_are_refused(fresh: Emulator, pki: Pki) -> None:
    """consumer_org and systemuser_org.ID take the ASCII digits 0-9 only (as the client's
    check_org_number), even where every organisation has a system user."""
    resp = post(fresh, grant(fresh, pki, consumer_org=NON_ASCII))
    assert_rejected(resp, "invalid_grant", "MP-011", "9-digit")
    org = {"authority": altinn.AUTHORITY, "ID": altinn.ORG_PREFIX + NON_ASCII}
    detail = {"type": altinn.SYSTEMUSER, "systemuser_org": org}
    resp = post(fresh, grant(fresh, pki, authorization_details=[detail]))
    assert_rejected(resp, "invalid_altinn_customer_configuration", "MP-303", "systemuser_org")


def test_without_systemusers_details_pass_as_sent(fresh: Emulator, pki: Pki) -> None:
    """With no systemusers given, every organisation has a system user: the details reach the
    access token as sent, and the Altinn token as one object."""
    details = altinn.systemuser_details(UNKNOWN_CUSTOMER)
    token = access_token(fresh, pki, authorization_details=details)
    assert unverified(token)["authorization_details"] == details
    assert verified(fresh, exchange(fresh, token))["authorization_details"] == details[0]


def test_from_files_reads_altinn_options(tmp_path: Path, pki: Pki) -> None:
    """from_files takes altinn_lifetime and --systemuser specs ("0192:" accepted); bad ones
    are ConfigErrors naming the option."""
    trust = write_pem(tmp_path / "ca.pem", pki.ca.cert)
    specs = [f"{CLIENT}=0192:{CUSTOMER}", f"{CLIENT}={OTHER_CUSTOMER}"]
    emulator = Emulator.from_files(
        clients=[f"{CLIENT}={SCOPE}"], trust=[trust], altinn_lifetime=300, systemusers=specs
    )
    with emulator:
        assert emulator.systemusers == {CLIENT: {CUSTOMER, OTHER_CUSTOMER}}
        assert emulator.altinn_lifetime == 300
    with pytest.raises(ConfigError, match="--altinn-lifetime 0: must be at least 1 second"):
        Emulator.from_files(altinn_lifetime=0)
    with pytest.raises(ConfigError, match="--systemuser 'x=12': '12' is not a nine-digit"):
        Emulator.from_files(systemusers=["x=12"])


# -- the `mpagent emulator` command ----------------------------------------------------------


def test_cli_altinn_options_end_to_end(tmp_path: Path, pki: Pki) -> None:
    """`mpagent emulator --systemuser CLIENT=ORG --altinn-lifetime 300`: a grant for ORG gets a
    token whose exchange lives 300 s with ORG inside, another org gets MP-303, and the log
    says what was issued and refused."""
    trust = write_pem(tmp_path / "ca.pem", pki.ca.cert)
    args = ["--trust", str(trust), "--client", f"{CLIENT}={SCOPE}"]
    args += ["--systemuser", f"{CLIENT}={CUSTOMER}", "--altinn-lifetime", "300"]
    with emulator_process(tmp_path, *args) as (emu, log):
        token = access_token(emu, pki, authorization_details=altinn.systemuser_details(CUSTOMER))
        resp = exchange(emu, token)
        refused = post(
            emu, grant(emu, pki, authorization_details=altinn.systemuser_details(UNKNOWN_CUSTOMER))
        )
        no_token = exchange(emu, None)
    assert resp.status_code == 200, resp.text
    claims = unverified(resp.text)
    assert claims["exp"] - claims["iat"] == 300
    assert altinn.systemuser_org_of(claims["authorization_details"]) == CUSTOMER
    assert_rejected(refused, "invalid_altinn_customer_configuration", "MP-303", CLIENT)
    assert no_token.status_code == 401
    text = log.read_text()
    assert (
        f"Altinn token issued to client {CLIENT} for the system user of {CUSTOMER}, 300 s" in text
    )
    assert "token request rejected: MP-303" in text and "Altinn exchange refused (401)" in text
    assert token not in text


def test_cli_bad_systemuser_exits_78_naming_it() -> None:
    """`mpagent emulator --systemuser` without '=' or with a bad number exits 78 with one line."""
    result = run_cli("emulator", "--systemuser", "app=12345", timeout=30)
    assert result.returncode == 78, result.stderr
    assert (
        result.stderr == "mpagent: --systemuser 'app=12345': '12345' is not a nine-digit number\n"
    )
