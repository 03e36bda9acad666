"""PEM: a private key (PKCS#8, encrypted or not, or PKCS#1), optionally with its certificates
in the same file; and the PEM certificate chain of the `certificate` setting."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from mpagent.keys.common import Entry, Passwords, const, fail, need


def load_pem(path: Path, data: bytes, passwords: Passwords) -> list[Entry]:
    certs = pem_certificates(path, data)
    if b"PRIVATE KEY-----" not in data:
        raise fail(path, "no_private_key")
    try:
        key = serialization.load_pem_private_key(data, None)
    except TypeError:  # encrypted: only now is a password needed
        try:
            key = serialization.load_pem_private_key(
                data, need(path, passwords.keystore()).encode()
            )
        except ValueError as exc:
            raise fail(path, "wrong_store_password") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise fail(path, "unreadable_key") from exc
    return [Entry(None, const(key), certs)]


def pem_certificates(path: Path, data: bytes) -> tuple[x509.Certificate, ...]:
    if b"-----BEGIN CERTIFICATE-----" not in data:
        return ()
    try:
        return tuple(x509.load_pem_x509_certificates(data))
    except ValueError as exc:
        raise fail(path, "unreadable_certificate") from exc
