"""A throwaway test PKI: a CA and business-certificate look-alikes for the emulator, the demo
and the tests. Nothing here is ever used against the real Maskinporten."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, pkcs12
from cryptography.x509.oid import NameOID

TEST_ORG_NUMBER = "999999999"


@dataclass(frozen=True, repr=False)
class Issued:
    """A private key and its certificate."""

    key: rsa.RSAPrivateKey
    cert: x509.Certificate


def new_rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def make_ca(name: str = "mpagent throwaway test CA", *, now: dt.datetime | None = None) -> Issued:
    now = now or dt.datetime.now(dt.UTC)
    key = new_rsa_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Issued(key, cert)


def make_leaf(
    ca: Issued,
    *,
    org_number: str = TEST_ORG_NUMBER,
    name: str = "TEST ORGANISASJON",
    usage: str = "digitalSignature",
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    key: rsa.RSAPrivateKey | None = None,
) -> Issued:
    """A business-certificate look-alike. `usage` is "digitalSignature" (the authentication
    certificate, the one to sign grants with) or "nonRepudiation" (the signing certificate)."""
    now = dt.datetime.now(dt.UTC)
    key = key or new_rsa_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "NO"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, org_number),
            x509.NameAttribute(NameOID.ORGANIZATION_IDENTIFIER, f"NTRNO-{org_number}"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(days=1))
        .not_valid_after(not_after or now + dt.timedelta(days=3 * 365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(
                digital_signature=usage == "digitalSignature",
                non_repudiation=usage == "nonRepudiation",
            ),
            critical=True,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(key, cert)


def write_pkcs12(
    path: Path,
    entries: Mapping[str, Issued],
    password: str,
    ca_chain: Sequence[x509.Certificate] = (),
    trusted: Mapping[str, x509.Certificate] | None = None,
) -> Path:
    """A PKCS#12 keystore the way business certificates come: each entry (alias -> key and
    certificate) with the CA chain. One entry is written by cryptography; several by keytool
    importing single-key files into the first, as users' keystores with two keys are really
    made (keytool rewrites the whole file; one JVM start a further key, ~0.8 s of CPU).
    `trusted` adds named certificates without a key (keytool's trusted-certificate entries;
    one-entry files only)."""
    if len(entries) == 1:
        [(alias, issued)] = entries.items()
        named = [pkcs12.PKCS12Certificate(c, a.encode()) for a, c in (trusted or {}).items()]
        path.write_bytes(_pkcs12_bytes(alias, issued, password, [*ca_chain, *named]))
        return path
    if trusted:
        raise ValueError("trusted certificates are supported in one-entry PKCS#12 files only")
    if not password.isascii():  # Java's PKCS#12 PBES2 refuses it: "Password is not ASCII"
        raise ValueError("keytool cannot write a PKCS#12 with a non-ASCII password")
    keytool = shutil.which("keytool")
    if keytool is None:
        raise RuntimeError("keytool is needed for a PKCS#12 with several keys (install a JDK)")
    (first, issued), *others = entries.items()
    path.write_bytes(_pkcs12_bytes(first, issued, password, ca_chain))
    with tempfile.TemporaryDirectory() as tmp:
        for alias, issued in others:
            single = Path(tmp) / f"{alias}.p12"
            single.write_bytes(_pkcs12_bytes(alias, issued, password, ca_chain))
            _keytool_merge(keytool, single, path, password)
    return path


def _pkcs12_bytes(
    alias: str,
    issued: Issued,
    password: str,
    ca_chain: Sequence[x509.Certificate | pkcs12.PKCS12Certificate],
) -> bytes:
    encryption = BestAvailableEncryption(password.encode())
    return pkcs12.serialize_key_and_certificates(
        alias.encode(), issued.key, issued.cert, list(ca_chain) or None, encryption
    )


def _keytool_merge(keytool: str, source: Path, dest: Path, password: str) -> None:
    """keytool reads the password from its environment (`:env`), not from the argv."""
    subprocess.run(
        [
            *(keytool, "-importkeystore", "-noprompt"),
            *("-srckeystore", str(source), "-srcstoretype", "PKCS12"),
            *("-destkeystore", str(dest), "-deststoretype", "PKCS12"),
            *("-srcstorepass:env", "MPAGENT_PKI_PW", "-deststorepass:env", "MPAGENT_PKI_PW"),
        ],
        env={**os.environ, "MPAGENT_PKI_PW": password},
        check=True,
        capture_output=True,
    )


def _key_usage(
    *, digital_signature: bool = False, non_repudiation: bool = False, cert_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=non_repudiation,
        key_encipherment=digital_signature,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )
