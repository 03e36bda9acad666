"""mpagent.keys: every keystore kind loads into a SigningKey, and every classic key-material mistake is
its own KeystoreError that names the file, says what to do and never shows a password."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from mpagent.config import Profile
from mpagent.emulator import Emulator, pki
from mpagent.emulator.pki import write_pkcs12
from mpagent.errors import (
    ConfigError,
    IssuerRejected,
    KeystoreError,
    MpagentError,
    SecretUnavailable,
)
from mpagent.exchange import Exchange, load_key, may_be_the_certificate
from mpagent.issuer import Issuer
from mpagent.keys import (
    ERROR,
    WARNING,
    SigningKey,
    certificate_problems,
    detect_type,
    key_usages,
    load_signing_key,
)
from mpagent.keys.jks import unsupported as jks_unsupported
from tests.conftest import CLIENT_ID, SCOPES, issuer_key, profile_for, run_cli, write_config
from tests.keystores import (
    StaticPasswords,
    write_cert_pem,
    write_jks,
    write_jwk,
    write_pem,
)

STORE_PW = "störe-pw-Ægir-1"  # non-ASCII on purpose: the encodings differ per format
KEY_PW = "key-pw-2"
ASCII_PW = "store-pw-4"  # keytool refuses non-ASCII PKCS#12 passwords
WRONG_PW = "wrong-pw-3"
_DER = serialization.Encoding.DER


@dataclass(frozen=True)
class Material:
    ca: pki.Issued
    auth: pki.Issued  # key usage digitalSignature: the one to sign grants with
    sign: pki.Issued  # key usage nonRepudiation only
    other: pki.Issued  # an unrelated key and certificate


@pytest.fixture(scope="module")
def m() -> Material:
    ca = pki.make_ca()
    return Material(
        ca, pki.make_leaf(ca), pki.make_leaf(ca, usage="nonRepudiation"), pki.make_leaf(ca)
    )


@pytest.fixture(scope="module")
def multi_p12(m: Material, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A keytool-made PKCS#12 with the authentication and the signing key, like Buypass's."""
    path = tmp_path_factory.mktemp("multi") / "buypass.p12"
    return write_pkcs12(path, {"Auth": m.auth, "sign": m.sign}, ASCII_PW, ca_chain=[m.ca.cert])


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


def _verifies(key: SigningKey, issued: pki.Issued) -> bool:
    signature = key.private_key.sign(b"grant", padding.PKCS1v15(), hashes.SHA256())
    issued.key.public_key().verify(signature, b"grant", padding.PKCS1v15(), hashes.SHA256())
    return True


def _fails(
    check: str,
    path: Path,
    *hints: str,
    error: type[MpagentError] = KeystoreError,
    passwords: StaticPasswords | None = None,
    names: Path | None = None,
    **kwargs: Any,
) -> MpagentError:
    """Load, expect `error` with `check`, its message naming `path` and holding every hint,
    and no password anywhere in the message or details; the error survives the wire.
    The file named is `path` unless `names` says otherwise."""
    with pytest.raises(ConfigError) as info:
        load_signing_key(path, passwords=passwords or StaticPasswords(STORE_PW), **kwargs)
    exc = info.value
    assert type(exc) is error
    assert exc.details["check"] == check
    assert str(names or path) in exc.message
    for hint in hints:
        assert hint in exc.message
    wire = json.dumps(exc.to_wire(), ensure_ascii=False)
    for password in (STORE_PW, KEY_PW, WRONG_PW, ASCII_PW):
        assert password not in exc.message
        assert password not in wire
        assert password not in str(exc.__cause__)
    back = MpagentError.from_wire(json.loads(wire))
    assert (type(back), back.message) == (error, exc.message)
    return exc


# --- every kind loads -------------------------------------------------------------------------


Factory = Callable[[Path, Material], tuple[Path, dict[str, Any]]]

KINDS: dict[str, Factory] = {
    "pkcs12": lambda d, m: (write_pkcs12(d / "a.p12", {"auth": m.auth}, STORE_PW), {}),
    "jks": lambda d, m: (write_jks(d / "a.jks", {"auth": m.auth}, STORE_PW, STORE_PW), {}),
    "pem": lambda d, m: (write_pem(d / "a.pem", m.auth, STORE_PW, include_cert=True), {}),
    "jwk": lambda d, m: (
        write_jwk(d / "a.json", m.auth.key),
        {"certificate": write_cert_pem(d / "c.pem", [m.auth.cert])},
    ),
}


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_is_detected_from_content(kind: str, m: Material, tmp_path: Path) -> None:
    """detect_type recognises JKS, PKCS#12, PEM and JWK from the bytes, not the file name."""
    path, _ = KINDS[kind](tmp_path, m)
    renamed = path.rename(tmp_path / "keystore.bin")
    assert detect_type(renamed.read_bytes()) == kind


@pytest.mark.parametrize("data", [b"", b"hello", b'{"keys": []}', b"[1, 2]"])
def test_detect_type_rejects_unknown_content(data: bytes) -> None:
    """Content that is none of the four formats is a ValueError, not a guess."""
    with pytest.raises(ValueError):
        detect_type(data)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_signs_verifiably_with_the_leaf(kind: str, m: Material, tmp_path: Path) -> None:
    """Every kind yields the authentication key; its signature verifies with the leaf's key."""
    path, kwargs = KINDS[kind](tmp_path, m)
    key = load_signing_key(path, passwords=StaticPasswords(STORE_PW), **kwargs)
    assert key.chain[0] == m.auth.cert
    assert _verifies(key, m.auth)


