"""Key material in (JKS, PKCS#12, PEM or JWK), one `SigningKey` out, with the certificate checks
that Maskinporten would otherwise fail on obscurely (MASKINPORTEN.md §5).

Each classic mistake is its own KeystoreError that names the file, says what to do next and
carries a `check` detail (a key of `MESSAGES`), so tests and `mpagent doctor` can tell them apart.
The certificate is judged by one pure function, `certificate_problems`: what Maskinporten
certainly refuses is an error, what it may refuse a warning the key carries (`warnings`).
Passwords are asked for only when the material is encrypted, and never reach a message.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from mpagent.errors import KeystoreError, SecretUnavailable
from mpagent.private import read_regular

_TYPES = {"jks": "jks", "jceks": "jks", "pkcs12": "pkcs12", "p12": "pkcs12", "pfx": "pkcs12"}
_TYPES |= {"pem": "pem", "jwk": "jwk"}
_DER = serialization.Encoding.DER
# mpagent.exchange replaces these hints with the profile's own (passwords.ProfilePasswords.explain).
_HOW_TO_SET_STORE_PW = (
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
    + _HOW_TO_SET_STORE_PW,
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
    " keystore to PKCS#12: `keytool -importkeystore -srckeystore {source} -srcstoretype JKS"
    " -destkeystore {p12} -deststoretype PKCS12`, then point `keystore` at {p12}",
}


ERROR, WARNING = "error", "warning"
EXPIRY_WARNING_DAYS = 30
# RFC 5280 KeyUsage bits by the names certificate viewers and Digdir's docs use.
_USAGES = {"digital_signature": "digitalSignature", "content_commitment": "nonRepudiation"}
_USAGES |= {"key_encipherment": "keyEncipherment", "data_encipherment": "dataEncipherment"}
_USAGES |= {"key_agreement": "keyAgreement", "key_cert_sign": "keyCertSign", "crl_sign": "cRLSign"}


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
        return [base64.b64encode(cert.public_bytes(_DER)).decode("ascii") for cert in self.chain]

    @property
    def fingerprint(self) -> str:
        if self.chain:
            der = self.chain[0].public_bytes(_DER)
        else:
            spki = serialization.PublicFormat.SubjectPublicKeyInfo
            der = self.private_key.public_key().public_bytes(_DER, spki)
        return "sha256:" + hashlib.sha256(der).hexdigest()[:16]

    def __repr__(self) -> str:
        return (
            f"SigningKey(source={self.source!r}, kid={self.kid!r}, "
            f"fingerprint={self.fingerprint!r}, certificates={len(self.chain)})"
        )


@dataclass(frozen=True)
class _Entry:
    """One keystore entry. `key` is None for a trusted-certificate entry, else a callable,
    because a JKS entry may need its own password, asked only once the entry is chosen."""

    alias: str | None
    key: Callable[[], Any] | None
    certs: tuple[x509.Certificate, ...]
    kid: str | None = None


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


def load_signing_key(
    path: Path,
    *,
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
    False (for `mpagent doctor`, which shows every problem as a row of its own)."""
    data = _read(path, "keystore")
    entries = _LOADERS[_kind(path, data, keystore_type)](path, data, passwords)
    entry = _select(path, entries, alias)
    source = f"{path} (entry '{entry.alias}')" if entry.alias else str(path)
    assert entry.key is not None  # _select returns private-key entries only
    key = entry.key()
    if not isinstance(key, rsa.RSAPrivateKey):
        raise _fail(source, "not_rsa", found=type(key).__name__)
    certs = _read_chain(certificate) if certificate else entry.certs
    chain = _match(source, key, certs, f" in {certificate}" if certificate else "")
    problems: list[Problem] = []
    if x5c_mode and entry.kid is None:  # a JWK's own kid is sent instead of x5c (grant.py)
        if not chain:
            raise _fail(source, "no_certificate")
        others = {e.alias: e.certs[0] for e in entries if e.key and e.alias and e.certs}
        others.pop(entry.alias or "", None)
        problems = certificate_problems(chain, now or dt.datetime.now(dt.UTC), others)
        error = next((p for p in problems if p.severity == ERROR), None)
        if error and strict:
            raise _fail(source, error.check, **error.details)
    return SigningKey(key, chain, entry.kid, source, tuple(problems))


