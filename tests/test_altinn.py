"""Altinn 3: the pure policy (altinn.py: exchange targets, organisation numbers, system-user
details, expiry, hints), the emulator's exchange (emulator/altinn.py) driven with real RSA keys
and PyJWT tokens, and the HTTP step (altinnapi.py) against a real loopback HTTP server."""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from mpagent import altinn, altinnapi
from mpagent.emulator import altinn as emulated
from mpagent.emulator import pki
from mpagent.emulator.rules import Rejection
from mpagent.errors import ConfigError, IssuerRejected, IssuerUnavailable

from .conftest import issuer_key

NOW = 1_800_000_000.0
MP_ISSUER = "http://127.0.0.1:1/"
CLIENT = "0f3c1f8e-6d2a-4b8e-9c55-3d1f2a7b9e01"
DIGDIR = "991825827"  # Digdir's test organisation (MASKINPORTEN.md §5)
# The fake clock is not PyJWT's: times are checked against NOW by the code under test.
TIMES_OFF: Any = {"verify_exp": False, "verify_iat": False, "verify_nbf": False}


# -- organisation numbers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first_eight", "digit"),
    [
        # Brønnøysund's own worked example: 3+4+21+24+25+24+21+16 = 138, 138 % 11 = 6, 11-6 = 5.
        ("12345678", 5),
        # 9·3+9·2+1·7+8·6+2·5+5·4+8·3+2·2 = 158, 158 % 11 = 4, 11-4 = 7: 991825827.
        ("99182582", 7),
        # 1·3+4·2 = 11, remainder 0: check digit 0.
        ("10000004", 0),
    ],
)
def test_check_digit_is_mod11_with_brreg_weights(first_eight: str, digit: int) -> None:
    """The check digit is 11 minus the weighted sum (3,2,7,6,5,4,3,2) modulo 11, 0 for 0."""
    assert altinn.check_digit(first_eight) == digit


def test_remainder_one_has_no_check_digit() -> None:
    """Remainder 1 (check digit 10) means no valid number: 1·3+1·3+3·2 = 12, 12 % 11 = 1."""
    assert altinn.check_digit("10000013") is None
    with pytest.raises(ConfigError, match="no check digit fits"):
        altinn.check_org_number("100000130", "systemuser_org")


@pytest.mark.parametrize("value", [DIGDIR, "0192:" + DIGDIR, f" {DIGDIR} "])
def test_org_number_accepted_bare_or_with_icd_prefix(value: str) -> None:
    """A valid number is returned as its nine digits, with or without the "0192:" prefix."""
    assert altinn.check_org_number(value, "systemuser_org") == DIGDIR


def test_bad_check_digit_names_field_and_right_digit() -> None:
    """A mistyped last digit is a ConfigError naming the field and the digit it must be."""
    with pytest.raises(ConfigError) as caught:
        altinn.check_org_number("991825828", "[profiles.vendor] systemuser_org")
    message = str(caught.value)
    assert "[profiles.vendor] systemuser_org" in message
    assert "wrong check digit" in message and "must be 7" in message


@pytest.mark.parametrize(
    "value", ["99182582", "9918258270", "99182582x", "9908:991825827", "٩٩١٨٢٥٨٢٧", "991 825 827"]
)
def test_not_nine_ascii_digits_refused(value: str) -> None:
    """Eight or ten digits, letters, another ICD, non-ASCII digits, spaces: not a number."""
    with pytest.raises(ConfigError, match="nine digits"):
        altinn.check_org_number(value, "consumer_org")


def test_toml_integer_org_number_asks_for_quotes() -> None:
    """An unquoted number in TOML (an int) is refused with the quoted form to write."""
    with pytest.raises(ConfigError, match=f'"{DIGDIR}"'):
        altinn.check_org_number(int(DIGDIR), "systemuser_org")


# -- exchange targets -------------------------------------------------------------------------


