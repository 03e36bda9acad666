"""PKCS#12 (.p12, .pfx) through cryptography, with every key of the file: cryptography returns
one, so the key bags and their friendlyName (the alias) are found by a small BER walk of the
file's structure. Buypass delivers two keys in one file."""

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
    if not bags or password is None:  # no password or unusual layout: one key only
        if bundle.key is None:
            return []
        name = bundle.cert.friendly_name if bundle.cert else None
        alias = name.decode() if name else None
        return [Entry(alias, const(bundle.key), _chain_in(bundle.key, pool))]
    if len(bags) == 1 and bundle.key is not None:  # cryptography decrypted it already
        keys = [(bags[0][0], bundle.key)]  # (a key derivation, ~50 ms, saved at each start)
    else:
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


def _key_bags(path: Path, data: bytes) -> list[tuple[str | None, bytes]]:
    """(friendlyName, PKCS#8 DER) of each key bag in the PFX's unencrypted SafeContents, where
    keytool and OpenSSL put them (RFC 7292 §4): PFX → authSafe ContentInfo → AuthenticatedSafe
    → ContentInfo of type data → SafeContents → SafeBag (bagId, [0] bagValue, attributes)."""
    try:
        _, start, end, _ = _read(data, 0)  # anything after the PFX is ignored
        pfx = _elements(data[start:end])
        bags = []
        for info in _sequence_of(_data_content(pfx[1][1])):  # the AuthenticatedSafe
            if _elements(info[1])[0][1] == _DATA:  # not encryptedData (certificates)
                bags += [_elements(bag[1]) for bag in _sequence_of(_data_content(info[1]))]
        return [(_name(b), _elements(b[1][1])[0][2]) for b in bags if b[0][1] in _KEY_BAGS]
    except (IndexError, ValueError, RecursionError) as exc:
        raise fail(path, "unknown_format", read_as="PKCS#12") from exc


# A small BER walk (definite and indefinite lengths, constructed OCTET STRINGs) rather than
# pyasn1-modules' RFC 7292 classes, whose import alone cost ~0.25 s of CPU at every start.
_DATA = bytes.fromhex("2a864886f70d010701")  # 1.2.840.113549.1.7.1
_KEY_BAGS = {bytes.fromhex("2a864886f70d010c0a0101"), bytes.fromhex("2a864886f70d010c0a0102")}
_FRIENDLY_NAME = bytes.fromhex("2a864886f70d010914")  # 1.2.840.113549.1.9.20
_OCTET_STRING, _BMP_STRING, _SEQUENCE, _EXPLICIT_0 = 0x04, 0x1E, 0x30, 0xA0
_Element = tuple[int, bytes, bytes]  # identifier octet, content, the whole encoding


def _read(data: bytes, pos: int) -> tuple[int, int, int, int]:
    """The element at `pos`: (identifier octet, content start, content end, next position)."""
    tag = data[pos]
    pos += 1
    if tag & 0x1F == 0x1F:  # high tag number form: skip its continuation octets
        while data[pos] & 0x80:
            pos += 1
        pos += 1
    first = data[pos]
    pos += 1
    if first == 0x80:  # indefinite length (BER): the content runs to an end-of-contents
        if not tag & 0x20:
            raise ValueError("indefinite length on a primitive element")
        end = pos
        while data[end : end + 2] != b"\0\0":
            end = _read(data, end)[3]
        return tag, pos, end, end + 2
    length = first
    if first & 0x80:
        count = first & 0x7F
        if count > 4:
            raise ValueError("length too long")
        length, pos = int.from_bytes(data[pos : pos + count], "big"), pos + count
    if pos + length > len(data):
        raise ValueError("element runs past its container")
    return tag, pos, pos + length, pos + length


def _elements(data: bytes) -> list[_Element]:
    """The elements one after the other in `data` (a constructed element's content)."""
    out, pos = [], 0
    while pos < len(data):
        tag, start, end, after = _read(data, pos)
        out.append((tag, data[start:end], data[pos:after]))
        pos = after
    return out


def _sequence_of(der: bytes) -> list[_Element]:
    """The elements of the SEQUENCE encoded in `der`."""
    tag, content, _ = _elements(der)[0]
    if tag != _SEQUENCE:
        raise ValueError("not a SEQUENCE")
    return _elements(content)


def _octets(element: _Element) -> bytes:
    """An OCTET STRING's bytes; BER may split it into a constructed string of chunks."""
    tag, content, _ = element
    if tag == _OCTET_STRING:
        return content
    if tag == _OCTET_STRING | 0x20:
        return b"".join(_octets(e) for e in _elements(content))
    raise ValueError("not an OCTET STRING")


def _data_content(content_info: bytes) -> bytes:
    """The DER inside a ContentInfo of type data: its [0] EXPLICIT OCTET STRING."""
    explicit = _elements(content_info)[1]
    if explicit[0] != _EXPLICIT_0:
        raise ValueError("no [0] content")
    return _octets(_elements(explicit[1])[0])


def _name(bag: list[_Element]) -> str | None:
    """The bag's friendlyName attribute (a BMPString), if it has one."""
    for attribute in _elements(bag[2][1]) if len(bag) > 2 else ():
        oid, values = _elements(attribute[1])[:2]
        if oid[1] == _FRIENDLY_NAME:
            value = _elements(values[1])[0]
            if value[0] != _BMP_STRING:
                raise ValueError("friendlyName is not a BMPString")
            return value[1].decode("utf-16-be")
    return None