def _fail(source: object, check: str, **details: Any) -> KeystoreError:
    shown = ", ".join(repr(a) for a in details.get("aliases", ())) or "none"
    message = MESSAGES[check].format(shown=shown, source=source, **details)
    return KeystoreError(f"{source}: {message}", check=check, source=str(source), **details)


def _need(path: Path, password: str | None) -> str:
    if password is None:
        raise SecretUnavailable(
            f"{path}: the keystore is encrypted and no password is available: set "
            + _HOW_TO_SET_STORE_PW,
            check="no_password",
            source=str(path),
        )
    return password


def _read(path: Path, setting: str) -> bytes:
    try:
        return read_regular(path)
    except FileNotFoundError:
        raise _fail(path, "file_missing", setting=setting) from None
    except OSError as exc:
        raise _fail(path, "file_unreadable", reason=exc.strerror or str(exc)) from exc


def _kind(path: Path, data: bytes, keystore_type: str | None) -> str:
    if keystore_type is None:
        try:
            return detect_type(data)
        except ValueError:
            raise _fail(path, "unknown_format", read_as="any supported keystore type") from None
    if keystore_type.lower() not in _TYPES:
        raise _fail(path, "unknown_type", keystore_type=keystore_type)
    return _TYPES[keystore_type.lower()]


def _select(path: Path, entries: Sequence[_Entry], alias: str | None) -> _Entry:
    keyed = [e for e in entries if e.key is not None]
    names = [e.alias for e in keyed if e.alias]
    if alias is not None and any(e.alias for e in entries):
        found = [e for e in entries if e.alias and e.alias.casefold() == alias.casefold()]
        if not found:
            raise _fail(path, "alias_not_found", alias=alias, aliases=names)
        if found[0].key is None:
            raise _fail(path, "trusted_cert_alias", alias=alias, aliases=names)
        return found[0]
    if len(keyed) == 1:
        return keyed[0]
    raise _fail(path, "several_keys" if keyed else "no_private_key", aliases=names)


def _match(
    source: str, key: rsa.RSAPrivateKey, certs: tuple[x509.Certificate, ...], origin: str
) -> tuple[x509.Certificate, ...]:
    """The chain, leaf first, the leaf being the certificate of `key`."""
    if not certs:
        return ()
    leaf = _leaf_of(key, certs)
    if leaf is None:
        subject = describe(certs[0])
        raise _fail(source, "key_certificate_mismatch", origin=origin, subject=subject)
    return certs if leaf is certs[0] else _order_chain(leaf, certs)


def _leaf_of(key: Any, certs: Iterable[x509.Certificate]) -> x509.Certificate | None:
    numbers = key.public_key().public_numbers()
    for cert in certs:
        public = cert.public_key()
        if isinstance(public, rsa.RSAPublicKey) and public.public_numbers() == numbers:
            return cert
    return None


def _order_chain(
    leaf: x509.Certificate, pool: Sequence[x509.Certificate]
) -> tuple[x509.Certificate, ...]:
    chain = [leaf]
    while chain[-1].issuer != chain[-1].subject:
        issuer = next((c for c in pool if c.subject == chain[-1].issuer and c not in chain), None)
        if issuer is None:
            break
        chain.append(issuer)
    return tuple(chain)


