"""The certificate checks, pure: `certificate_problems(chain, now)` judges a chain for signing
grants (what Maskinporten certainly refuses is an ERROR, what it may refuse a WARNING), used at
load and by `mpagent doctor`; plus the chain order, key usages and the names people know a
certificate by. The emulator keeps its own, independent checks (mpagent.emulator.rules)."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from mpagent.keys.common import ERROR, WARNING, Problem, SigningKey

EXPIRY_WARNING_DAYS = 30
# RFC 5280 KeyUsage bits by the names certificate viewers and Digdir's docs use.
_USAGES = {"digital_signature": "digitalSignature", "content_commitment": "nonRepudiation"}
_USAGES |= {"key_encipherment": "keyEncipherment", "data_encipherment": "dataEncipherment"}
_USAGES |= {"key_agreement": "keyAgreement", "key_cert_sign": "keyCertSign", "crl_sign": "cRLSign"}


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


def leaf_of(key: Any, certs: Iterable[x509.Certificate]) -> x509.Certificate | None:
    """The certificate of `key` among `certs`, if any."""
    numbers = key.public_key().public_numbers()
    for cert in certs:
        public = cert.public_key()
        if isinstance(public, rsa.RSAPublicKey) and public.public_numbers() == numbers:
            return cert
    return None


def order_chain(
    leaf: x509.Certificate, pool: Sequence[x509.Certificate]
) -> tuple[x509.Certificate, ...]:
    """`leaf`, then its issuer from `pool`, and so on up to a self-signed one or a gap."""
    chain = [leaf]
    while chain[-1].issuer != chain[-1].subject:
        issuer = next((c for c in pool if c.subject == chain[-1].issuer and c not in chain), None)
        if issuer is None:
            break
        chain.append(issuer)
    return tuple(chain)


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
