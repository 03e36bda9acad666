"""keys.py: every keystore kind loads into a SigningKey, and every classic key-material mistake is
its own KeystoreError that names the file, says what to do and never shows a password."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from mpagent import pki
from mpagent.errors import ConfigError, KeystoreError, MpagentError, SecretUnavailable
from mpagent.keys import SigningKey, detect_type, load_signing_key
from tests.keystores import (
    StaticPasswords,
    write_cert_pem,
    write_jks,
    write_jwk,
    write_pem,
    write_pkcs12,
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


def test_multi_key_pkcs12_without_pyasn1_yields_its_first_key(
    multi_p12: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without pyasn1 only cryptography's one key is seen; the other is not called a certificate."""
    monkeypatch.setitem(sys.modules, "pyasn1_modules", None)
    key = load_signing_key(multi_p12, passwords=StaticPasswords(ASCII_PW))
    assert key.source == f"{multi_p12} (entry 'auth')"
    _fails(
        "alias_not_found", multi_p12, "'auth'", passwords=StaticPasswords(ASCII_PW), alias="sign"
    )


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


def test_non_repudiation_certificate_names_the_other_alias(multi_p12: Path) -> None:
    """The signing (nonRepudiation) certificate is refused, pointing at the authentication alias."""
    exc = _fails(
        "not_digital_signature",
        multi_p12,
        "non-repudiation",
        "authentication certificate",
        "'auth'",
        passwords=StaticPasswords(ASCII_PW),
        alias="sign",
    )
    assert exc.details["aliases"] == ["auth"]


def test_non_repudiation_certificate_in_pem(m: Material, tmp_path: Path) -> None:
    """A lone signing certificate is refused with the advice to use the authentication one."""
    path = write_pem(tmp_path / "k.pem", m.sign, include_cert=True)
    _fails("not_digital_signature", path, "digitalSignature", "authentication certificate")


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
    """Without pyjks, a JKS error prints the exact keytool conversion and the new path."""
    path = write_jks(tmp_path / "v.jks", {"auth": m.auth}, STORE_PW, STORE_PW)
    monkeypatch.setitem(sys.modules, "jks", None)
    p12 = tmp_path / "v.p12"
    command = (
        f"keytool -importkeystore -srckeystore {path} -srcstoretype JKS "
        f"-destkeystore {p12} -deststoretype PKCS12"
    )
    _fails("jks_unsupported", path, command, f"point `keystore` at {p12}")