def test_named_targets_are_altinns_platform_hosts() -> None:
    """altinn-tt02 and altinn-prod name Altinn's exchange; a test organisation adds ?test=true."""
    path = "/authentication/api/v1/exchange/maskinporten"
    assert altinn.exchange_url("altinn-tt02", False) == "https://platform.tt02.altinn.no" + path
    assert altinn.exchange_url("altinn-prod", False) == "https://platform.altinn.no" + path
    assert altinn.exchange_url("altinn-tt02", True).endswith(path + "?test=true")


def test_url_targets_https_or_loopback_http() -> None:
    """An https URL is taken anywhere, plain http only to a loopback host (the emulator)."""
    url = "https://altinn.example/exchange"
    assert altinn.exchange_url(url, True) == url + "?test=true"
    local = "http://127.0.0.1:8080/authentication/api/v1/exchange/maskinporten"
    assert altinn.exchange_url(local, False) == local
    with pytest.raises(ConfigError, match="plain http"):
        altinn.exchange_url("http://altinn.example/exchange", False)


@pytest.mark.parametrize("target", ["altinn-tt03", "", "ftp://x/", "https://x/e?test=true", 3])
def test_bad_target_refused_naming_key(target: object) -> None:
    """An unknown name, an empty value, another scheme or a URL with a query is a ConfigError
    naming the key."""
    with pytest.raises(ConfigError, match=r"\[profiles.p\] exchange"):
        altinn.check_target(target, "[profiles.p] exchange")


# -- system users -----------------------------------------------------------------------------


def test_systemuser_details_are_altinns_documented_form() -> None:
    """One urn:altinn:systemuser object, ID "0192:" + the number, externalRef only when given."""
    expected = {
        "type": "urn:altinn:systemuser",
        "systemuser_org": {"authority": "iso6523-actorid-upis", "ID": "0192:" + DIGDIR},
    }
    assert altinn.systemuser_details(DIGDIR) == [expected]
    assert altinn.systemuser_details("0192:" + DIGDIR, "ref-1") == [
        expected | {"externalRef": "ref-1"}
    ]


def test_systemuser_details_refuse_bad_number() -> None:
    """A bad organisation number stops the details before any grant is built."""
    with pytest.raises(ConfigError, match="--systemuser-org"):
        altinn.systemuser_details("991825828", field="--systemuser-org")


def test_systemuser_grant_needs_a_scope_and_one_organisation() -> None:
    """A system-user grant without scope, or with two organisations, is refused locally."""
    one = altinn.systemuser_details(DIGDIR)
    altinn.check_systemuser_grant("altinn:systembruker.demo", one)
    with pytest.raises(ConfigError, match="without a scope"):
        altinn.check_systemuser_grant(["  "], one)
    two = one + altinn.systemuser_details("123456785")
    with pytest.raises(ConfigError, match="2 system-user organisations"):
        altinn.check_systemuser_grant("s", two)
    bad = [{"type": "urn:altinn:systemuser", "systemuser_org": {"authority": "x", "ID": "0192:1"}}]
    with pytest.raises(ConfigError, match="systemuser_org must be"):
        altinn.check_systemuser_grant("s", bad)


def test_grant_without_systemuser_needs_nothing_more() -> None:
    """Consent details (or none) are not held to the system-user rules."""
    consent = [{"type": "urn:altinn:consent", "id": str(uuid.uuid4()), "from": "urn:x"}]
    altinn.check_systemuser_grant("", consent)
    altinn.check_systemuser_grant("", [])


def test_systemuser_org_read_from_list_or_object() -> None:
    """The organisation is found in Maskinporten's array and in Altinn's single object."""
    details = altinn.systemuser_details(DIGDIR)
    assert altinn.systemuser_org_of(details) == DIGDIR
    assert altinn.systemuser_org_of(details[0]) == DIGDIR
    assert altinn.systemuser_org_of(None) is None
    assert altinn.systemuser_org_of([{"type": "urn:altinn:consent"}]) is None


# -- expiry -----------------------------------------------------------------------------------


