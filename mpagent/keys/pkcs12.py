"""PKCS#12 (.p12, .pfx) through cryptography, with every key of the file: cryptography returns
one, so the key bags and their friendlyName (the alias) are read with pyasn1, imported only
when a PKCS#12 is loaded. Buypass delivers two keys in one file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from mpagent.keys.certificates import leaf_of, order_chain
from mpagent.keys.common import Entry, Passwords, const, fail, need


def load_pkcs12(path: Path, data: bytes, passwords: Passwords) -> list[Entry]:
    bags = _key_bags(path, data)
    password, bundle = _open(path, data, passwords)
    named = [c for c in (bundle.cert, *bundle.additional_certs) if c is not None]
    pool = tuple(c.certificate for c in named)
    if not bags or password is None:  # no pyasn1, no password or unusual layout: one key only
        if bundle.key is None:
            return []
        name = bundle.cert.friendly_name if bundle.cert else None
        alias = name.decode() if name else None
        return [Entry(alias, const(bundle.key), _chain_in(bundle.key, pool))]
    keys = [(name, _decrypt_bag(path, der, password)) for name, der in bags]
    entries = [Entry(name, const(key), _chain_in(key, pool)) for name, key in keys]
    aliases, leaves = {e.alias for e in entries}, {e.certs[0] for e in entries if e.certs}
    return entries + [  # a named certificate without a key: keytool's trusted-certificate entry
        Entry(c.friendly_name.decode(), None, (c.certificate,))
        for c in named
        if c.friendly_name
        and c.friendly_name.decode() not in aliases
        and c.certificate not in leaves
    ]


def _chain_in(key: Any, pool: tuple[x509.Certificate, ...]) -> tuple[x509.Certificate, ...]:
    leaf = leaf_of(key, pool) if isinstance(key, rsa.RSAPrivateKey) else None
    return order_chain(leaf, pool) if leaf else pool  # no leaf: the loader reports the mismatch


def _open(
    path: Path, data: bytes, passwords: Passwords
) -> tuple[bytes | None, pkcs12.PKCS12KeyAndCertificates]:
    try:
        return None, pkcs12.load_pkcs12(data, None)
    except ValueError:
        pass  # encrypted, as nearly all are: only now is a password needed
    password = need(path, passwords.keystore()).encode()
    try:
        return password, pkcs12.load_pkcs12(data, password)
    except ValueError as exc:
        raise fail(path, "wrong_store_password") from exc


def _decrypt_bag(path: Path, der: bytes, password: bytes) -> Any:
    try:
        return serialization.load_der_private_key(der, password)
    except TypeError:  # a plain keyBag, not encrypted
        return serialization.load_der_private_key(der, None)
    except ValueError as exc:  # keytool and OpenSSL protect keys with the store password
        raise fail(path, "unreadable_key") from exc


def _key_bags(path: Path, data: bytes) -> list[tuple[str | None, bytes]] | None:
    """(friendlyName, PKCS#8 DER) of each key bag in the PFX's unencrypted SafeContents, where
    keytool and OpenSSL put them; None when pyasn1 is missing."""
    try:
        from pyasn1.codec.ber import decoder
        from pyasn1.error import PyAsn1Error
        from pyasn1.type import char, univ
        from pyasn1_modules import rfc7292
    except ImportError:
        return None

    def decode(der: Any, spec: Any, *, wrapped: bool = False) -> Any:
        if wrapped:  # ContentInfo content of type data: an OCTET STRING around the DER
            der = decoder.decode(bytes(der), asn1Spec=univ.OctetString())[0]
        return decoder.decode(bytes(der), asn1Spec=spec)[0]

    def name(bag: Any) -> str | None:
        names = [a for a in bag["bagAttributes"] if a["attrType"] == rfc7292.pkcs_9_at_friendlyName]
        return str(decode(names[0]["attrValues"][0], char.BMPString())) if names else None

    key_bags = (rfc7292.id_keyBag, rfc7292.id_pkcs8ShroudedKeyBag)
    try:
        pfx = decode(data, rfc7292.PFX())
        bags = []
        for info in decode(pfx["authSafe"]["content"], rfc7292.AuthenticatedSafe(), wrapped=True):
            if info["contentType"] == rfc7292.rfc2315.data:
                bags += decode(info["content"], rfc7292.SafeContents(), wrapped=True)
    except PyAsn1Error as exc:
        raise fail(path, "unknown_format", read_as="PKCS#12") from exc
    return [(name(b), bytes(b["bagValue"])) for b in bags if b["bagId"] in key_bags]
