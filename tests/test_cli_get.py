"""`mpagent get --no-agent` and `mpagent grant` end to end: the real CLI as a subprocess, real
keystores generated here, the emulator over real HTTP on loopback."""

from __future__ import annotations

import base64
import datetime as dt
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from mpagent.emulator import Emulator, pki

from .conftest import CLIENT_ID, PASSWORD, SCOPES, issuer_key, profile_for, run_cli, write_config
from .keystores import write_cert_pem, write_jks, write_jwk, write_pem

KEY_PASSWORD = "key-pw-2"


def get(config: Path, *args: str, env: dict[str, str] | None = None):
    return run_cli("--config", str(config), "get", *args, "--no-agent", env=env)


def claims_of(token: str) -> dict:
    return jwt.decode(token.strip(), options={"verify_signature": False})


def assert_failed(result, code: int, *fragments: str) -> None:
    """Failure contract: empty stdout, one explanatory stderr line, the right exit status."""
    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("mpagent: "), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


@pytest.fixture
def config(tmp_path: Path, home: Path) -> Path:
    return tmp_path / "config.toml"


# -- every keystore kind and both header modes --------------------------------------------


def test_pkcs12_x5c(config: Path, emulator: Emulator, p12: Path) -> None:
    """A PKCS#12 business certificate gets a token; stdout is exactly the token and a newline."""
    write_config(config, {"dev": profile_for(emulator, p12)})
    result = get(config, SCOPES[0], env={"MPAGENT_KEYSTORE_PASSWORD": PASSWORD})
    assert result.returncode == 0, result.stderr
    token = result.stdout.removesuffix("\n")
    assert "\n" not in token and " " not in token and "\\u003d" not in token
    claims = claims_of(token)
    assert claims["scope"] == SCOPES[0] and claims["client_id"] == CLIENT_ID
    assert claims["consumer"]["ID"] == "0192:" + pki.TEST_ORG_NUMBER


def test_jks_with_separate_key_password(
    config: Path, emulator: Emulator, leaf: pki.Issued, ca: pki.Issued
) -> None:
    """A JKS whose key password differs from the store password works with both set."""
    ks = write_jks(
        config.parent / "ks.jks", {"auth": leaf}, PASSWORD, KEY_PASSWORD, ca_chain=[ca.cert]
    )
    write_config(config, {"dev": profile_for(emulator, ks, alias="AUTH")})
    env = {"MPAGENT_KEYSTORE_PASSWORD": PASSWORD, "MPAGENT_KEY_PASSWORD": KEY_PASSWORD}
    result = get(config, SCOPES[0], env=env)
    assert result.returncode == 0, result.stderr
    assert claims_of(result.stdout)["scope"] == SCOPES[0]


def test_encrypted_pem_with_certificate(config: Path, emulator: Emulator, leaf: pki.Issued) -> None:
    """An encrypted PKCS#8 PEM key plus a certificate file signs in x5c mode."""
    key = write_pem(config.parent / "key.pem", leaf, password=PASSWORD)
    cert = write_cert_pem(config.parent / "cert.pem", [leaf.cert])
    write_config(config, {"dev": profile_for(emulator, key, certificate=cert)})
    result = get(config, SCOPES[0], env={"MPAGENT_KEYSTORE_PASSWORD": PASSWORD})
    assert result.returncode == 0, result.stderr


def test_pkcs1_pem_kid(config: Path, ca: pki.Issued, tmp_path: Path) -> None:
    """A PKCS#1 PEM key registered by kid gets a token; the grant carries kid, not x5c."""
    key = pki.new_rsa_key()
    path = tmp_path / "rsa.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    with Emulator(
        signing_key=issuer_key(), clients={CLIENT_ID: SCOPES}, jwks={"k-2026": key.public_key()}
    ) as emu:
        write_config(config, {"dev": profile_for(emu, path, kid="k-2026")})
        assert get(config, SCOPES[0]).returncode == 0
        grant = run_cli("--config", str(config), "grant", SCOPES[0]).stdout.strip()
    header = json.loads(base64.urlsafe_b64decode(grant.split(".")[0] + "=="))
    assert header == {"alg": "RS256", "kid": "k-2026", "typ": "JWT"}