def certificate_problems(
    chain: Sequence[x509.Certificate],
    now: dt.datetime | float,
    others: Mapping[str, x509.Certificate] | None = None,
) -> list[Problem]:
    """What stands against signing grants with `chain` (leaf first) at `now`. Expired or not yet
    valid is an ERROR: Maskinporten certainly refuses it (MP-120). Key usage without
    digitalSignature is a WARNING: Digdir's own published test keystore for Maskinporten
    (felleslosninger/maskinporten-test-jwt-grant, Buypass Class 3 Test4) has nonRepudiation
    only, so a refusal is not certain (MASKINPORTEN.md §5). So is expiry within 30 days.
    `others`: the keystore's other private-key entries (alias -> certificate), to name one to
    use instead."""
    if not chain:
        return []
    leaf, subject, at = chain[0], describe(chain[0]), _utc(now)
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    dates = {"subject": subject, "not_before": start.isoformat(), "not_after": end.isoformat()}
    problems = []
    if at > end:
        problems.append(Problem(ERROR, "certificate_expired", dates))
    elif at < start:
        problems.append(Problem(ERROR, "certificate_not_yet_valid", dates))
    elif (days := _days_until(end, at)) <= EXPIRY_WARNING_DAYS:
        expiring = {"subject": subject, "days": days, "end": f"{end:%Y-%m-%d}"}
        problems.append(Problem(WARNING, "certificate_expiring", expiring))
    usages = key_usages(leaf)
    if usages is not None and "digitalSignature" not in usages:
        better = [a for a, cert in (others or {}).items() if _may_sign(cert)]
        usage = {"subject": subject, "usages": ", ".join(usages) or "none", "aliases": better}
        usage["instead"] = _use_instead(better)
        problems.append(Problem(WARNING, "not_digital_signature", usage))
    return problems


def key_usages(cert: x509.Certificate) -> tuple[str, ...] | None:
    """The key usages the certificate names; None without the extension (no restriction)."""
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    return tuple(name for attr, name in _USAGES.items() if getattr(usage, attr))


def usage_cause(key: SigningKey) -> str | None:
    """The key usage as the likely cause of a refusal, and what to use instead; None when the
    certificate has digitalSignature (or no certificate is sent)."""
    found = [p.details for p in key.problems if p.check == "not_digital_signature"]
    if not found:
        return None
    usage = found[0]
    return (
        f"the certificate of {key.source} has key usage {usage['usages']}, not"
        f" digitalSignature; {_use_instead(usage['aliases'])}"
    )


def _may_sign(cert: x509.Certificate) -> bool:
    usages = key_usages(cert)
    return usages is None or "digitalSignature" in usages


def _use_instead(aliases: Sequence[str]) -> str:
    if len(aliases) == 1:
        return (
            f'set `alias = "{aliases[0]}"`: that entry of the keystore has key usage'
            " digitalSignature (the authentication certificate)"
        )
    if aliases:
        shown = ", ".join(repr(a) for a in aliases)
        return f"set `alias` to one of {shown}: their certificates have key usage digitalSignature"
    return (
        "use the authentication certificate (key usage digitalSignature) that your"
        " certificate provider issued with it"
    )


def _utc(now: dt.datetime | float) -> dt.datetime:
    if not isinstance(now, dt.datetime):
        return dt.datetime.fromtimestamp(now, dt.UTC)
    return now if now.tzinfo else now.replace(tzinfo=dt.UTC)  # naive means UTC


def _days_until(end: dt.datetime, now: dt.datetime) -> int:
    return math.ceil((end - now).total_seconds() / 86400)


def _read_chain(path: Path) -> tuple[x509.Certificate, ...]:
    certs = _pem_certificates(path, _read(path, "certificate"))
    if not certs:
        raise _fail(path, "unreadable_certificate")
    return certs


def _pem_certificates(path: Path, data: bytes) -> tuple[x509.Certificate, ...]:
    if b"-----BEGIN CERTIFICATE-----" not in data:
        return ()
    try:
        return tuple(x509.load_pem_x509_certificates(data))
    except ValueError as exc:
        raise _fail(path, "unreadable_certificate") from exc


# Loaders: (path, data, passwords) -> every entry of the keystore.


def _load_pem(path: Path, data: bytes, passwords: Passwords) -> list[_Entry]:
    certs = _pem_certificates(path, data)
    if b"PRIVATE KEY-----" not in data:
        raise _fail(path, "no_private_key")
    try:
        key = serialization.load_pem_private_key(data, None)
    except TypeError:  # encrypted: only now is a password needed
        try:
            key = serialization.load_pem_private_key(
                data, _need(path, passwords.keystore()).encode()
            )
        except ValueError as exc:
            raise _fail(path, "wrong_store_password") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise _fail(path, "unreadable_key") from exc
    return [_Entry(None, _const(key), certs)]