def _unsigned(payload: Any) -> str:
    """A JWT-shaped token with this payload, base64url without padding, not signed."""

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return f"{part(b'{}')}.{part(json.dumps(payload).encode())}.sig"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"exp": NOW + 60}, NOW + 60),  # Altinn's exp earlier: it wins
        ({"exp": NOW + 1800}, NOW + 120),  # Maskinporten's earlier (production's case)
        ({}, NOW + 120),  # no exp
        ({"exp": "soon"}, NOW + 120),
        ({"exp": True}, NOW + 120),
        ([1, 2], NOW + 120),  # payload not an object
    ],
)
def test_expiry_is_the_earlier_of_both(payload: Any, expected: float) -> None:
    """An exchanged token is served until the earlier of its exp and the Maskinporten token's
    expiry; without a readable exp, until the Maskinporten expiry."""
    assert altinn.altinn_expiry(_unsigned(payload), NOW + 120) == expected


@pytest.mark.parametrize(
    "token", ["", "opaque", "a.b", "a.!!!.c", "a.b.c.d", "x." + "e30K" * 3 + ".y"]
)
def test_unreadable_token_falls_back_to_maskinporten_expiry(token: str) -> None:
    """A token that is no JWT, or whose payload is no JSON, is served until the Maskinporten
    token expires."""
    assert altinn.altinn_expiry(token, NOW + 120) == NOW + 120


def test_infinite_exp_ignored() -> None:
    """exp = 1e400 (JSON's infinity) does not make the token immortal or crash."""
    payload = base64.urlsafe_b64encode(b'{"exp": 1e400}').decode().rstrip("=")
    assert altinn.altinn_expiry(f"e30.{payload}.s", NOW + 120) == NOW + 120


# -- hints ------------------------------------------------------------------------------------


def test_rar_hints_name_the_fix() -> None:
    """MP-301/302/303 get hints; MP-303 asks about the system user of the organisation."""
    assert "urn:altinn:systemuser" in altinn.rar_hint("MP-301")
    assert "externalRef" in altinn.rar_hint("MP-302")
    hint = altinn.rar_hint("MP-303", DIGDIR)
    assert f"is there a system user for org {DIGDIR}, approved by that organisation?" in hint
    assert altinn.rar_hint("MP-200") == "" and altinn.rar_hint(None) == ""


# -- the emulator's exchange ------------------------------------------------------------------


@pytest.fixture(scope="module")
def altinn_key() -> rsa.RSAPrivateKey:
    return pki.new_rsa_key()


def mp_token(key: rsa.RSAPrivateKey | None = None, **claims: Any) -> str:
    """A Maskinporten-like access token, signed by the emulator's key unless `key` is given."""
    body = {
        "iss": MP_ISSUER,
        "client_id": CLIENT,
        "scope": "altinn:instances.read",
        "token_type": "Bearer",
        "iat": int(NOW),
        "exp": int(NOW) + 120,
        "jti": str(uuid.uuid4()),
        "consumer": {"authority": "iso6523-actorid-upis", "ID": "0192:" + DIGDIR},
    } | claims
    return jwt.encode(body, key or issuer_key(), algorithm="RS256")


def verify(token: str) -> Mapping[str, Any]:
    """The emulator's verifier: its own signature and issuer; times left to the handler."""
    claims = jwt.decode(token, issuer_key().public_key(), algorithms=["RS256"], options=TIMES_OFF)
    if claims.get("iss") != MP_ISSUER:
        raise ValueError("another issuer")
    return claims


def exchange_with(
    key: rsa.RSAPrivateKey, authorization: str | None, query: str = "", lifetime: int = 1800
) -> tuple[int, bytes, str]:
    return emulated.handle_exchange(
        authorization,
        query,
        verify=verify,
        signing_key=key,
        lifetime=lifetime,
        now=NOW,
        issuer="http://127.0.0.1:1/authentication/api/v1/openid/",
        kid="altinn-1",
    )