def test_pkcs12_single_key(m: Material, tmp_path: Path) -> None:
    """A one-key PKCS#12 needs no alias; x5c is the chain leaf first; one password prompt."""
    path = write_pkcs12(tmp_path / "v.p12", {"auth": m.auth}, STORE_PW, ca_chain=[m.ca.cert])
    passwords = StaticPasswords(STORE_PW)
    key = load_signing_key(path, passwords=passwords)
    assert key.chain == (m.auth.cert, m.ca.cert)
    assert key.x5c() == [
        base64.b64encode(c.public_bytes(_DER)).decode() for c in (m.auth.cert, m.ca.cert)
    ]
    assert key.fingerprint == _sha(m.auth.cert.public_bytes(_DER))
    assert key.kid is None
    assert key.source == f"{path} (entry 'auth')"
    assert (passwords.store_asks, passwords.key_asks) == (1, 0)


def test_x5c_is_standard_base64(m: Material, tmp_path: Path) -> None:
    """x5c entries are standard (not url-safe) base64 DER that decode strictly."""
    path = write_pkcs12(tmp_path / "v.p12", {"auth": m.auth}, STORE_PW, ca_chain=[m.ca.cert])
    key = load_signing_key(path, passwords=StaticPasswords(STORE_PW))
    decoded = [base64.b64decode(x, validate=True) for x in key.x5c()]
    assert decoded == [c.public_bytes(_DER) for c in key.chain]


@pytest.mark.parametrize("alias", ["auth", "AUTH", "Auth"])
def test_multi_key_pkcs12_picks_alias_case_insensitively(
    alias: str, m: Material, multi_p12: Path
) -> None:
    """In a keytool-made two-key PKCS#12, the alias picks its key and chain, in any case."""
    key = load_signing_key(multi_p12, alias=alias, passwords=StaticPasswords(ASCII_PW))
    assert key.chain == (m.auth.cert, m.ca.cert)
    assert key.source == f"{multi_p12} (entry 'auth')"
    assert _verifies(key, m.auth)


def test_multi_key_pkcs12_signing_alias_loads_in_kid_mode(m: Material, multi_p12: Path) -> None:
    """Without x5c the certificate's key usage does not matter, so the other key loads too."""
    key = load_signing_key(
        multi_p12, alias="sign", x5c_mode=False, passwords=StaticPasswords(ASCII_PW)
    )
    assert key.chain[0] == m.sign.cert
    assert _verifies(key, m.sign)


