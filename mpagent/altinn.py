"""Altinn 3 policy: where a Maskinporten token is exchanged for an Altinn token, how a system
user is asked for, and how long an exchanged token may be served. Pure: stdlib and
mpagent.errors only, no I/O (altinnapi.py makes the request).

Altinn does not accept Maskinporten tokens directly: "Organizations authenticated in
Maskinporten can exchange their JWT token for a valid Altinn Platform JWT token"
(docs.altinn.studio/authentication/what-do-you-get/, "Token exchange for Maskinporten"), by
`GET /authentication/api/v1/exchange/{tokenProvider}?test={bool}` with the token as Bearer,
"Set test equal to true if retrieving a token for Testdepartementet" (docs.altinn.studio,
Altinn Platform authentication component). MASKINPORTEN.md §3, §8.
"""

from __future__ import annotations

import ipaddress
import math
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

from mpagent.errors import ConfigError

# Altinn's platform hosts (docs.altinn.studio; the Postman guide on altinn.github.io/docs uses
# the tt02 URL; Altinn's own .NET client, Altinn/altinn-apiclient-maskinporten
# MaskinportenService.GetTokenExchangeEndpoint, names the same two).
EXCHANGE_PATH = "/authentication/api/v1/exchange/maskinporten"
TARGETS = {
    "altinn-tt02": "https://platform.tt02.altinn.no" + EXCHANGE_PATH,
    "altinn-prod": "https://platform.altinn.no" + EXCHANGE_PATH,
}

# ISO 6523 ICD 0192 is the Norwegian organisation number (Enhetsregisteret); Altinn's
# systemuser_org and Maskinporten's consumer claim both write it as "0192:<orgno>".
SYSTEMUSER = "urn:altinn:systemuser"
AUTHORITY = "iso6523-actorid-upis"
ORG_PREFIX = "0192:"
# Brønnøysundregistrene: "The organization number consists of 9 digits, where the last is a
# check digit calculated by weighting the individual digits with standard weights, modulus 11
# ... the weights 3, 2, 7, 6, 5, 4, 3 and 2"; remainder 0 gives check digit 0, remainder 1
# (check digit 10) is "not a valid check digit for the organization number"
# (brreg.no/english/coordination/number.html).
MOD11_WEIGHTS = (3, 2, 7, 6, 5, 4, 3, 2)
_NINE_DIGITS = re.compile(r"[0-9]{9}")  # ASCII only: str.isdigit() takes "٩" too


# -- where the exchange is ------------------------------------------------------------------


def check_target(target: object, where: str = "exchange") -> str:
    """`target` ("altinn-tt02", "altinn-prod" or an exchange URL) as it is kept, or a
    ConfigError naming `where`. A URL must be https: the Maskinporten token, a bearer secret,
    goes there (plain http only to a loopback host, for the emulator)."""
    if not isinstance(target, str) or not target.strip():
        raise ConfigError(
            f'{where} must be "altinn-tt02", "altinn-prod" or the https URL of an Altinn '
            "token exchange"
        )
    target = target.strip()
    if target in TARGETS:
        return target
    parts = urllib.parse.urlsplit(target)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        known = ", ".join(f'"{name}"' for name in TARGETS)
        raise ConfigError(
            f"{where} = {target!r} is neither {known} nor an https URL; for Altinn's test "
            'environment write exchange = "altinn-tt02"'
        )
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ConfigError(
            f"{where} = {target!r} is plain http: the Maskinporten token would cross the "
            "network readable; use https (plain http only to a loopback host, the emulator)"
        )
    if parts.query or parts.fragment:
        raise ConfigError(
            f"{where} = {target!r} has a query or fragment; write the exchange URL alone "
            "(set altinn_test_org = true for ?test=true)"
        )
    return target


def exchange_url(target: str, test_org: bool, where: str = "exchange") -> str:
    """The URL to GET: the target's, with `?test=true` for a test organisation (Altinn:
    "Set test equal to true if retrieving a token for Testdepartementet"; Altinn's .NET
    client appends exactly "?test=true" when UseAltinnTestOrg is set)."""
    target = check_target(target, where)
    url = TARGETS.get(target, target)
    return url + "?test=true" if test_org else url


def is_loopback(host: str) -> bool:
    """localhost or a loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- organisation numbers -------------------------------------------------------------------


def check_digit(first_eight: str) -> int | None:
    """The MOD11 check digit of an organisation number's first eight digits; None when the
    remainder is 1 (check digit 10: Brønnøysund issues no such number)."""
    remainder = sum(int(d) * w for d, w in zip(first_eight, MOD11_WEIGHTS, strict=True)) % 11
    if remainder == 0:
        return 0
    return None if remainder == 1 else 11 - remainder


def check_org_number(value: object, field: str) -> str:
    """A Norwegian organisation number, "123456785" or "0192:123456785", as its nine digits;
    a ConfigError naming `field` says what is wrong with anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        raise ConfigError(
            f'{field} = {value} must be a string: write it in quotes ("{value}"), as TOML '
            "would drop a leading zero"
        )
    if not isinstance(value, str):
        raise ConfigError(f'{field} must be a nine-digit organisation number, e.g. "123456785"')
    digits = value.strip()
    digits = digits.removeprefix(ORG_PREFIX)
    if not _NINE_DIGITS.fullmatch(digits):
        raise ConfigError(
            f"{field} = {value!r} is not a Norwegian organisation number: it has nine digits "
            '(optionally written "0192:" + nine digits), without spaces'
        )
    expected = check_digit(digits[:8])
    if expected is None:
        raise ConfigError(
            f"{field} = {value!r} cannot be an organisation number: no check digit fits its "
            "first eight digits (MOD11 gives 10); check for a mistyped digit"
        )
    if int(digits[8]) != expected:
        raise ConfigError(
            f"{field} = {value!r} has a wrong check digit: the last digit must be {expected} "
            f"for {digits[:8]} (MOD11, Brønnøysundregistrene); check for a mistyped digit"
        )
    return digits