def _load_jwk(path: Path, data: bytes, passwords: Passwords) -> list[_Entry]:
    try:
        jwk = json.loads(data)
    except ValueError as exc:
        raise _fail(path, "unknown_format", read_as="a JWK (not valid JSON)") from exc
    if not isinstance(jwk, dict) or jwk.get("kty") != "RSA":
        found = f"JWK with kty {jwk.get('kty')!r}" if isinstance(jwk, dict) else "JSON non-object"
        raise _fail(path, "not_rsa", found=found)
    if "d" not in jwk:
        raise _fail(path, "no_private_key")
    key = _jwk_private_key(path, jwk)
    try:
        certs = _ders(base64.b64decode(c, validate=True) for c in jwk.get("x5c", ()))
    except ValueError as exc:
        raise _fail(path, "unreadable_certificate") from exc
    kid = jwk.get("kid")
    return [_Entry(None, _const(key), certs, None if kid is None else str(kid))]


def _jwk_private_key(path: Path, jwk: dict[str, Any]) -> rsa.RSAPrivateKey:
    def num(name: str) -> int:
        value = str(jwk[name])
        return int.from_bytes(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)), "big")

    try:
        n, e, d = num("n"), num("e"), num("d")
        if all(name in jwk for name in ("p", "q", "dp", "dq", "qi")):
            p, q, dp, dq, qi = (num(name) for name in ("p", "q", "dp", "dq", "qi"))
        else:  # a minimal JWK (n, e, d): the CRT values follow from them
            p, q = rsa.rsa_recover_prime_factors(n, e, d)
            dp, dq, qi = rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q)
        return rsa.RSAPrivateNumbers(p, q, d, dp, dq, qi, rsa.RSAPublicNumbers(e, n)).private_key()
    except (KeyError, ValueError) as exc:
        raise _fail(path, "unreadable_key") from exc


def _const(value: Any) -> Callable[[], Any]:
    return lambda: value


def _ders(ders: Iterable[bytes]) -> tuple[x509.Certificate, ...]:
    return tuple(x509.load_der_x509_certificate(der) for der in ders)


def _load_jks(path: Path, data: bytes, passwords: Passwords) -> list[_Entry]:
    try:
        import jks  # pyjks is optional: its twofish dependency needs a C compiler
    except ImportError:
        raise _fail(path, "jks_unsupported", p12=str(path.with_suffix(".p12"))) from None
    try:
        store = jks.KeyStore.loads(data, _need(path, passwords.keystore()))
    except jks.util.KeystoreSignatureException as exc:
        raise _fail(path, "wrong_store_password") from exc
    except jks.util.KeystoreException as exc:
        raise _fail(path, "unknown_format", read_as="JKS (corrupt?)") from exc
    entries = [
        _Entry(alias, partial(_jks_key, path, e, passwords), _ders(c for _, c in e.cert_chain))
        for alias, e in store.private_keys.items()
    ]
    return entries + [_Entry(alias, None, _ders([e.cert])) for alias, e in store.certs.items()]


def _jks_key(path: Path, entry: Any, passwords: Passwords) -> Any:
    import jks

    if not entry.is_decrypted():  # the store password did not open it: the key has its own
        try:
            entry.decrypt(_need(path, passwords.key()))
        except (jks.util.DecryptionFailureException, ValueError) as exc:
            raise _fail(path, "wrong_key_password", alias=entry.alias) from exc
    return serialization.load_der_private_key(entry.pkey_pkcs8, None)


