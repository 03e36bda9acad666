"""Key material in (JKS, PKCS#12, PEM or JWK), one `SigningKey` out, with the certificate checks
that Maskinporten would otherwise fail on obscurely (MASKINPORTEN.md §5).

One module per format behind the loader table (`pkcs12`, `jks`, `pem`, `jwk`), the shared
vocabulary in `common`, the certificate checks in `certificates`. Each classic mistake is its
own KeystoreError that names the file, says what to do next and carries a `check` detail (a key
of `MESSAGES`), so tests and `mpagent doctor` can tell them apart. The certificate is judged by
one pure function, `certificate_problems`: what Maskinporten certainly refuses is an error,
what it may refuse a warning the key carries (`warnings`). Passwords are asked for only when
the material is encrypted, and never reach a message. pyjks is imported only when a JKS is
loaded.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from mpagent.errors import KeystoreError
from mpagent.keys.certificates import (
    EXPIRY_WARNING_DAYS,
    certificate_problems,
    certificate_warning,
    days_left,
    describe,
    key_usages,
    leaf_of,
    order_chain,
    usage_cause,
)
from mpagent.keys.common import (
    ERROR,
    MESSAGES,
    WARNING,
    Entry,
    Loader,
    Passwords,
    Problem,
    SigningKey,
    fail,
    read,
)
from mpagent.keys.jks import load_jks
from mpagent.keys.jwk import load_jwk
from mpagent.keys.pem import load_pem, pem_certificates
from mpagent.keys.pkcs12 import load_pkcs12

__all__ = [
    "ERROR",
    "EXPIRY_WARNING_DAYS",
    "MESSAGES",
    "WARNING",
    "Passwords",
    "Problem",
    "SigningKey",
    "certificate_problems",
    "certificate_warning",
    "days_left",
    "describe",
    "detect_type",
    "key_usages",
    "keystore_from_env",
    "load_signing_key",
    "usage_cause",
]

_TYPES = {"jks": "jks", "jceks": "jks", "pkcs12": "pkcs12", "p12": "pkcs12", "pfx": "pkcs12"}
_TYPES |= {"pem": "pem", "jwk": "jwk"}
_LOADERS: dict[str, Loader] = {
    "jks": load_jks,
    "pkcs12": load_pkcs12,
    "pem": load_pem,
    "jwk": load_jwk,
}


def detect_type(data: bytes) -> str:
    """The keystore type from the content: "jks", "pkcs12", "pem" or "jwk"; ValueError for
    anything else. PKCS#12 is recognised as a DER SEQUENCE, so a DER certificate passes as one."""
    if data[:4] in (b"\xfe\xed\xfe\xed", b"\xce\xce\xce\xce"):
        return "jks"
    if data.lstrip().startswith(b"{"):
        try:
            obj = json.loads(data)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and "kty" in obj:
            return "jwk"
    elif b"-----BEGIN " in data:
        return "pem"
    elif data[:1] == b"\x30":
        return "pkcs12"
    raise ValueError("not a JKS, PKCS#12, PEM or JWK keystore")


def keystore_from_env(names: Sequence[str], env: Mapping[str, str]) -> tuple[str, bytes] | None:
    """(the variable, the keystore's bytes) from the first of `names` that is set and not
    empty, decoded from base64 (line breaks allowed: `base64` wraps at 76 columns); None
    when none is set. The bytes stay in memory: nothing is written to disk. An empty one
    (a CI secret not defined for the job expands to "") or bad base64 is a KeystoreError
    naming the variable, never its value."""
    empty = None
    for name in names:
        value = env.get(name)
        if value is None:
            continue
        text = "".join(value.split())
        if not text:
            empty = empty or name
            continue
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise KeystoreError(
                f"{name} is not valid base64 (its value is not shown); set it to the keystore "
                "encoded with `base64 -w0 virksomhet.p12` (macOS: `base64 -i virksomhet.p12`)",
                check="keystore_base64",
                variable=name,
            ) from None
        if data:
            return name, data
        empty = empty or name
    if empty is not None:
        raise KeystoreError(
            f"{empty} is set but empty (a CI secret not defined for this job or branch?); "
            "set it to the keystore as base64, or unset it and set keystore in the profile",
            check="keystore_base64",
            variable=empty,
        )
    return None