# -- system users ---------------------------------------------------------------------------


def systemuser_details(
    org: str, external_ref: str | None = None, field: str = "systemuser_org"
) -> list[dict[str, Any]]:
    """The grant's authorization_details for a system user of organisation `org` (Altinn's
    documented form, MASKINPORTEN.md §3): one object per grant, ID "0192:" + the number."""
    detail: dict[str, Any] = {
        "type": SYSTEMUSER,
        "systemuser_org": {"authority": AUTHORITY, "ID": ORG_PREFIX + check_org_number(org, field)},
    }
    if external_ref is not None:
        if not isinstance(external_ref, str) or not external_ref.strip():
            raise ConfigError("externalRef must be a non-empty string (the vendor's reference)")
        detail["externalRef"] = external_ref
    return [detail]


def check_systemuser_grant(
    scopes: str | Iterable[str], details: object, where: str = "the grant"
) -> None:
    """What Maskinporten asks of a system-user grant, checked before any request: at most one
    system-user organisation (one object per grant) and at least one scope ("a scope is still
    required"), each systemuser_org a valid organisation number."""
    wanted = [
        s for entry in ([scopes] if isinstance(scopes, str) else scopes) for s in entry.split()
    ]
    if not isinstance(details, list):
        raise ConfigError(f"{where}: authorization_details must be a list of objects")
    systemusers = [d for d in details if isinstance(d, Mapping) and d.get("type") == SYSTEMUSER]
    if not systemusers:
        return
    if len(systemusers) > 1:
        raise ConfigError(
            f"{where} names {len(systemusers)} system-user organisations; Maskinporten takes one "
            "per token: ask for one token per organisation (e.g. --systemuser-org ORGNO)"
        )
    if not wanted:
        raise ConfigError(
            f"{where} asks for a system-user token without a scope; Maskinporten requires one: "
            "name the scope the system user was given"
        )
    org = systemusers[0].get("systemuser_org")
    if not isinstance(org, Mapping) or org.get("authority") != AUTHORITY:
        raise ConfigError(
            f'{where}: systemuser_org must be {{authority = "{AUTHORITY}", ID = "0192:ORGNO"}}'
        )
    check_org_number(org.get("ID"), f"{where}: systemuser_org.ID")


def systemuser_org_of(details: object) -> str | None:
    """The organisation number of the system user a token (or grant) is for, from its
    authorization_details: a list in Maskinporten's token, one object in Altinn's exchanged
    token (see emulator/altinn.py). None when there is none."""
    for detail in details if isinstance(details, list) else [details]:
        if isinstance(detail, Mapping) and detail.get("type") == SYSTEMUSER:
            org = detail.get("systemuser_org")
            ident = org.get("ID") if isinstance(org, Mapping) else None
            if isinstance(ident, str):
                return ident.removeprefix(ORG_PREFIX)
    return None


# -- expiry ---------------------------------------------------------------------------------


def altinn_expiry(altinn_token: str, maskinporten_expires_at: float) -> float:
    """When an exchanged token stops being served: the earlier of its own `exp` and the
    Maskinporten token's expiry (Altinn's .NET client also keeps the exchanged token only for
    the Maskinporten token's expires_in). The Altinn token is read, not verified: its exp only
    shortens the time it is served. Without a readable exp, the Maskinporten expiry."""
    from mpagent.tokens import unverified_claims  # not on the hot path (`get --systemuser-org`)

    exp = unverified_claims(altinn_token).get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        return maskinporten_expires_at
    return min(float(exp), maskinporten_expires_at)


# -- hints for Maskinporten's refusals of authorization_details ------------------------------


def rar_hint(mp_code: str | None, systemuser_org: str | None = None) -> str:
    """The next step for Maskinporten's RAR (RFC 9396) refusals (MASKINPORTEN.md §3), "" for
    any other code."""
    if mp_code == "MP-301":
        return (
            "Maskinporten does not know the authorization_details type; for a system user it is "
            f'"{SYSTEMUSER}"'
        )
    if mp_code == "MP-302":
        return (
            "authorization_details has fields Maskinporten does not know; a system user takes "
            "only type, systemuser_org and externalRef"
        )
    if mp_code == "MP-303":
        # Altinn's causes of MP-303 (docs.altinn.studio, system user troubleshooting, "Error
        # MP-303"): the system lacks this client_id in the system register, the system user was
        # requested with an externalRef the grant does not carry, or systemuser_org is not the
        # organisation that owns the system user.
        org = f"org {systemuser_org}" if systemuser_org else "that organisation"
        return (
            f"is there a system user for {org}, approved by that organisation? Altinn also "
            "answers this when the system in its system register lacks this client_id, when "
            "the system user was requested with an externalRef the grant lacks, or when the "
            "number is not that of the organisation owning the system user"
        )
    return ""