def test_emulator_exchanges_its_own_token(altinn_key: rsa.RSAPrivateKey) -> None:
    """An unexpired token of the emulator gets an RS256 Altinn token, as text/plain, with
    Altinn's claims: orgNumber from consumer, scope and client_id carried, its own lifetime."""
    status, body, content_type = exchange_with(altinn_key, f"Bearer {mp_token()}", lifetime=600)
    assert status == 200 and content_type.startswith("text/plain")
    token = body.decode()
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "typ": "JWT", "kid": "altinn-1"}
    claims = jwt.decode(token, altinn_key.public_key(), algorithms=["RS256"], options=TIMES_OFF)
    assert claims["urn:altinn:orgNumber"] == DIGDIR
    assert claims["consumer"]["ID"] == "0192:" + DIGDIR
    assert claims["scope"] == "altinn:instances.read" and claims["client_id"] == CLIENT
    assert claims["urn:altinn:authenticatemethod"] == "maskinporten"
    assert claims["urn:altinn:authlevel"] == 3
    assert claims["iss"].endswith("/authentication/api/v1/openid/")
    assert claims["iat"] == claims["nbf"] == int(NOW) and claims["exp"] == int(NOW) + 600
    assert altinn.altinn_expiry(token, NOW + 120) == NOW + 120  # the client takes the earlier


def test_emulator_carries_systemuser_details_as_one_object(altinn_key: rsa.RSAPrivateKey) -> None:
    """A system-user token's one-element authorization_details comes back as one object, as
    in Altinn's exchanged tokens."""
    details = altinn.systemuser_details("310702641", "ref-9")
    _, body, _ = exchange_with(altinn_key, f"Bearer {mp_token(authorization_details=details)}")
    claims = jwt.decode(body, options={"verify_signature": False})
    assert claims["authorization_details"] == details[0]
    assert altinn.systemuser_org_of(claims["authorization_details"]) == "310702641"


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        (None, b"send Authorization: Bearer"),
        ("", b"send Authorization: Bearer"),
        ("Basic dXNlcjpwdw==", b"send Authorization: Bearer"),
        ("Bearer ", b"send Authorization: Bearer"),
        ("Bearer not-a-jwt", b"not issued by this Maskinporten"),
    ],
)
def test_emulator_refuses_missing_or_unreadable_token(
    altinn_key: rsa.RSAPrivateKey, authorization: str | None, reason: bytes
) -> None:
    """No bearer token, another scheme or an unreadable token: 401 with a short reason."""
    status, body, _ = exchange_with(altinn_key, authorization)
    assert status == 401 and reason in body


def test_emulator_refuses_foreign_and_expired_tokens(altinn_key: rsa.RSAPrivateKey) -> None:
    """A token signed by another key, or from another issuer, or expired by the emulator's
    clock, gets 401."""
    foreign = mp_token(pki.new_rsa_key())
    assert exchange_with(altinn_key, f"Bearer {foreign}")[0] == 401
    assert exchange_with(altinn_key, f"Bearer {mp_token(iss='https://maskinporten.no/')}")[0] == 401
    status, body, _ = exchange_with(altinn_key, f"Bearer {mp_token(exp=int(NOW))}")
    assert status == 401 and b"expired" in body


def test_emulator_test_flag(altinn_key: rsa.RSAPrivateKey) -> None:
    """?test=true makes a service-owner token Testdepartementet's (urn:altinn:org = ttd); a
    test value that is no boolean is a 400."""
    token = mp_token(scope="altinn:serviceowner/instances.read")
    _, body, _ = exchange_with(altinn_key, f"Bearer {token}", "test=True")
    assert jwt.decode(body, options={"verify_signature": False})["urn:altinn:org"] == "ttd"
    _, body, _ = exchange_with(altinn_key, f"Bearer {token}", "test=false")
    assert "urn:altinn:org" not in jwt.decode(body, options={"verify_signature": False})
    assert exchange_with(altinn_key, f"Bearer {token}", "test=maybe")[0] == 400


def test_emulator_systemusers_option_and_mp303() -> None:
    """--systemuser CLIENT=ORG,ORG says which organisations have a system user for a client;
    a grant for any other organisation is refused with MP-303."""
    users = emulated.parse_systemusers([f"{CLIENT}=0192:{DIGDIR}, 310702641", "other=123456785"])
    assert users == {CLIENT: {DIGDIR, "310702641"}, "other": {"123456785"}}
    emulated.check_systemuser(CLIENT, altinn.systemuser_details(DIGDIR), users)
    emulated.check_systemuser(CLIENT, [{"type": "urn:altinn:consent"}], users)
    with pytest.raises(Rejection) as caught:
        emulated.check_systemuser(CLIENT, altinn.systemuser_details("123456785"), users)
    assert caught.value.code == "MP-303"
    assert caught.value.error == "invalid_altinn_customer_configuration"
    for bad in (["no-equals"], [f"{CLIENT}="], [f"{CLIENT}=12345"]):
        with pytest.raises(ValueError, match="--systemuser"):
            emulated.parse_systemusers(bad)