def test_jwk_with_own_kid(config: Path, tmp_path: Path) -> None:
    """A private JWK with its own kid needs neither kid nor certificate in the config."""
    key = pki.new_rsa_key()
    path = write_jwk(tmp_path / "key.jwk", key, kid="jwk-1")
    with Emulator(
        signing_key=issuer_key(), clients={CLIENT_ID: SCOPES}, jwks={"jwk-1": key.public_key()}
    ) as emu:
        write_config(config, {"dev": profile_for(emu, path)})
        result = get(config, SCOPES[0], "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document) == {"access_token", "token_type", "expires_in", "expires_at", "scope"}
    assert document["token_type"] == "Bearer" and 100 <= document["expires_in"] <= 120


def test_several_scopes_one_token(config: Path, emulator: Emulator, p12: Path) -> None:
    """Several scopes on the command line give one token for the whole set."""
    write_config(config, {"dev": profile_for(emulator, p12)})
    result = get(config, SCOPES[1], SCOPES[0], env={"MPAGENT_KEYSTORE_PASSWORD": PASSWORD})
    assert claims_of(result.stdout)["scope"] == f"{SCOPES[0]} {SCOPES[1]}"
    assert emulator.token_requests == 1


def test_optional_claims_reach_the_issuer(config: Path, emulator: Emulator, p12: Path) -> None:
    """resource and consumer_org from the config are in the grant and shape the token."""
    profile = profile_for(emulator, p12, resource="https://api.example/", consumer_org="123456785")
    write_config(config, {"dev": profile})
    result = get(config, SCOPES[0], env={"MPAGENT_KEYSTORE_PASSWORD": PASSWORD})
    claims = claims_of(result.stdout)
    assert claims["aud"] == "https://api.example/"
    assert claims["consumer"]["ID"] == "0192:123456785"


# -- keystore mistakes through the CLI ----------------------------------------------------


def test_wrong_store_password(config: Path, emulator: Emulator, p12: Path) -> None:
    """A wrong store password: exit 78, the keystore named, nothing on stdout, no password."""
    write_config(config, {"dev": profile_for(emulator, p12)})
    result = get(config, SCOPES[0], env={"MPAGENT_KEYSTORE_PASSWORD": "wrong-pw-123"})
    assert_failed(result, 78, str(p12))
    assert "wrong-pw-123" not in result.stderr


def test_no_password_anywhere(config: Path, emulator: Emulator, p12: Path) -> None:
    """An encrypted keystore with no password source says how to provide one."""
    write_config(config, {"dev": profile_for(emulator, p12)})
    assert_failed(get(config, SCOPES[0]), 78, "MPAGENT_KEYSTORE_PASSWORD", "mpagent secret set dev")


def test_non_repudiation_certificate(
    config: Path, emulator: Emulator, ca: pki.Issued, leaf: pki.Issued
) -> None:
    """A nonRepudiation-only certificate is a warning, not a refusal (Digdir's own test
    keystore is one): the grant is sent, the token printed, the other alias named on stderr."""
    signing = pki.make_leaf(ca, usage="nonRepudiation")
    ks = write_jks(config.parent / "ks.jks", {"sign": signing, "auth": leaf}, PASSWORD, PASSWORD)
    write_config(config, {"dev": profile_for(emulator, ks, alias="sign")})
    result = get(config, SCOPES[0], env={"MPAGENT_KEYSTORE_PASSWORD": PASSWORD})
    assert result.returncode == 0 and result.stdout.startswith("eyJ"), result.stderr
    warned = result.stderr.strip().splitlines()
    assert len(warned) == 1 and warned[0].startswith("mpagent: warning: "), result.stderr
    assert "nonRepudiation" in warned[0] and "auth" in warned[0]
    assert emulator.token_requests == 1


def test_expired_certificate(config: Path, emulator: Emulator, ca: pki.Issued) -> None:
    """An expired certificate is caught before any request, with its dates."""
    now = dt.datetime.now(dt.UTC)
    old = pki.make_leaf(
        ca, not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
    )
    ks = pki.write_pkcs12(config.parent / "old.p12", {"auth": old}, PASSWORD)
    write_config(config, {"dev": profile_for(emulator, ks)})
    result = get(config, SCOPES[0], env={"MPAGENT_KEYSTORE_PASSWORD": PASSWORD})
    assert_failed(result, 78, "expired", str((now - dt.timedelta(days=1)).date()))
    assert emulator.token_requests == 0


def test_config_error_exit_78(config: Path) -> None:
    """A configuration mistake exits 78 naming the file and key."""
    config.write_text('[profiles.a]\nenvironment = "test"\n')
    assert_failed(get(config, "s"), 78, str(config), "[profiles.a]", "is missing")


# -- rejections by the issuer -------------------------------------------------------------


def test_unknown_scope(config: Path, emulator: Emulator, p12: Path) -> None:
    """An unregistered scope: exit 77 with Maskinporten's description and MP code."""
    write_config(config, {"dev": profile_for(emulator, p12)})
    result = get(config, "nav:secret", env={"MPAGENT_KEYSTORE_PASSWORD": PASSWORD})
    assert_failed(result, 77, "invalid_scope", "MP-200", "invalid scopes for client, nav:secret")


def test_unknown_client(config: Path, emulator: Emulator, p12: Path) -> None:
    """An unknown client_id (a test client against prod, typically) is explained."""
    write_config(config, {"dev": profile_for(emulator, p12, client_id="not-registered")})
    result = get(config, SCOPES[0], env={"MPAGENT_KEYSTORE_PASSWORD": PASSWORD})
    assert_failed(result, 77, "MP-100", "test vs prod")


def test_untrusted_certificate(config: Path, p12: Path, other_ca: pki.Issued) -> None:
    """A certificate from a CA the issuer does not trust (test cert in prod): MP-120."""
    with Emulator(
        signing_key=issuer_key(), clients={CLIENT_ID: SCOPES}, trust=[other_ca.cert]
    ) as emu:
        write_config(config, {"dev": profile_for(emu, p12)})
        result = get(config, SCOPES[0], env={"MPAGENT_KEYSTORE_PASSWORD": PASSWORD})
    assert_failed(
        result, 77, "MP-120", "invalid certificate", "test certificates work only in test"
    )


def test_wrong_kid(config: Path, tmp_path: Path) -> None:
    """A kid the client has not registered: exit 77 with the issuer's words."""
    path = write_jwk(tmp_path / "key.jwk", pki.new_rsa_key(), kid="unregistered")
    with Emulator(signing_key=issuer_key(), clients={CLIENT_ID: SCOPES}) as emu:
        write_config(config, {"dev": profile_for(emu, path)})
        assert_failed(get(config, SCOPES[0]), 77, "Unknown key identifier (kid)")


def test_wrong_key_for_kid(config: Path, tmp_path: Path) -> None:
    """A kid registered with another public key: invalid signature, MP-124."""
    path = write_jwk(tmp_path / "key.jwk", pki.new_rsa_key(), kid="k")
    with Emulator(
        signing_key=issuer_key(),
        clients={CLIENT_ID: SCOPES},
        jwks={"k": pki.new_rsa_key().public_key()},
    ) as emu:
        write_config(config, {"dev": profile_for(emu, path)})
        assert_failed(get(config, SCOPES[0]), 77, "MP-124", "wrong alias or key")


def test_clock_ahead(config: Path, ca: pki.Issued, p12: Path) -> None:
    """A local clock 30 s ahead: the issuer refuses and mpagent warns about the clock."""
    with Emulator(
        signing_key=issuer_key(), clients={CLIENT_ID: SCOPES}, trust=[ca.cert], clock_offset=-30
    ) as emu:
        write_config(config, {"dev": profile_for(emu, p12)})
        result = get(config, SCOPES[0], env={"MPAGENT_KEYSTORE_PASSWORD": PASSWORD})
    assert_failed(result, 77, "Issue time is after now", "ahead of Maskinporten")


class _Metadata(http.server.BaseHTTPRequestHandler):
    """Serves metadata that names itself as issuer but the emulator's token endpoint."""

    token_endpoint = ""

    def do_GET(self) -> None:
        host, port = self.server.server_address[:2]
        body = json.dumps(
            {"issuer": f"http://{host}:{port}/", "token_endpoint": self.token_endpoint}
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def mismatched_issuer(emulator: Emulator) -> Iterator[str]:
    handler = type("H", (_Metadata,), {"token_endpoint": emulator.token_endpoint})
    httpd = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def test_wrong_audience(
    config: Path, emulator: Emulator, p12: Path, mismatched_issuer: str
) -> None:
    """An environment whose metadata names another issuer than the token endpoint's: MP-110."""
    write_config(config, {"dev": {**profile_for(emulator, p12), "environment": mismatched_issuer}})
    result = get(config, SCOPES[0], env={"MPAGENT_KEYSTORE_PASSWORD": PASSWORD})
    assert_failed(result, 77, "MP-110", "aud", "check `environment`")


# -- an unreachable or failing issuer -----------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("503", "answered HTTP 503"),
        ("hang", "did not answer: timed out after 1 s"),
        ("garbage", "not a JSON object"),
        ("drop", "closed the connection without an answer"),
    ],
)
def test_issuer_faults(
    config: Path, emulator: Emulator, p12: Path, fault: str, message: str
) -> None:
    """Each fault kind: exit 75, empty stdout, the failure described."""
    write_config(config, {"dev": profile_for(emulator, p12)}, http={"read_timeout": 1})
    emulator.inject(fault)
    result = get(config, SCOPES[0], env={"MPAGENT_KEYSTORE_PASSWORD": PASSWORD})
    assert_failed(result, 75, message)