def load_signing_key(
    path: Path,
    *,
    data: bytes | None = None,
    keystore_type: str | None = None,
    alias: str | None = None,
    certificate: Path | None = None,
    passwords: Passwords,
    x5c_mode: bool = True,
    now: dt.datetime | None = None,
    strict: bool = True,
) -> SigningKey:
    """Load and check the signing key; every mistake raises a KeystoreError naming the file.
    The certificate's warnings travel with the key; its errors raise too, unless `strict` is
    False (for `mpagent doctor`, which shows every problem as a row of its own). `data`: the
    keystore's bytes, already in memory (keystore_from_env); `path` then only names them."""
    if data is None:
        data = read(path, "keystore")
    entries = _LOADERS[_kind(path, data, keystore_type)](path, data, passwords)
    entry = _select(path, entries, alias)
    source = f"{path} (entry '{entry.alias}')" if entry.alias else str(path)
    assert entry.key is not None  # _select returns private-key entries only
    key = entry.key()
    if not isinstance(key, rsa.RSAPrivateKey):
        raise fail(source, "not_rsa", found=type(key).__name__)
    certs = _read_chain(certificate) if certificate else entry.certs
    chain = _match(source, key, certs, f" in {certificate}" if certificate else "")
    problems: list[Problem] = []
    if x5c_mode and entry.kid is None:  # a JWK's own kid is sent instead of x5c (grant.py)
        if not chain:
            raise fail(source, "no_certificate")
        others = {e.alias: e.certs[0] for e in entries if e.key and e.alias and e.certs}
        others.pop(entry.alias or "", None)
        problems = certificate_problems(chain, now or dt.datetime.now(dt.UTC), others)
        error = next((p for p in problems if p.severity == ERROR), None)
        if error and strict:
            raise fail(source, error.check, **error.details)
    return SigningKey(key, chain, entry.kid, source, tuple(problems))


def _kind(path: Path, data: bytes, keystore_type: str | None) -> str:
    if keystore_type is None:
        try:
            return detect_type(data)
        except ValueError:
            raise fail(path, "unknown_format", read_as="any supported keystore type") from None
    if keystore_type.lower() not in _TYPES:
        raise fail(path, "unknown_type", keystore_type=keystore_type)
    return _TYPES[keystore_type.lower()]


def _select(path: Path, entries: Sequence[Entry], alias: str | None) -> Entry:
    keyed = [e for e in entries if e.key is not None]
    names = [e.alias for e in keyed if e.alias]
    if alias is not None and any(e.alias for e in entries):
        found = [e for e in entries if e.alias and e.alias.casefold() == alias.casefold()]
        if not found:
            raise fail(path, "alias_not_found", alias=alias, aliases=names)
        if found[0].key is None:
            raise fail(path, "trusted_cert_alias", alias=alias, aliases=names)
        return found[0]
    if len(keyed) == 1:
        return keyed[0]
    raise fail(path, "several_keys" if keyed else "no_private_key", aliases=names)


def _match(
    source: str, key: rsa.RSAPrivateKey, certs: tuple[x509.Certificate, ...], origin: str
) -> tuple[x509.Certificate, ...]:
    """The chain, leaf first, the leaf being the certificate of `key`."""
    if not certs:
        return ()
    leaf = leaf_of(key, certs)
    if leaf is None:
        subject = describe(certs[0])
        raise fail(source, "key_certificate_mismatch", origin=origin, subject=subject)
    return certs if leaf is certs[0] else order_chain(leaf, certs)


def _read_chain(path: Path) -> tuple[x509.Certificate, ...]:
    certs = pem_certificates(path, read(path, "certificate"))
    if not certs:
        raise fail(path, "unreadable_certificate")
    return certs