# -- the HTTP step, against a real loopback server --------------------------------------------


class _Altinn(http.server.BaseHTTPRequestHandler):
    """Answers by path: a real exchange (the emulator's handler), a quoted token, refusals,
    failures, garbage, a huge body, a redirect, and a hang."""

    seen: list[dict[str, str]]
    stop: threading.Event
    altinn_key: rsa.RSAPrivateKey

    def do_GET(self) -> None:
        self.seen.append(dict(self.headers.items()) | {"path": self.path})
        path, _, query = self.path.partition("?")
        if path == "/hang":
            self.stop.wait(10)
            return
        if path == "/exchange":
            status, body, kind = exchange_with(
                self.altinn_key, self.headers.get("Authorization"), query
            )
            return self._send(status, body, kind)
        bearer = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        answers: dict[str, tuple[int, bytes, str]] = {
            "/quoted": (200, json.dumps(_unsigned({"exp": 1})).encode(), "application/json"),
            "/401": (401, b"token invalid \x1b[31m" + b"x" * 400, "text/plain"),
            "/echo": (403, f"bad token {bearer}".encode(), "text/plain"),
            "/404": (404, b"", "text/plain"),
            "/500": (500, b"oops", "text/plain"),
            "/429": (429, b"slow down", "text/plain"),
            "/408": (408, b"request timeout", "text/plain"),
            "/204": (204, b"", "text/plain"),
            "/unsigned": (200, _unsigned({"exp": 1})[: -len("sig")].encode(), "text/plain"),
            "/garbage": (200, b"<html>captive portal</html>", "text/html"),
            "/big": (200, b"a." * (40 * 1024), "text/plain"),
        }
        if path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "https://elsewhere.example/login")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._send(*answers[path])

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(altinn_key: rsa.RSAPrivateKey) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A loopback HTTP server (its base URL, and the headers of each request it saw)."""
    seen: list[dict[str, str]] = []
    stop = threading.Event()
    handler = type("H", (_Altinn,), {"seen": seen, "stop": stop, "altinn_key": altinn_key})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    stop.set()
    httpd.shutdown()
    httpd.server_close()


PLACEHOLDER = "mp.token.value"  # the server answers by path; any token will do


def call(
    url: str, token: str = PLACEHOLDER, connect_timeout: float = 1.0, read_timeout: float = 1.0
) -> str:
    return altinnapi.exchange(
        url, token, connect_timeout=connect_timeout, read_timeout=read_timeout
    )


def test_exchange_against_emulated_altinn(server: tuple[str, list[dict[str, str]]]) -> None:
    """A real Maskinporten-like token sent as Bearer (GET, with ?test=true) comes back as the
    Altinn token the emulator's exchange signed."""
    base, seen = server
    token = mp_token()
    altinn_token = call(altinn.exchange_url(base + "/exchange", True), token)
    assert jwt.decode(altinn_token, options={"verify_signature": False})["consumer"]["ID"].endswith(
        DIGDIR
    )
    assert seen[0]["Authorization"] == f"Bearer {token}"
    assert seen[0]["path"] == "/exchange?test=true"


def test_exchange_takes_json_quoted_token(server: tuple[str, list[dict[str, str]]]) -> None:
    """A token answered as a JSON string (Altinn's answer to Accept: application/json) is
    unquoted."""
    base, _ = server
    assert call(base + "/quoted") == _unsigned({"exp": 1})


def test_exchange_401_is_rejected_naming_the_step(server: tuple[str, list[dict[str, str]]]) -> None:
    """A 401 is IssuerRejected (exit 77): "Maskinporten accepted the grant; Altinn's exchange
    answered 401: …", the body escaped and shortened."""
    base, _ = server
    with pytest.raises(IssuerRejected) as caught:
        call(base + "/401")
    message = str(caught.value)
    assert message.startswith("Maskinporten accepted the grant; Altinn's exchange answered 401: ")
    assert "token invalid \\x1b[31m" in message and "\x1b" not in message
    assert "x" * 301 not in message and caught.value.exit_code == 77
    assert caught.value.details["status"] == 401


