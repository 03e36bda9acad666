"""What every keystore format shares: the messages (`MESSAGES`, one per check), the
KeystoreError made of one (`fail`), the file read, the password asked for only when needed,
the entry a loader returns and the `SigningKey` that comes out."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mpagent.errors import KeystoreError, SecretUnavailable
from mpagent.private import read_regular

DER = serialization.Encoding.DER
# mpagent.exchange replaces these hints with the profile's own (passwords.ProfilePasswords.explain).
HOW_TO_SET_STORE_PW = (
    "MPAGENT_KEYSTORE_PASSWORD_<PROFILE> (or MPAGENT_KEYSTORE_PASSWORD), password_command,"
    " `mpagent secret set <profile>` or `mpagent unlock <profile>`"
)

# check -> message after "<file>: ". {shown} is the `aliases` detail, quoted and joined.
MESSAGES = {
    "file_missing": "no such file; check the `{setting}` path",
    "file_unreadable": "cannot read the file ({reason}); check its permissions",
    "unknown_type": "keystore_type {keystore_type!r} is not one of jks, pkcs12 (p12, pfx),"
    " pem, jwk",
    "unknown_format": "cannot be read as {read_as}: use JKS, PKCS#12 (.p12/.pfx), a PEM private key"
    " or a private RSA JWK (JSON); set `keystore_type` if the detection is wrong",
    "wrong_store_password": "the keystore password is wrong; set the right one via "
    + HOW_TO_SET_STORE_PW,
    "wrong_key_password": "the key password of entry {alias!r} is wrong (keytool keystores often"
    " protect a key with a password other than the store password): set the key password via"
    " MPAGENT_KEY_PASSWORD_<PROFILE> (or MPAGENT_KEY_PASSWORD), key_password_command,"
    " `mpagent secret set <profile> --key` or `mpagent unlock <profile> --key`",
    "alias_not_found": "no entry with alias {alias!r}; the aliases holding private keys are:"
    " {shown}. Set `alias` to one of them",
    "trusted_cert_alias": "alias {alias!r} is a trusted certificate without a private key; set"
    " `alias` to one holding a private key: {shown}",
    "no_private_key": "holds no private key (only certificates or a public key); point `keystore`"
    " at the private key, not the certificate or the public key registered with Digdir",
    "several_keys": "holds several private keys ({shown}); set `alias` to the one whose"
    " certificate has key usage digitalSignature (the authentication certificate)",
    "not_rsa": "holds a {found}, but Maskinporten grants are signed with RSA (RS256): use an RSA"
    " key or certificate",
    "unreadable_key": "the private key cannot be read; convert it to PKCS#8 PEM"
    " (`openssl pkcs8 -topk8`) or generate it again",
    "unreadable_certificate": "a certificate cannot be read; export the certificate chain again"
    " as PEM, leaf first",
    "key_certificate_mismatch": "the certificate{origin} ({subject}) does not belong to the"
    " private key, so Maskinporten would answer 'Invalid JWT signature': use the certificate"
    " issued for this key",
    "no_certificate": "no certificate to send as x5c: set `certificate` to a PEM file with the"
    " key's certificate chain, or set `kid` to the key id registered with Digdir",
    "not_digital_signature": "the certificate ({subject}) has key usage {usages}, not"
    " digitalSignature: Maskinporten may refuse it (MP-120). If it does, {instead}",
    "certificate_expired": "the certificate ({subject}) expired on {not_after} (valid from"
    " {not_before}); order a renewed certificate and point `keystore` at it",
    "certificate_not_yet_valid": "the certificate ({subject}) is not valid until {not_before}"
    " (valid to {not_after}); check this machine's clock",
    "certificate_expiring": "the certificate ({subject}) expires in {days} days, on {end}",
    "jks_unsupported": "reading JKS needs the pyjks package, which is not installed. Convert the"
    " keystore to PKCS#12: `{command}`, then point `keystore` at {p12}{install}",
}

ERROR, WARNING = "error", "warning"


@dataclass(frozen=True)
class Problem:
    """One finding about a certificate. An ERROR makes the key unusable; a WARNING is shown
    and the key is used. `check` is a key of MESSAGES, `details` its JSON-safe values."""

    severity: str  # ERROR or WARNING
    check: str
    details: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def message(self) -> str:
        return MESSAGES[self.check].format(**self.details)


class Passwords(Protocol):
    """Asked only for encrypted material. `key()` is asked only when the keystore password
    did not open a JKS key (the key has a password of its own)."""

    def keystore(self) -> str | None: ...

    def key(self) -> str | None: ...


@dataclass(frozen=True, repr=False)
class SigningKey:
    """A private RSA key ready to sign grants, with its certificate chain (leaf first)."""

    private_key: rsa.RSAPrivateKey
    chain: tuple[x509.Certificate, ...]
    kid: str | None
    source: str
    problems: tuple[Problem, ...] = ()  # certificate_problems at load; none in kid mode

    @property
    def warnings(self) -> tuple[str, ...]:
        """What to tell the user before the key is used, each naming the keystore entry."""
        return tuple(f"{self.source}: {p.message}" for p in self.problems if p.severity == WARNING)

    def x5c(self) -> list[str]:
        return [base64.b64encode(cert.public_bytes(DER)).decode("ascii") for cert in self.chain]

    @property
    def fingerprint(self) -> str:
        if self.chain:
            der = self.chain[0].public_bytes(DER)
        else:
            spki = serialization.PublicFormat.SubjectPublicKeyInfo
            der = self.private_key.public_key().public_bytes(DER, spki)
        return "sha256:" + hashlib.sha256(der).hexdigest()[:16]

    def __repr__(self) -> str:
        return (
            f"SigningKey(source={self.source!r}, kid={self.kid!r}, "
            f"fingerprint={self.fingerprint!r}, certificates={len(self.chain)})"
        )


@dataclass(frozen=True)
class Entry:
    """One keystore entry. `key` is None for a trusted-certificate entry, else a callable,
    because a JKS entry may need its own password, asked only once the entry is chosen."""

    alias: str | None
    key: Callable[[], Any] | None
    certs: tuple[x509.Certificate, ...]
    kid: str | None = None


# A loader: (path, data, passwords) -> every entry of the keystore.
Loader = Callable[[Path, bytes, Passwords], list[Entry]]


def fail(source: object, check: str, **details: Any) -> KeystoreError:
    shown = ", ".join(repr(a) for a in details.get("aliases", ())) or "none"
    message = MESSAGES[check].format(shown=shown, **details)
    return KeystoreError(f"{source}: {message}", check=check, source=str(source), **details)


def need(path: Path, password: str | None) -> str:
    if password is None:
        raise SecretUnavailable(
            f"{path}: the keystore is encrypted and no password is available: set "
            + HOW_TO_SET_STORE_PW,
            check="no_password",
            source=str(path),
        )
    return password


def read(path: Path, setting: str) -> bytes:
    try:
        return read_regular(path)
    except FileNotFoundError:
        raise fail(path, "file_missing", setting=setting) from None
    except OSError as exc:
        raise fail(path, "file_unreadable", reason=exc.strerror or str(exc)) from exc


def const(value: Any) -> Callable[[], Any]:
    return lambda: value


def ders(certificates: Iterable[bytes]) -> tuple[x509.Certificate, ...]:
    return tuple(x509.load_der_x509_certificate(der) for der in certificates)