def test_issuer_unreachable(config: Path, p12: Path) -> None:
    """Nothing listening at the issuer: exit 75, the refusal named with host and port."""
    write_config(config, {"dev": {**profile_for_stub(p12), "environment": "http://127.0.0.1:9/"}})
    result = get(config, SCOPES[0], env={"MPAGENT_KEYSTORE_PASSWORD": PASSWORD})
    assert_failed(result, 75, "cannot reach", "connection refused by 127.0.0.1:9")


def profile_for_stub(keystore: Path) -> dict:
    return {"client_id": CLIENT_ID, "scopes": [SCOPES[0]], "keystore": keystore}


def test_grant_command_prints_only_the_grant(config: Path, emulator: Emulator, p12: Path) -> None:
    """`mpagent grant` prints one signed grant with the documented claims, nothing else."""
    write_config(config, {"dev": profile_for(emulator, p12)})
    result = run_cli(
        "--config", str(config), "grant", SCOPES[0], env={"MPAGENT_KEYSTORE_PASSWORD": PASSWORD}
    )
    assert result.returncode == 0, result.stderr
    claims = claims_of(result.stdout.strip())
    assert set(claims) == {"aud", "iss", "iat", "exp", "jti", "scope"}
    assert claims["aud"] == emulator.issuer and claims["exp"] - claims["iat"] == 120
    assert emulator.token_requests == 0