def test_refusal_never_echoes_the_token(server: tuple[str, list[dict[str, str]]]) -> None:
    """A refusal body that echoes the Maskinporten token shows its fingerprint instead."""
    base, _ = server
    secret = "eyJsecret.eyJpayload.signature-0123"
    with pytest.raises(IssuerRejected) as caught:
        call(base + "/echo", secret)
    assert secret not in str(caught.value) and "…0123(" in str(caught.value)
    assert "answered 403" in str(caught.value)


def test_exchange_404_points_at_the_url(server: tuple[str, list[dict[str, str]]]) -> None:
    """A 404 is a refusal that asks whether `exchange` is the right URL."""
    base, _ = server
    with pytest.raises(IssuerRejected, match="is `exchange` the URL"):
        call(base + "/404")


@pytest.mark.parametrize("path", ["/500", "/429", "/408", "/204"])
def test_exchange_failing_is_unavailable(
    server: tuple[str, list[dict[str, str]]], path: str
) -> None:
    """5xx, 429, 408 and a 2xx other than 200 are IssuerUnavailable (exit 75, retried), not a
    refusal, naming the step and the status."""
    base, _ = server
    with pytest.raises(IssuerUnavailable) as caught:
        call(base + path)
    assert str(caught.value).startswith("Maskinporten accepted the grant; Altinn's exchange")
    assert f"HTTP {path[1:]}" in str(caught.value) and caught.value.exit_code == 75


def test_garbage_200_is_unavailable_without_showing_body(
    server: tuple[str, list[dict[str, str]]],
) -> None:
    """A 200 whose body is no JWT is IssuerUnavailable naming what came (size, type), not the
    body itself."""
    base, _ = server
    with pytest.raises(IssuerUnavailable) as caught:
        call(base + "/garbage")
    assert "not a JWT" in str(caught.value) and "text/html" in str(caught.value)
    assert "captive portal" not in str(caught.value)


def test_unsigned_token_is_not_taken(server: tuple[str, list[dict[str, str]]]) -> None:
    """A 200 whose token has an empty signature segment (alg "none") is not an Altinn token."""
    base, _ = server
    with pytest.raises(IssuerUnavailable, match="not a JWT"):
        call(base + "/unsigned")


def test_huge_answer_refused(server: tuple[str, list[dict[str, str]]]) -> None:
    """An answer over the size limit is refused before it is read whole."""
    base, _ = server
    with pytest.raises(IssuerUnavailable, match="more than 64 KiB"):
        call(base + "/big")


def test_redirect_not_followed(server: tuple[str, list[dict[str, str]]]) -> None:
    """A redirect is not followed (the token would go along): IssuerUnavailable naming it."""
    base, seen = server
    with pytest.raises(IssuerUnavailable, match=r"a redirect to https://elsewhere\.example"):
        call(base + "/redirect")
    assert len(seen) == 1


def test_hang_ends_at_the_deadline(server: tuple[str, list[dict[str, str]]]) -> None:
    """An exchange that never answers ends after connect + read timeout, as unavailable."""
    base, _ = server
    started = time.monotonic()
    with pytest.raises(IssuerUnavailable, match="Altinn's exchange"):
        call(base + "/hang", connect_timeout=0.2, read_timeout=0.3)
    assert time.monotonic() - started < 2


def test_unreachable_exchange_names_the_key() -> None:
    """A refused connection is IssuerUnavailable pointing at `exchange`, not `environment`."""
    with pytest.raises(IssuerUnavailable) as caught:
        call("http://127.0.0.1:9/authentication/api/v1/exchange/maskinporten")
    message = str(caught.value)
    assert message.startswith("Maskinporten accepted the grant; Altinn's exchange failed: ")
    assert "connection refused" in message and "`exchange`" in message
    assert "`environment`" not in message