def _load_pkcs12(path: Path, data: bytes, passwords: Passwords) -> list[_Entry]:
    bags = _pkcs12_key_bags(path, data)
    password, bundle = _open_pkcs12(path, data, passwords)
    named = [c for c in (bundle.cert, *bundle.additional_certs) if c is not None]
    pool = tuple(c.certificate for c in named)
    if not bags or password is None:  # no pyasn1, no password or unusual layout: one key only
        if bundle.key is None:
            return []
        name = bundle.cert.friendly_name if bundle.cert else None
        alias = name.decode() if name else None
        return [_Entry(alias, _const(bundle.key), _chain_in(bundle.key, pool))]
    keys = [(name, _decrypt_bag(path, der, password)) for name, der in bags]
    entries = [_Entry(name, _const(key), _chain_in(key, pool)) for name, key in keys]
    aliases, leaves = {e.alias for e in entries}, {e.certs[0] for e in entries if e.certs}
    return entries + [  # a named certificate without a key: keytool's trusted-certificate entry
        _Entry(c.friendly_name.decode(), None, (c.certificate,))
        for c in named
        if c.friendly_name
        and c.friendly_name.decode() not in aliases
        and c.certificate not in leaves
    ]


def _chain_in(key: Any, pool: tuple[x509.Certificate, ...]) -> tuple[x509.Certificate, ...]:
    leaf = _leaf_of(key, pool) if isinstance(key, rsa.RSAPrivateKey) else None
    return _order_chain(leaf, pool) if leaf else pool  # no leaf: _match reports the mismatch


def _open_pkcs12(
    path: Path, data: bytes, passwords: Passwords
) -> tuple[bytes | None, pkcs12.PKCS12KeyAndCertificates]:
    try:
        return None, pkcs12.load_pkcs12(data, None)
    except ValueError:
        pass  # encrypted, as nearly all are: only now is a password needed
    password = _need(path, passwords.keystore()).encode()
    try:
        return password, pkcs12.load_pkcs12(data, password)
    except ValueError as exc:
        raise _fail(path, "wrong_store_password") from exc


def _decrypt_bag(path: Path, der: bytes, password: bytes) -> Any:
    try:
        return serialization.load_der_private_key(der, password)
    except TypeError:  # a plain keyBag, not encrypted
        return serialization.load_der_private_key(der, None)
    except ValueError as exc:  # keytool and OpenSSL protect keys with the store password
        raise _fail(path, "unreadable_key") from exc


def _pkcs12_key_bags(path: Path, data: bytes) -> list[tuple[str | None, bytes]] | None:
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
        raise _fail(path, "unknown_format", read_as="PKCS#12") from exc
    return [(name(b), bytes(b["bagValue"])) for b in bags if b["bagId"] in key_bags]


_LOADERS: dict[str, Callable[[Path, bytes, Passwords], list[_Entry]]] = {
    "jks": _load_jks,
    "pkcs12": _load_pkcs12,
    "pem": _load_pem,
    "jwk": _load_jwk,
}


def certificate_warning(key: SigningKey, now: dt.datetime | float) -> str | None:
    """A warning when the signing certificate expires within 30 days (or has expired), judged
    anew at each call: the agent's status asks this of a key loaded long ago."""
    found = {p.check: p for p in certificate_problems(key.chain, now)}
    if "certificate_expiring" in found:
        return found["certificate_expiring"].message
    if "certificate_expired" in found:
        end = key.chain[0].not_valid_after_utc
        return f"the certificate ({describe(key.chain[0])}) expired on {end:%Y-%m-%d}"
    return None


def days_left(key: SigningKey, now: dt.datetime | float) -> int:
    return _days_until(key.chain[0].not_valid_after_utc, _utc(now))


def describe(cert: x509.Certificate) -> str:
    """A certificate as people know it: its common name and organisation number, instead of
    a full RFC 4514 subject with raw OIDs."""
    subject = cert.subject
    names = [str(a.value) for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    numbers = [str(a.value) for a in subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)]
    numbers += [
        str(a.value).removeprefix("NTRNO-")
        for a in subject.get_attributes_for_oid(NameOID.ORGANIZATION_IDENTIFIER)
    ]
    name = names[0] if names else subject.rfc4514_string()
    org = next((n for n in numbers if n.isdigit() and len(n) == 9), None)
    return f"{name}, org. no. {org}" if org else name