def test_pkcs12_loads_without_pyasn1(
    m: Material, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without pyasn1 a one-key PKCS#12 still loads through cryptography alone."""
    monkeypatch.setitem(sys.modules, "pyasn1_modules", None)
    path = write_pkcs12(tmp_path / "v.p12", {"auth": m.auth}, STORE_PW, ca_chain=[m.ca.cert])
    key = load_signing_key(path, alias="auth", passwords=StaticPasswords(STORE_PW))
    assert key.chain == (m.auth.cert, m.ca.cert)


def test_multi_key_pkcs12_needs_no_pyasn1(
    m: Material, multi_p12: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without pyasn1 both keys of a two-key PKCS#12 are still found, each under its alias."""
    monkeypatch.setitem(sys.modules, "pyasn1", None)
    monkeypatch.setitem(sys.modules, "pyasn1_modules", None)
    key = load_signing_key(multi_p12, alias="auth", passwords=StaticPasswords(ASCII_PW))
    assert key.source == f"{multi_p12} (entry 'auth')" and _verifies(key, m.auth)
    sign = load_signing_key(
        multi_p12, alias="sign", x5c_mode=False, passwords=StaticPasswords(ASCII_PW)
    )
    assert sign.chain[0] == m.sign.cert and _verifies(sign, m.sign)


def test_jks_with_separate_key_password(m: Material, tmp_path: Path) -> None:
    """A JKS key protected by its own password opens with Passwords.key()."""
    path = write_jks(tmp_path / "v.jks", {"auth": m.auth}, STORE_PW, KEY_PW, ca_chain=[m.ca.cert])
    passwords = StaticPasswords(STORE_PW, KEY_PW)
    key = load_signing_key(path, alias="AUTH", passwords=passwords)
    assert key.chain == (m.auth.cert, m.ca.cert)
    assert key.source == f"{path} (entry 'auth')"
    assert (passwords.store_asks, passwords.key_asks) == (1, 1)
    assert _verifies(key, m.auth)


def test_jks_key_password_is_not_asked_when_store_password_opens_key(
    m: Material, tmp_path: Path
) -> None:
    """When the key shares the store password, the key password is never asked for."""
    path = write_jks(tmp_path / "v.jks", {"auth": m.auth}, STORE_PW, STORE_PW)
    passwords = StaticPasswords(STORE_PW)
    load_signing_key(path, passwords=passwords)
    assert passwords.key_asks == 0


def test_encrypted_pkcs8_pem_with_certificate_file(m: Material, tmp_path: Path) -> None:
    """An encrypted PKCS#8 PEM opens with the store password; `certificate` gives the chain."""
    path = write_pem(tmp_path / "k.pem", m.auth, password=STORE_PW)
    chain = write_cert_pem(tmp_path / "chain.pem", [m.auth.cert, m.ca.cert])
    passwords = StaticPasswords(STORE_PW)
    key = load_signing_key(path, certificate=chain, passwords=passwords)
    assert key.chain == (m.auth.cert, m.ca.cert)
    assert key.source == str(path)
    assert passwords.store_asks == 1


def test_pkcs1_pem_with_included_certificate_needs_no_password(m: Material, tmp_path: Path) -> None:
    """An unencrypted PKCS#1 PEM with its certificate after the key loads without a password."""
    path = write_pem(tmp_path / "k.pem", m.auth, pkcs1=True, include_cert=True)
    assert b"BEGIN RSA PRIVATE KEY" in path.read_bytes()
    passwords = StaticPasswords(None)
    key = load_signing_key(path, passwords=passwords)
    assert key.chain == (m.auth.cert,)
    assert (passwords.store_asks, passwords.key_asks) == (0, 0)


def test_pem_with_certificate_before_key(m: Material, tmp_path: Path) -> None:
    """A PEM file may hold its certificate before the key."""
    path = write_pem(tmp_path / "k.pem", m.auth, cert_first=True)
    key = load_signing_key(path, passwords=StaticPasswords(None))
    assert key.chain == (m.auth.cert,)


def test_certificate_chain_is_ordered_leaf_first(m: Material, tmp_path: Path) -> None:
    """A certificate file listing the CA before the leaf still yields the chain leaf first."""
    path = write_pem(tmp_path / "k.pem", m.auth)
    chain = write_cert_pem(tmp_path / "chain.pem", [m.ca.cert, m.auth.cert])
    key = load_signing_key(path, certificate=chain, passwords=StaticPasswords(None))
    assert key.chain == (m.auth.cert, m.ca.cert)


def test_jwk_without_certificate_in_kid_mode(m: Material, tmp_path: Path) -> None:
    """A bare JWK loads for kid mode: no chain, its kid, a fingerprint of the public key."""
    path = write_jwk(tmp_path / "k.json", m.auth.key, kid="2024-key")
    passwords = StaticPasswords(None)
    key = load_signing_key(path, x5c_mode=False, passwords=passwords)
    spki = m.auth.key.public_key().public_bytes(
        _DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert (key.chain, key.kid, key.fingerprint) == ((), "2024-key", _sha(spki))
    assert key.x5c() == []
    assert (passwords.store_asks, passwords.key_asks) == (0, 0)
    assert _verifies(key, m.auth)


def test_jwk_with_own_kid_needs_no_certificate(m: Material, tmp_path: Path) -> None:
    """A JWK with its own kid is sent with that kid, so x5c mode asks for no certificate."""
    path = write_jwk(tmp_path / "k.json", m.auth.key, kid="k1")
    key = load_signing_key(path, passwords=StaticPasswords(None))
    assert (key.chain, key.kid) == ((), "k1")


def test_jwk_with_certificate_file(m: Material, tmp_path: Path) -> None:
    """A JWK with `certificate` can be sent as x5c and keeps its kid."""
    path = write_jwk(tmp_path / "k.json", m.auth.key, kid="k1")
    cert = write_cert_pem(tmp_path / "c.pem", [m.auth.cert, m.ca.cert])
    key = load_signing_key(path, certificate=cert, passwords=StaticPasswords(None))
    assert (key.chain, key.kid) == ((m.auth.cert, m.ca.cert), "k1")
    assert key.fingerprint == _sha(m.auth.cert.public_bytes(_DER))


def test_jwk_with_embedded_x5c(m: Material, tmp_path: Path) -> None:
    """The JWK's own x5c array is its certificate chain."""
    path = write_jwk(tmp_path / "k.json", m.auth.key, x5c=[m.auth.cert, m.ca.cert])
    key = load_signing_key(path, passwords=StaticPasswords(None))
    assert key.chain == (m.auth.cert, m.ca.cert)


def test_minimal_jwk_with_only_n_e_d(m: Material, tmp_path: Path) -> None:
    """A private JWK with only n, e and d (no CRT values) still loads."""
    path = write_jwk(tmp_path / "k.json", m.auth.key)
    jwk = json.loads(path.read_text())
    path.write_text(json.dumps({k: jwk[k] for k in ("kty", "n", "e", "d")}))
    key = load_signing_key(path, x5c_mode=False, passwords=StaticPasswords(None))
    assert _verifies(key, m.auth)


@pytest.mark.parametrize("name", ["P12", "pfx", "PKCS12"])
def test_keystore_type_overrides_detection(name: str, m: Material, tmp_path: Path) -> None:
    """keystore_type is case-insensitive and accepts p12/pfx for PKCS#12."""
    path = write_pkcs12(tmp_path / "v.bin", {"auth": m.auth}, STORE_PW)
    key = load_signing_key(path, keystore_type=name, passwords=StaticPasswords(STORE_PW))
    assert key.chain[0] == m.auth.cert


def test_repr_shows_no_key_material(m: Material, tmp_path: Path) -> None:
    """repr(SigningKey) shows source, kid and fingerprint, never key numbers or PEM."""
    path = write_jwk(tmp_path / "k.json", m.auth.key, kid="k1")
    key = load_signing_key(path, x5c_mode=False, passwords=StaticPasswords(None))
    text = repr(key)
    assert key.fingerprint in text and "k1" in text and str(path) in text
    numbers = m.auth.key.private_numbers()
    for secret in (numbers.d, numbers.p, numbers.q, numbers.public_numbers.n):
        assert str(secret) not in text and hex(secret)[2:20] not in text
    assert "PRIVATE" not in text


# --- every mistake is its own error ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pkcs12", "jks", "pem"])
def test_wrong_store_password(kind: str, m: Material, tmp_path: Path) -> None:
    """A wrong store password says so and where to set the right one, in every format."""
    path, _ = KINDS[kind](tmp_path, m)
    _fails(
        "wrong_store_password",
        path,
        "password is wrong",
        "MPAGENT_KEYSTORE_PASSWORD",
        passwords=StaticPasswords(WRONG_PW),
    )


def test_wrong_key_password(m: Material, tmp_path: Path) -> None:
    """A JKS key password that differs from the store password points at MPAGENT_KEY_PASSWORD."""
    path = write_jks(tmp_path / "v.jks", {"auth": m.auth}, STORE_PW, KEY_PW)
    exc = _fails(
        "wrong_key_password",
        path,
        "'auth'",
        "MPAGENT_KEY_PASSWORD",
        "mpagent secret set <profile> --key",
        passwords=StaticPasswords(STORE_PW, WRONG_PW),
    )
    assert "store password" in exc.message


def test_key_password_not_given_for_separately_protected_jks_key(
    m: Material, tmp_path: Path
) -> None:
    """With only the store password known, a separately protected key is a wrong key password."""
    path = write_jks(tmp_path / "v.jks", {"auth": m.auth}, STORE_PW, KEY_PW)
    _fails("wrong_key_password", path, "MPAGENT_KEY_PASSWORD", passwords=StaticPasswords(STORE_PW))


def test_alias_not_found_lists_private_key_aliases(multi_p12: Path) -> None:
    """An unknown alias names the aliases that hold private keys."""
    exc = _fails(
        "alias_not_found",
        multi_p12,
        "'nope'",
        "'auth'",
        "'sign'",
        passwords=StaticPasswords(ASCII_PW),
        alias="nope",
    )
    assert exc.details["aliases"] == ["auth", "sign"]


def test_alias_not_found_in_jks_omits_trusted_certificates(m: Material, tmp_path: Path) -> None:
    """In JKS, the listed aliases are the private-key entries, not trusted certificates."""
    path = write_jks(
        tmp_path / "v.jks", {"auth": m.auth}, STORE_PW, STORE_PW, trusted={"rootca": m.ca.cert}
    )
    exc = _fails("alias_not_found", path, "'auth'", "Set `alias`", alias="mykey")
    assert "rootca" not in exc.message


def test_trusted_certificate_alias(m: Material, tmp_path: Path) -> None:
    """An alias naming a trusted-certificate entry says it has no private key."""
    path = write_jks(
        tmp_path / "v.jks", {"auth": m.auth}, STORE_PW, STORE_PW, trusted={"rootca": m.ca.cert}
    )
    _fails(
        "trusted_cert_alias", path, "'ROOTCA'", "without a private key", "'auth'", alias="ROOTCA"
    )


def test_trusted_certificate_alias_in_pkcs12(m: Material, tmp_path: Path) -> None:
    """In PKCS#12, a named certificate without a key is a trusted-certificate alias too."""
    path = write_pkcs12(
        tmp_path / "v.p12", {"auth": m.auth}, STORE_PW, trusted={"rootca": m.ca.cert}
    )
    _fails(
        "trusted_cert_alias", path, "'rootca'", "without a private key", "'auth'", alias="rootca"
    )


@pytest.mark.parametrize("x5c_mode", [True, False])
def test_key_and_certificate_mismatch(x5c_mode: bool, m: Material, tmp_path: Path) -> None:
    """A certificate of another key is refused in both modes, naming the certificate file."""
    path = write_pem(tmp_path / "k.pem", m.auth)
    cert = write_cert_pem(tmp_path / "other.pem", [m.other.cert])
    _fails(
        "key_certificate_mismatch",
        path,
        str(cert),
        "does not belong",
        "Invalid JWT signature",
        certificate=cert,
        x5c_mode=x5c_mode,
    )


def test_non_repudiation_certificate_loads_with_a_warning_naming_the_other_alias(
    m: Material, multi_p12: Path
) -> None:
    """In a two-key PKCS#12, the nonRepudiation entry loads; its warning names it and 'auth'."""
    key = load_signing_key(multi_p12, alias="sign", passwords=StaticPasswords(ASCII_PW))
    assert key.chain[0] == m.sign.cert and _verifies(key, m.sign)
    [warning] = key.warnings
    assert warning.startswith(f"{multi_p12} (entry 'sign'): the certificate (TEST ORGANISASJON")
    assert "key usage nonRepudiation, not digitalSignature" in warning
    assert "Maskinporten may refuse it (MP-120)" in warning
    assert 'set `alias = "auth"`' in warning


def test_authentication_entry_of_a_two_key_pkcs12_has_no_warning(multi_p12: Path) -> None:
    """The digitalSignature entry of the same keystore loads without any warning."""
    key = load_signing_key(multi_p12, alias="auth", passwords=StaticPasswords(ASCII_PW))
    assert key.warnings == () and key.problems == ()


def test_digdir_like_non_repudiation_keystore_loads_with_a_warning(tmp_path: Path) -> None:
    """A one-key keystore like Digdir's published test one (Buypass Class 3 Test4, org.
    991825827, nonRepudiation only) loads; the warning says to use the authentication one."""
    ca = pki.make_ca("Buypass Class 3 Test4 CA G2 ST Business")
    digdir = pki.make_leaf(ca, org_number="991825827", name="DIGDIR TEST", usage="nonRepudiation")
    path = write_pkcs12(tmp_path / "digdir.p12", {"digdir": digdir}, STORE_PW, [ca.cert])
    key = load_signing_key(path, passwords=StaticPasswords(STORE_PW))
    [warning] = key.warnings
    assert warning.startswith(f"{path} (entry 'digdir'): the certificate (DIGDIR TEST, org. no.")
    assert "991825827" in warning and "nonRepudiation, not digitalSignature" in warning
    assert "use the authentication certificate (key usage digitalSignature)" in warning
    assert "alias =" not in warning


def test_non_repudiation_certificate_in_pem_loads_with_a_warning(
    m: Material, tmp_path: Path
) -> None:
    """A lone signing certificate in a PEM loads; the warning advises the authentication one."""
    path = write_pem(tmp_path / "k.pem", m.sign, include_cert=True)
    [warning] = load_signing_key(path, passwords=StaticPasswords(None)).warnings
    assert (
        warning.startswith(f"{path}: the certificate") and "authentication certificate" in warning
    )


def test_kid_mode_judges_no_certificate(m: Material, multi_p12: Path) -> None:
    """In kid mode no certificate is sent, so the signing entry carries no warning."""
    key = load_signing_key(
        multi_p12, alias="sign", x5c_mode=False, passwords=StaticPasswords(ASCII_PW)
    )
    assert key.problems == () and key.warnings == ()


def test_not_strict_keeps_a_certificate_error_on_the_key(m: Material, tmp_path: Path) -> None:
    """strict=False (for doctor) returns an expired key with its error instead of raising."""
    path = write_pem(tmp_path / "k.pem", m.auth, include_cert=True)
    later = m.auth.cert.not_valid_after_utc + dt.timedelta(days=1)
    key = load_signing_key(path, passwords=StaticPasswords(None), now=later, strict=False)
    assert [(p.severity, p.check) for p in key.problems] == [(ERROR, "certificate_expired")]
    assert key.warnings == ()


# --- certificate_problems: the one judgement, plain values in -----------------------------------


def _judge(cert: Any, now: dt.datetime, **others: Any) -> list[tuple[str, str]]:
    return [(p.severity, p.check) for p in certificate_problems([cert], now, others)]


def test_problems_of_a_good_certificate(m: Material) -> None:
    """A valid digitalSignature certificate far from expiry has no problem."""
    assert certificate_problems([m.auth.cert, m.ca.cert], dt.datetime.now(dt.UTC)) == []


def test_problems_of_no_certificate() -> None:
    """An empty chain (kid mode) has nothing to judge."""
    assert certificate_problems([], 0.0) == []


def test_expired_and_not_yet_valid_are_errors(m: Material) -> None:
    """Outside its validity the certificate is an error, as Maskinporten certainly refuses it."""
    start, end = m.auth.cert.not_valid_before_utc, m.auth.cert.not_valid_after_utc
    assert _judge(m.auth.cert, end + dt.timedelta(seconds=1)) == [(ERROR, "certificate_expired")]
    before = start - dt.timedelta(seconds=1)
    assert _judge(m.auth.cert, before) == [(ERROR, "certificate_not_yet_valid")]


def test_expiry_within_30_days_is_a_warning(m: Material) -> None:
    """30 days before expiry is a warning with the day count; 31 days is not."""
    end = m.auth.cert.not_valid_after_utc
    [problem] = certificate_problems([m.auth.cert], end - dt.timedelta(days=30))
    assert (problem.severity, problem.check) == (WARNING, "certificate_expiring")
    assert f"expires in 30 days, on {end:%Y-%m-%d}" in problem.message
    assert _judge(m.auth.cert, end - dt.timedelta(days=31)) == []


def test_non_repudiation_is_a_warning_naming_the_usable_alias(m: Material) -> None:
    """Key usage without digitalSignature is a warning naming only the others that can sign."""
    other_ca = pki.make_ca()
    no_usage = other_ca.cert  # a CA certificate has keyCertSign, not digitalSignature
    now = dt.datetime.now(dt.UTC)
    problems = certificate_problems([m.sign.cert], now, {"auth": m.auth.cert, "ca": no_usage})
    [problem] = problems
    assert (problem.severity, problem.details["aliases"]) == (WARNING, ["auth"])
    assert problem.details["usages"] == "nonRepudiation"
    assert 'If it does, set `alias = "auth"`' in problem.message


def test_non_repudiation_with_several_usable_aliases(m: Material) -> None:
    """Several entries with digitalSignature are all named."""
    now = dt.datetime.now(dt.UTC)
    [problem] = certificate_problems([m.sign.cert], now, {"a": m.auth.cert, "b": m.other.cert})
    assert "set `alias` to one of 'a', 'b'" in problem.message


def test_naive_now_means_utc(m: Material) -> None:
    """A naive datetime is read as UTC, a float as a Unix time."""
    end = m.auth.cert.not_valid_after_utc
    naive = (end + dt.timedelta(minutes=1)).replace(tzinfo=None)
    assert _judge(m.auth.cert, naive) == [(ERROR, "certificate_expired")]
    problems = certificate_problems([m.auth.cert], end.timestamp() + 60)
    assert [p.check for p in problems] == ["certificate_expired"]


def test_key_usages_names(m: Material) -> None:
    """Key usages are named as certificate viewers show them."""
    assert key_usages(m.auth.cert) == ("digitalSignature", "keyEncipherment")
    assert key_usages(m.sign.cert) == ("nonRepudiation",)
    assert key_usages(m.ca.cert) == ("keyCertSign", "cRLSign")


def test_certificate_without_key_usage_is_unrestricted(m: Material) -> None:
    """Without a KeyUsage extension (RFC 5280: no restriction) there is no warning."""
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(m.auth.cert.subject)
        .issuer_name(m.ca.cert.subject)
        .public_key(m.auth.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .sign(m.ca.key, hashes.SHA256())
    )
    assert key_usages(cert) is None
    assert certificate_problems([cert], now) == []


def test_expired_certificate_gives_dates(m: Material, tmp_path: Path) -> None:
    """An expired certificate is refused with its validity dates."""
    path = write_pem(tmp_path / "k.pem", m.auth, include_cert=True)
    end = m.auth.cert.not_valid_after_utc
    exc = _fails(
        "certificate_expired", path, end.isoformat(), "renewed", now=end + dt.timedelta(days=1)
    )
    assert exc.details["not_after"] == end.isoformat()


def test_not_yet_valid_certificate_gives_dates(m: Material, tmp_path: Path) -> None:
    """A certificate used before its start date is refused with the dates and a clock hint."""
    path = write_pem(tmp_path / "k.pem", m.auth, include_cert=True)
    start = m.auth.cert.not_valid_before_utc
    now = (start - dt.timedelta(hours=1)).replace(tzinfo=None)  # naive means UTC
    _fails("certificate_not_yet_valid", path, start.isoformat(), "clock", now=now)


def test_several_keys_without_alias(multi_p12: Path) -> None:
    """A keystore with several private keys and no alias lists them and asks for `alias`."""
    _fails(
        "several_keys",
        multi_p12,
        "'auth'",
        "'sign'",
        "`alias`",
        "digitalSignature",
        passwords=StaticPasswords(ASCII_PW),
    )


def test_several_keys_in_jks_without_alias(m: Material, tmp_path: Path) -> None:
    """The same holds for JKS."""
    path = write_jks(tmp_path / "v.jks", {"auth": m.auth, "sign": m.sign}, STORE_PW, STORE_PW)
    _fails("several_keys", path, "'auth'", "'sign'")


def test_missing_file(tmp_path: Path) -> None:
    """A missing keystore names the path and the setting to fix."""
    _fails("file_missing", tmp_path / "nope.p12", "`keystore`")


def test_missing_certificate_file(m: Material, tmp_path: Path) -> None:
    """A missing certificate file names that file and the `certificate` setting."""
    path = write_pem(tmp_path / "k.pem", m.auth)
    cert = tmp_path / "c.pem"
    _fails("file_missing", path, "`certificate`", names=cert, certificate=cert)


def test_unreadable_file(tmp_path: Path) -> None:
    """A keystore path that cannot be read (here a directory) says so."""
    _fails("file_unreadable", tmp_path, "cannot read")


def test_unknown_format(tmp_path: Path) -> None:
    """Content in no known format lists the formats and mentions `keystore_type`."""
    path = tmp_path / "notes.txt"
    path.write_text("my password is in the keyring\n")
    _fails("unknown_format", path, "PKCS#12", "JWK", "`keystore_type`")


def test_der_certificate_is_not_a_pkcs12(m: Material, tmp_path: Path) -> None:
    """A DER certificate (detected as DER) is reported as not PKCS#12, without a password."""
    path = tmp_path / "cert.der"
    path.write_bytes(m.auth.cert.public_bytes(_DER))
    _fails("unknown_format", path, "PKCS#12", passwords=StaticPasswords(None))


def test_unknown_keystore_type(m: Material, tmp_path: Path) -> None:
    """An unknown keystore_type lists the accepted ones."""
    path = write_pem(tmp_path / "k.pem", m.auth)
    _fails("unknown_type", path, "'bks'", "jks, pkcs12", keystore_type="bks")


def test_no_password_available(m: Material, tmp_path: Path) -> None:
    """An encrypted store with no password source raises SecretUnavailable with the two ways."""
    path = write_pkcs12(tmp_path / "v.p12", {"auth": m.auth}, STORE_PW)
    _fails(
        "no_password",
        path,
        "MPAGENT_KEYSTORE_PASSWORD",
        "mpagent secret set <profile>",
        error=SecretUnavailable,
        passwords=StaticPasswords(None),
    )


def test_bare_key_in_x5c_mode_needs_certificate_or_kid(m: Material, tmp_path: Path) -> None:
    """A PEM or JWK without certificate cannot be sent as x5c: set `certificate` or `kid`."""
    _fails("no_certificate", write_pem(tmp_path / "k.pem", m.auth), "`certificate`", "`kid`")
    _fails("no_certificate", write_jwk(tmp_path / "k.json", m.auth.key), "`certificate`", "`kid`")


def test_public_key_instead_of_private(m: Material, tmp_path: Path) -> None:
    """A public PEM key or public JWK is refused as holding no private key."""
    pem = tmp_path / "pub.pem"
    pem.write_bytes(
        m.auth.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    _fails("no_private_key", pem, "private key")
    jwk = write_jwk(tmp_path / "pub.json", m.auth.key, private=False)
    _fails("no_private_key", jwk, "private key")


def test_certificate_alone_is_not_a_key(m: Material, tmp_path: Path) -> None:
    """A PEM certificate given as the keystore is refused as holding no private key."""
    path = write_cert_pem(tmp_path / "cert.pem", [m.auth.cert])
    _fails("no_private_key", path, "`keystore`")


def test_inconsistent_jwk_is_unreadable(m: Material, tmp_path: Path) -> None:
    """A private JWK whose numbers do not fit together is refused as unreadable."""
    path = write_jwk(tmp_path / "k.json", m.auth.key)
    jwk = json.loads(path.read_text())
    jwk["n"] = json.loads(write_jwk(tmp_path / "o.json", m.other.key).read_text())["n"]
    path.write_text(json.dumps(jwk))
    _fails("unreadable_key", path, "generate it again", x5c_mode=False)


def test_certificate_file_without_certificate(m: Material, tmp_path: Path) -> None:
    """A `certificate` file holding no PEM certificate is refused, naming that file."""
    path = write_pem(tmp_path / "k.pem", m.auth)
    _fails("unreadable_certificate", path, "PEM", names=path, certificate=path)


def test_non_rsa_key_is_refused(tmp_path: Path) -> None:
    """An EC key is refused: Maskinporten grants are signed with RSA."""
    path = tmp_path / "ec.pem"
    path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    _fails("not_rsa", path, "RSA", x5c_mode=False)


def test_jks_without_pyjks_prints_the_keytool_command(
    m: Material, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without pyjks (the base install, here on Linux too), a JKS error prints the exact
    keytool conversion with the paths quoted for the shell, the new path and the extra."""
    folder = tmp_path / "my keys"
    folder.mkdir()
    path = write_jks(folder / "v.jks", {"auth": m.auth}, STORE_PW, STORE_PW)
    monkeypatch.setitem(sys.modules, "jks", None)
    p12 = folder / "v.p12"
    command = (
        f"`keytool -importkeystore -srckeystore '{path}' -srcstoretype JKS "
        f"-destkeystore '{p12}' -deststoretype PKCS12`"
    )
    install = "or add JKS support: `pip install 'mpagent[jks]'` (needs a C compiler)"
    exc = _fails("jks_unsupported", path, command, f"point `keystore` at {p12}", install)
    assert exc.message.startswith(f"{path}: reading JKS needs the pyjks package")


def test_jks_conversion_command_on_windows_quotes_for_cmd() -> None:
    """On Windows the keytool command quotes paths as cmd.exe does, and the message says the
    extra brings JKS support on Linux and macOS only (it installs nothing on Windows)."""
    path = Path("C:/Users/Kari Nordmann/virksomhet.jks")
    exc = jks_unsupported(path, "win32")
    p12 = path.with_suffix(".p12")
    assert f'-srckeystore "{path}" -srcstoretype JKS -destkeystore "{p12}" -deststoretype' in (
        exc.message
    )
    assert "`pip install 'mpagent[jks]'` adds JKS support on Linux and macOS only" in exc.message
    assert "C compiler" not in exc.message


def test_jks_without_pyjks_through_the_cli(
    m: Material, tmp_path: Path, home: Path, emulator: Emulator
) -> None:
    """`get --no-agent` with a JKS where pyjks cannot be imported: exit 78, nothing on stdout,
    one line naming the keystore with the keytool command and `mpagent[jks]`; no request."""
    path = write_jks(tmp_path / "v.jks", {"auth": m.auth}, ASCII_PW, ASCII_PW)
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "jks.py").write_text("raise ImportError('hidden by the test: no pyjks')\n")
    config = write_config(tmp_path / "config.toml", {"dev": profile_for(emulator, path)})
    env = {"MPAGENT_KEYSTORE_PASSWORD": ASCII_PW, "PYTHONPATH": str(hide)}
    result = run_cli("--config", str(config), "get", SCOPES[0], "--no-agent", env=env)
    assert result.returncode == 78 and result.stdout == "", result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"mpagent: {path}: reading JKS needs the pyjks package")
    assert f"keytool -importkeystore -srckeystore {path} -srcstoretype JKS" in line
    assert "pip install 'mpagent[jks]'" in line
    assert emulator.token_requests == 0


def test_pem_and_pkcs12_loads_import_neither_pyjks_nor_pyasn1(m: Material, tmp_path: Path) -> None:
    """`import mpagent.keys` and loading a PEM key or a PKCS#12 import no pyjks, twofish or
    pyasn1 (~0.25 s a start): pyjks is imported only when a JKS is loaded."""
    path = write_pem(tmp_path / "k.pem", m.auth, include_cert=True)
    p12 = write_pkcs12(tmp_path / "v.p12", {"auth": m.auth}, STORE_PW, ca_chain=[m.ca.cert])
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "import mpagent.keys\n"
        "class P:\n"
        "    def keystore(self): return None\n"
        "    def key(self): return None\n"
        "class Q:\n"
        f"    def keystore(self): return {STORE_PW!r}\n"
        "    def key(self): return None\n"
        f"mpagent.keys.load_signing_key(Path({str(path)!r}), passwords=P())\n"
        f"mpagent.keys.load_signing_key(Path({str(p12)!r}), passwords=Q())\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.split()
    assert "mpagent.keys.jks" in loaded  # the format module itself is loaded, not pyjks
    heavy = [n for n in loaded if n.split(".")[0] in ("jks", "twofish", "pyasn1", "pyasn1_modules")]
    assert heavy == []


# --- the key usage warning end to end: the real CLI, the emulator, exchange --------------------


@pytest.fixture(scope="module")
def two_keys_bytes(
    ca: pki.Issued, leaf: pki.Issued, tmp_path_factory: pytest.TempPathFactory
) -> bytes:
    """A keytool-made PKCS#12 from the CA the emulator trusts: 'sign' (nonRepudiation only)
    and 'auth' (digitalSignature), as Buypass delivers them; made once (keytool is a JVM)."""
    signing = pki.make_leaf(ca, usage="nonRepudiation")
    path = tmp_path_factory.mktemp("two-keys") / "buypass.p12"
    entries = {"sign": signing, "auth": leaf}
    return write_pkcs12(path, entries, ASCII_PW, ca_chain=[ca.cert]).read_bytes()


@pytest.fixture
def two_keys(tmp_path: Path, home: Path, two_keys_bytes: bytes) -> Path:
    """This test's own copy of the two-key PKCS#12 (store password ASCII_PW)."""
    path = tmp_path / "buypass.p12"
    path.write_bytes(two_keys_bytes)
    return path


@pytest.fixture
def distrustful(other_ca: pki.Issued) -> Iterator[Emulator]:
    """An emulator trusting another CA only, so it refuses every x5c grant here (MP-120)."""
    with Emulator(
        signing_key=issuer_key(), clients={CLIENT_ID: SCOPES}, trust=[other_ca.cert]
    ) as emu:
        yield emu


def _cli(keystore: Path, emulator: Emulator, *args: str, **profile: Any):
    config = write_config(
        keystore.parent / "config.toml", {"dev": {**profile_for(emulator, keystore), **profile}}
    )
    env = {"MPAGENT_KEYSTORE_PASSWORD": ASCII_PW}
    return run_cli("--config", str(config), *args, env=env)


def _profile(keystore: Path, emulator: Emulator, alias: str) -> Profile:
    return Profile("dev", emulator.issuer, CLIENT_ID, (SCOPES[0],), keystore, alias=alias)


def test_cli_grant_never_refuses_over_key_usage(two_keys: Path, emulator: Emulator) -> None:
    """`mpagent grant` with the nonRepudiation entry exits 0 with a grant carrying that
    certificate in x5c, signed by its key; stderr holds at most warnings."""
    result = _cli(two_keys, emulator, "grant", SCOPES[0], alias="sign")
    assert result.returncode == 0, result.stderr
    grant = result.stdout.strip()
    header = jwt.get_unverified_header(grant)
    cert = x509.load_der_x509_certificate(base64.b64decode(header["x5c"][0]))
    assert key_usages(cert) == ("nonRepudiation",)
    claims = jwt.decode(grant, cert.public_key(), algorithms=["RS256"], audience=emulator.issuer)  # type: ignore[arg-type]
    assert claims["scope"] == SCOPES[0] and emulator.token_requests == 0
    assert all(line.startswith("mpagent: warning: ") for line in result.stderr.splitlines())


def test_cli_get_no_agent_warns_once_and_sends_the_grant(
    two_keys: Path, emulator: Emulator
) -> None:
    """`get --no-agent` with the nonRepudiation entry warns once on stderr, naming the entry
    and 'auth', and still gets the token: the emulator accepts the certificate."""
    result = _cli(two_keys, emulator, "get", SCOPES[0], "--no-agent", alias="sign")
    assert result.returncode == 0, result.stderr
    assert emulator.tokens_issued == 1 and result.stdout.count("\n") == 1
    [warning] = result.stderr.splitlines()
    assert warning.startswith(f"mpagent: warning: {two_keys} (entry 'sign'): the certificate")
    assert "key usage nonRepudiation, not digitalSignature" in warning
    assert 'set `alias = "auth"`' in warning


def test_refusal_names_the_key_usage_and_the_other_alias(
    two_keys: Path, distrustful: Emulator
) -> None:
    """A refused grant signed with the nonRepudiation entry gets the key usage as its likely
    cause and 'auth' as the alias to use; Maskinporten's fields are kept across the wire."""
    profile = _profile(two_keys, distrustful, "sign")
    key = load_key(profile, StaticPasswords(ASCII_PW))
    with pytest.raises(IssuerRejected) as info:
        Exchange(profile, key, Issuer(distrustful.issuer)).fetch([SCOPES[0]])
    exc = info.value
    assert exc.message.startswith("Maskinporten refused the grant: invalid_grant [MP-120]: ")
    assert "not issued by a trusted CA" in exc.message
    cause = (
        f"Likely cause: the certificate of {two_keys} (entry 'sign') has key usage"
        ' nonRepudiation, not digitalSignature; set `alias = "auth"`'
    )
    assert cause in exc.message
    assert (exc.error, exc.mp_code, exc.details["status"]) == ("invalid_grant", "MP-120", 400)
    back = MpagentError.from_wire(json.loads(json.dumps(exc.to_wire())))
    assert type(back) is IssuerRejected and back.message == exc.message
    assert back.details["likely_cause"] == exc.details["likely_cause"]


def test_refusal_through_the_cli_names_the_key_usage(two_keys: Path, distrustful: Emulator) -> None:
    """`get --no-agent` refused: exit 77, stdout empty, stderr names key usage and 'auth'."""
    result = _cli(two_keys, distrustful, "get", SCOPES[0], "--no-agent", alias="sign")
    assert result.returncode == 77 and result.stdout == "", result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("mpagent: Maskinporten refused the grant: invalid_grant [MP-120]")
    assert "nonRepudiation, not digitalSignature" in last and 'alias = "auth"' in last


def test_refusal_with_the_authentication_entry_blames_no_key_usage(
    two_keys: Path, distrustful: Emulator
) -> None:
    """The same refusal of the digitalSignature entry says nothing about key usage."""
    profile = _profile(two_keys, distrustful, "auth")
    key = load_key(profile, StaticPasswords(ASCII_PW))
    with pytest.raises(IssuerRejected) as info:
        Exchange(profile, key, Issuer(distrustful.issuer)).fetch([SCOPES[0]])
    assert "Likely cause" not in info.value.message
    assert "likely_cause" not in info.value.details


@pytest.mark.parametrize(
    ("details", "blamed"),
    [
        ({"error": "invalid_grant", "mp_code": "MP-120"}, True),
        ({"error": "invalid_grant", "mp_code": "MP-124"}, True),
        ({"error": "invalid_grant", "mp_code": "MP-100"}, True),
        ({"error": "invalid_grant", "error_description": "Invalid assertion"}, True),
        ({"error": "invalid_scope", "mp_code": "MP-200"}, False),
        ({"error": "forbidden", "mp_code": "MP-250"}, False),
        ({"error": "invalid_grant", "mp_code": "MP-130"}, False),
        ({"error": "invalid_grant", "error_description": "Issue time is after now"}, False),
    ],
)
def test_which_refusals_may_be_the_certificate(details: dict[str, str], blamed: bool) -> None:
    """Certificate and signature refusals may be the key usage; scope, delegation and clock
    refusals happen after the certificate was accepted or name their own cause."""
    assert may_be_the_certificate(IssuerRejected("refused", **details)) is blamed


@pytest.mark.parametrize("command", [("grant",), ("get", "--no-agent")])
def test_expired_certificate_stays_an_error_through_the_cli(
    command: tuple[str, ...], tmp_path: Path, home: Path, emulator: Emulator, ca: pki.Issued
) -> None:
    """An expired certificate is refused by `grant` and `get --no-agent`: exit 78, no request."""
    now = dt.datetime.now(dt.UTC)
    old = pki.make_leaf(
        ca, not_before=now - dt.timedelta(days=9), not_after=now - dt.timedelta(days=2)
    )
    keystore = write_pkcs12(tmp_path / "old.p12", {"auth": old}, ASCII_PW)
    result = _cli(keystore, emulator, command[0], SCOPES[0], *command[1:])
    assert result.returncode == 78 and result.stdout == "", result.stderr
    assert f"{keystore} (entry 'auth'): the certificate" in result.stderr
    assert f"expired on {old.cert.not_valid_after_utc.isoformat()}" in result.stderr
    assert emulator.token_requests == 0


def test_not_yet_valid_certificate_stays_an_error_through_the_cli(
    tmp_path: Path, home: Path, emulator: Emulator, ca: pki.Issued
) -> None:
    """A certificate valid only from tomorrow is refused by `get --no-agent`: exit 78."""
    tomorrow = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    early = pki.make_leaf(ca, not_before=tomorrow)
    keystore = write_pkcs12(tmp_path / "early.p12", {"auth": early}, ASCII_PW)
    result = _cli(keystore, emulator, "get", SCOPES[0], "--no-agent")
    assert result.returncode == 78 and result.stdout == "", result.stderr
    assert "is not valid until" in result.stderr and "clock" in result.stderr
    assert emulator.token_requests == 0