def _mistake(case: str, tmp: Path, ca: pki.Issued, leaf: pki.Issued) -> tuple[Path, dict, dict]:
    """A keystore with one classic mistake: (keystore, extra profile keys, environment)."""
    store_only = {"MPAGENT_KEYSTORE_PASSWORD": PASSWORD}
    if case == "wrong key password":
        ks = write_jks(tmp / "k.jks", {"auth": leaf}, PASSWORD, KEY_PASSWORD)
        return ks, {}, {**store_only, "MPAGENT_KEY_PASSWORD": "not-the-key-pw"}
    if case == "alias not found":
        ks = write_jks(tmp / "k.jks", {"auth": leaf}, PASSWORD, PASSWORD)
        return ks, {"alias": "signing"}, store_only
    if case == "trusted certificate alias":
        ks = write_jks(
            tmp / "k.jks", {"auth": leaf}, PASSWORD, PASSWORD, trusted={"rootca": ca.cert}
        )
        return ks, {"alias": "rootca"}, store_only
    if case == "key and certificate do not match":
        key = write_pem(tmp / "key.pem", leaf)
        other = write_cert_pem(tmp / "other.pem", [pki.make_leaf(ca).cert])
        return key, {"certificate": other}, {}
    if case == "several keys, no alias":
        ks = write_jks(
            tmp / "k.jks", {"auth": leaf, "auth2": pki.make_leaf(ca)}, PASSWORD, PASSWORD
        )
        return ks, {}, store_only
    assert case == "not yet valid"
    now = dt.datetime.now(dt.UTC)
    future = pki.make_leaf(
        ca, not_before=now + dt.timedelta(days=2), not_after=now + dt.timedelta(days=9)
    )
    return pki.write_pkcs12(tmp / "f.p12", {"auth": future}, PASSWORD), {}, store_only


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("wrong key password", ["key password", "mpagent secret set dev --key"]),
        ("alias not found", ["'signing'", "'auth'"]),
        ("trusted certificate alias", ["'rootca'", "trusted certificate", "'auth'"]),
        ("key and certificate do not match", ["does not belong to the private key"]),
        ("several keys, no alias", ["'auth'", "'auth2'", "alias"]),
        ("not yet valid", ["not valid until", "clock"]),
    ],
)
def test_keystore_mistakes_through_the_cli(
    case: str,
    fragments: list[str],
    config: Path,
    emulator: Emulator,
    ca: pki.Issued,
    leaf: pki.Issued,
) -> None:
    """Each classic keystore mistake: exit 78, empty stdout, a message naming the keystore
    and the fix, no password in it, and no request sent."""
    keystore, extra, env = _mistake(case, config.parent, ca, leaf)
    write_config(config, {"dev": profile_for(emulator, keystore, **extra)})
    result = get(config, SCOPES[0], env=env)
    assert_failed(result, 78, str(keystore), *fragments)
    assert PASSWORD not in result.stderr and "not-the-key-pw" not in result.stderr
    assert emulator.token_requests == 0
