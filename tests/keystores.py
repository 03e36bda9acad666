"""Write real keystores of every other kind from `mpagent.emulator.pki.Issued` objects, for the
tests; PKCS#12 is `mpagent.emulator.pki.write_pkcs12`, which the demo uses too.

Plain functions, no fixtures: JKS through pyjks, PEM and JWK by hand. Nothing written here is
ever committed.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mpagent.emulator.pki import Issued

_DER = serialization.Encoding.DER
_PEM = serialization.Encoding.PEM


class StaticPasswords:
    """The Passwords protocol with fixed answers; counts how often each was asked for."""

    def __init__(self, store: str | None, key: str | None = None) -> None:
        self.store, self.key_password = store, key
        self.store_asks = 0
        self.key_asks = 0

    def keystore(self) -> str | None:
        self.store_asks += 1
        return self.store

    def key(self) -> str | None:
        self.key_asks += 1
        return self.key_password if self.key_password is not None else self.store


def write_jks(
    path: Path,
    entries: Mapping[str, Issued],
    store_password: str,
    key_password: str,
    trusted: Mapping[str, x509.Certificate] | None = None,
    ca_chain: Sequence[x509.Certificate] = (),
) -> Path:
    """A JKS keystore whose private-key entries are protected by `key_password`."""
    import jks

    items: list[object] = []
    for alias, issued in entries.items():
        ders = [c.public_bytes(_DER) for c in (issued.cert, *ca_chain)]
        pkcs8 = issued.key.private_bytes(
            _DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        entry = jks.PrivateKeyEntry.new(alias, ders, pkcs8, "pkcs8")
        entry.encrypt(key_password)
        items.append(entry)
    for alias, cert in (trusted or {}).items():
        items.append(jks.TrustedCertEntry.new(alias, cert.public_bytes(_DER)))
    jks.KeyStore.new("jks", items).save(str(path), store_password)
    return path


def write_pem(
    path: Path,
    issued: Issued,
    password: str | None = None,
    pkcs1: bool = False,
    include_cert: bool = False,
    cert_first: bool = False,
) -> Path:
    """The private key as PEM: PKCS#8 (encrypted when `password` is given) or PKCS#1
    ("RSA PRIVATE KEY"), optionally with its certificate after (or before) the key."""
    fmt = (
        serialization.PrivateFormat.TraditionalOpenSSL
        if pkcs1
        else serialization.PrivateFormat.PKCS8
    )
    encryption = (
        serialization.BestAvailableEncryption(password.encode())
        if password
        else serialization.NoEncryption()
    )
    key = issued.key.private_bytes(_PEM, fmt, encryption)
    cert = issued.cert.public_bytes(_PEM) if include_cert or cert_first else b""
    path.write_bytes(cert + key if cert_first else key + cert)
    return path


def write_jwk(
    path: Path,
    key: rsa.RSAPrivateKey,
    kid: str | None = None,
    x5c: Iterable[x509.Certificate] = (),
    private: bool = True,
) -> Path:
    """An RSA JWK (private unless `private=False`), with optional kid and x5c."""
    priv = key.private_numbers()
    public = priv.public_numbers
    values = {"n": public.n, "e": public.e}
    if private:
        values |= {
            "d": priv.d,
            "p": priv.p,
            "q": priv.q,
            "dp": priv.dmp1,
            "dq": priv.dmq1,
            "qi": priv.iqmp,
        }
    jwk: dict[str, object] = {"kty": "RSA", **{k: _b64url_int(v) for k, v in values.items()}}
    if kid is not None:
        jwk["kid"] = kid
    certs = [base64.b64encode(c.public_bytes(_DER)).decode() for c in x5c]
    if certs:
        jwk["x5c"] = certs
    path.write_text(json.dumps(jwk, indent=2))
    return path


def _b64url_int(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def write_cert_pem(path: Path, certs: Iterable[x509.Certificate]) -> Path:
    path.write_bytes(b"".join(c.public_bytes(_PEM) for c in certs))
    return path
