"""Maskinporten's grant rules (MASKINPORTEN.md §2-§4) as pure functions: values in, claims out or
`Rejection` raised in Maskinporten's error shape, codes and texts. No sockets and no clock reads:
the caller passes `now`, and the random parts (trace id, token jti) are passed in too.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.x509.oid import NameOID

from mpagent.emulator.admin import KeySet

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ALGORITHMS = ("RS256", "RS384", "RS512")
REQUIRED_CLAIMS = ("aud", "iss", "iat", "exp", "scope")
OPTIONAL_CLAIMS = (
    "jti",
    "resource",
    "consumer_org",
    "iss_onbehalfof",
    "pid",
    "authorization_details",
    # Not in Digdir's claim list, which says other claims get "Invalid assertion", but accepted by
    # production: NAV's digdirator sends NotBefore in every grant (nais/digdirator
    # pkg/digdir/auth.go), and Altinn's documented system-user grant example carries sub = the
    # client id (MASKINPORTEN.md §7).
    "nbf",
    "sub",
)
ALLOWED_CLAIMS = frozenset(REQUIRED_CLAIMS + OPTIONAL_CLAIMS)
# PyJWT checks the signature and presence; times are checked against the caller's `now`.
# jti is only "recommended" by Digdir: without one, replay is detected on the whole grant.
DECODE_OPTIONS: Any = {"require": list(REQUIRED_CLAIMS)} | dict.fromkeys(
    ("verify_exp", "verify_iat", "verify_nbf", "verify_aud", "verify_iss"), False
)
AUTHORIZATION_DETAIL_FIELDS = {
    "urn:altinn:systemuser": frozenset({"type", "systemuser_org", "externalRef"}),
    "urn:altinn:consent": frozenset({"type", "id", "from"}),
}
CLOCK_SKEW = 10  # seconds, either way; for iat and nbf alike
# exp - iat: Digdir's docs say at most 120 s, but the server allows 180. An Altinn maintainer who
# read the server reports maxLifetimeJwt = 180 s and skew = 10 s (Altinn/altinn-studio#19603), a
# docs PR reports that over 180 s gives 400 (felleslosninger/docs#455), and Digdir's own Java tool
# reads the clock twice and sometimes sends 121. So: up to 180 passes, above 120 with a warning.
DOCUMENTED_GRANT_LIFETIME = 120
MAX_GRANT_LIFETIME = 180
# A client's registered access_token_lifetime is at most 7,200 s (Digdir's examples show 599,
# 3599 and 7199); 120 s is the default (MASKINPORTEN.md §4, §7).
DEFAULT_TOKEN_LIFETIME = 120
MAX_TOKEN_LIFETIME = 7200
MAX_CHAIN = 8
# The spec's table elides the start of some descriptions ("... Invalid JWT claim aud"); MP-100's
# documented text is the natural prefix for every client-authentication failure.
AUTH_FAILED = "Invalid assertion. Client authentication failed."
BAD_VALUE = "Invalid assertion. Invalid parameter value"


class Rejection(Exception):
    """A 400 in Maskinporten's shape. `code` is "MP-xxx", or None where none is documented."""

    def __init__(self, error: str, text: str, code: str | None = None, reason: str = "") -> None:
        self.error = error
        self.code = code
        self.description = f"{text} ({reason})" if reason else text
        super().__init__(self.description)

    def body(self, trace_id: str) -> dict[str, str]:
        out = {
            "error": self.error,
            "error_description": f"{self.description} (trace_id: {trace_id})",
        }
        if self.code:
            out["error_uri"] = f"https://maskinporten.no/errors/{self.code}"
        return out


def _bad_request(reason: str) -> Rejection:
    return Rejection("invalid_request", BAD_VALUE, "MP-011", reason)


def _bad_grant(reason: str) -> Rejection:
    return Rejection("invalid_grant", BAD_VALUE, "MP-011", reason)


def _bad_certificate(reason: str) -> Rejection:
    text = f"{AUTH_FAILED} The JWT is signed with an invalid certificate."
    return Rejection("invalid_grant", text, "MP-120", reason)


def parse_form(content_type: str, body: bytes) -> str:
    """The assertion from a form-encoded jwt-bearer token request."""
    if content_type != "application/x-www-form-urlencoded":
        raise _bad_request("Content-Type must be application/x-www-form-urlencoded")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad_request("the body is not a valid form") from exc
    form = dict(pairs)
    if len(form) != len(pairs):
        raise _bad_request("a parameter is repeated")
    if form.get("grant_type") != JWT_BEARER:
        raise _bad_request(f"grant_type must be {JWT_BEARER}")
    if not form.get("assertion"):
        raise _bad_request("assertion is missing")
    return form["assertion"]


def validate_grant(
    assertion: str,
    *,
    issuer: str,
    clients: Mapping[str, frozenset[str]],
    jwks: Mapping[str, RSAPublicKey],
    trust: Sequence[x509.Certificate],
    now: float,
    client_keys: Callable[[str], KeySet] | None = None,
) -> tuple[dict[str, Any], str | None]:
    """The grant's claims and the certificate's org number (None for a registered key), once
    every rule that needs no state holds. Replay is the caller's to check.

    `jwks` are keys valid for every client (the emulator's --jwk); `client_keys(client_id)` is
    the client's own key set as /token sees it (registered through the admin API)."""
    header = read_header(assertion)
    own = client_keys(unverified_client(assertion)) if client_keys else KeySet()
    org: str | None = None
    if "kid" in header:  # a registered key wins over a certificate sent alongside
        key = registered_key(header["kid"], jwks, own, now)
    elif own.keys:
        # Digdir: a client with registered keys *must* name one with kid instead of x5c
        # (felleslosninger/docs oidc_api_admin.md, "må klienter som har registrert en nøkkel
        # bruke kid"); the text is MASKINPORTEN.md §4's.
        text = "The client requires pre-registered jwk and no key identifier (kid) provided"
        raise Rejection("invalid_grant", f"{AUTH_FAILED} {text}")
    else:
        key, org = certificate_key(header.get("x5c"), trust, now)
    grant = verify_signature(assertion, key, header["alg"])
    check_claims(grant, issuer=issuer, clients=clients, now=now)
    return grant, org


def read_header(assertion: str) -> dict[str, Any]:
    """The unverified JOSE header, once it names a supported alg and a key (kid or x5c)."""
    try:
        header = jwt.get_unverified_header(assertion)
    except jwt.InvalidTokenError as exc:
        raise _bad_request("the assertion is not a signed JWT") from exc
    if header.get("alg") not in ALGORITHMS:
        raise _bad_grant(f"alg {header.get('alg')} is not supported; use RS256, RS384 or RS512")
    if "kid" not in header and "x5c" not in header:
        raise _bad_grant("the JWT header needs x5c or kid")
    return header


def unverified_client(assertion: str) -> str:
    """The grant's iss before its signature is checked: the client whose keys to look in
    ("" when there is none; the signature and claim checks then say what is wrong)."""
    try:
        claims = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return ""
    return claims["iss"] if isinstance(claims.get("iss"), str) else ""


def registered_key(
    kid: str, jwks: Mapping[str, RSAPublicKey], own: KeySet | None = None, now: float = 0.0
) -> RSAPublicKey:
    """The key a kid grant names: the client's own (refused once its exp has passed), else one
    of the keys valid for every client."""
    mine = own.get(kid) if own is not None else None
    if mine is not None:
        # A registered key lives one year from upload (MASKINPORTEN.md §4 MP-121, §8).
        if mine.expired(now):
            raise Rejection("invalid_grant", f"{AUTH_FAILED} Expired key", "MP-121")
        return mine.public_key
    if kid not in jwks:
        raise Rejection("invalid_grant", f"{AUTH_FAILED} Unknown key identifier (kid) for client")
    return jwks[kid]


def certificate_key(
    x5c: Any, trust: Sequence[x509.Certificate], now: float
) -> tuple[RSAPublicKey, str]:
    """The leaf's public key and organisation number, once the x5c chain checks out."""
    if not isinstance(x5c, list) or not x5c or not all(isinstance(c, str) for c in x5c):
        raise Rejection("invalid_grant", "Invalid JWT header x5c", "MP-123")
    chain = [_load_der(entry, i) for i, entry in enumerate(x5c)]
    leaf = chain[0]
    at = dt.datetime.fromtimestamp(now, dt.UTC)
    _check_validity(leaf, at, "certificate")
    _check_chain(leaf, chain[1:], trust, at)
    _check_key_usage(leaf)
    key = leaf.public_key()
    if not isinstance(key, RSAPublicKey):
        raise _bad_certificate("certificate key is not RSA")
    org = org_number(leaf)
    if org is None:
        raise _bad_certificate("certificate subject has no organisation number")
    return key, org


def _load_der(entry: str, index: int) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(base64.b64decode(entry, validate=True))
    except (binascii.Error, ValueError) as exc:
        raise _bad_certificate(f"x5c[{index}] is not a base64 DER certificate") from exc


def _check_validity(cert: x509.Certificate, at: dt.datetime, what: str) -> None:
    if at < cert.not_valid_before_utc:
        raise _bad_certificate(f"{what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d}")
    if at > cert.not_valid_after_utc:
        raise _bad_certificate(f"{what} expired on {cert.not_valid_after_utc:%Y-%m-%d}")


def _check_chain(
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    trust: Sequence[x509.Certificate],
    at: dt.datetime,
) -> None:
    current, pool = leaf, [c for c in intermediates if _is_ca(c)]
    for _ in range(MAX_CHAIN):
        if current in trust:
            return
        anchor = _find_issuer(current, trust)
        if anchor is not None:
            _check_validity(anchor, at, "trusted CA certificate")
            return
        issuer = _find_issuer(current, pool)
        if issuer is None:
            hint = "" if trust else "; the emulator trusts no CA"
            raise _bad_certificate(f"certificate is not issued by a trusted CA{hint}")
        _check_validity(issuer, at, "intermediate CA certificate")
        pool.remove(issuer)
        current = issuer
    raise _bad_certificate("certificate chain is too long")


def _find_issuer(
    cert: x509.Certificate, candidates: Iterable[x509.Certificate]
) -> x509.Certificate | None:
    for candidate in candidates:
        try:
            cert.verify_directly_issued_by(candidate)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return candidate
    return None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _check_key_usage(leaf: x509.Certificate) -> None:
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return  # RFC 5280: no extension, no restriction
    # nonRepudiation alone is accepted: Digdir's own published test keystore for grants
    # (felleslosninger/maskinporten-test-jwt-grant, Buypass Class 3 Test4, "Digdir test",
    # org. no. 991825827) has key usage nonRepudiation only, and production takes its grants.
    # A key usage without either signing bit (RFC 5280 §4.2.1.3) cannot sign anything.
    if not (usage.digital_signature or usage.content_commitment):
        raise _bad_certificate("certificate key usage allows no signature")


def org_number(cert: x509.Certificate) -> str | None:
    """From the subject serialNumber (SEID 1) or organizationIdentifier NTRNO-… (SEID 2)."""
    for attr in cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER):
        if re.fullmatch(r"[0-9]{9}", str(attr.value)):
            return str(attr.value)
    for attr in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_IDENTIFIER):
        if match := re.fullmatch(r"NTRNO-([0-9]{9})", str(attr.value)):
            return match.group(1)
    return None


def verify_signature(assertion: str, key: RSAPublicKey, alg: str) -> dict[str, Any]:
    """The claims, once the signature verifies and the required claims are present."""
    try:
        return jwt.decode(assertion, key, algorithms=[alg], options=DECODE_OPTIONS)
    except jwt.InvalidSignatureError as exc:
        raise Rejection("invalid_grant", f"{AUTH_FAILED} Invalid JWT signature", "MP-124") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise _bad_grant(f"missing claim {exc.claim}") from exc
    except jwt.InvalidTokenError as exc:
        raise _bad_grant(str(exc)) from exc


def check_claims(
    claims: Mapping[str, Any], *, issuer: str, clients: Mapping[str, frozenset[str]], now: float
) -> None:
    """Every §2 rule that needs no state. Raises `Rejection`."""
    unknown = sorted(set(claims) - ALLOWED_CLAIMS)
    if unknown:
        raise _bad_grant(f"claims not allowed in a grant: {', '.join(unknown)}")
    _check_aud(claims["aud"], issuer)
    if not isinstance(claims["iss"], str) or claims["iss"] not in clients:
        raise Rejection("invalid_grant", f"{AUTH_FAILED} Client not found", "MP-100")
    _check_times(claims, now)
    if "sub" in claims and claims["sub"] != claims["iss"]:
        raise _bad_grant("sub must be the client id (the same as iss), or left out")
    _check_optional(claims)
    if "authorization_details" in claims:
        check_authorization_details(claims["authorization_details"])
    scopes = claims["scope"].split() if isinstance(claims["scope"], str) else []
    if not scopes:
        raise _bad_grant("scope must be a non-empty space-separated string")
    invalid = [s for s in scopes if s not in clients[claims["iss"]]]
    if invalid:
        raise Rejection(
            "invalid_scope",
            f"Token request contains invalid scopes for client, {' '.join(invalid)}",
            "MP-200",
        )


def _check_aud(aud: Any, issuer: str) -> None:
    if aud == issuer:
        return
    if not isinstance(aud, str):
        reason = "aud must be one string"
    elif aud == issuer.rstrip("/") + "/token":
        reason = f"aud is the token endpoint URL; use the issuer {issuer}"
    elif aud.rstrip("/") == issuer.rstrip("/"):
        reason = f"the trailing slash differs; use {issuer}"
    else:
        reason = f"expected {issuer}"
    raise Rejection("invalid_grant", f"{AUTH_FAILED} Invalid JWT claim aud", "MP-110", reason)


def _check_times(claims: Mapping[str, Any], now: float) -> None:
    times = {name: claims[name] for name in ("iat", "exp", "nbf") if name in claims}
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in times.values()):
        raise _bad_grant("iat, exp and nbf must be numbers of seconds since the epoch")
    iat, exp = times["iat"], times["exp"]
    if exp <= now:
        raise Rejection("invalid_grant", "JWT is expired", "MP-130")
    if iat > now + CLOCK_SKEW:
        ahead = f"iat is {iat - now:.0f} s ahead of Maskinporten's clock; check the local clock"
        raise Rejection("invalid_grant", "Issue time is after now", None, ahead)
    # Production's text for a future nbf is not documented; this mirrors the iat one.
    if times.get("nbf", now) > now + CLOCK_SKEW:
        ahead = f"nbf is {times['nbf'] - now:.0f} s ahead of Maskinporten's clock"
        fix = "set nbf to iat, or leave it out"
        raise Rejection("invalid_grant", "JWT is not valid yet", None, f"{ahead}; {fix}")
    if exp - iat > MAX_GRANT_LIFETIME:
        raise _bad_grant(f"exp - iat is {exp - iat:.0f} s; at most {MAX_GRANT_LIFETIME}")
    if iat < now - CLOCK_SKEW:
        raise _bad_grant(f"iat is {now - iat:.0f} s behind Maskinporten's clock; at most 10")


def grant_warnings(claims: Mapping[str, Any]) -> list[str]:
    """What an accepted grant does that production tolerates but the docs forbid."""
    lifetime = claims["exp"] - claims["iat"]
    if lifetime <= DOCUMENTED_GRANT_LIFETIME:
        return []
    return [
        f"exp - iat is {lifetime:.0f} s: accepted, as production allows up to "
        f"{MAX_GRANT_LIFETIME} s, but Maskinporten's docs say at most "
        f"{DOCUMENTED_GRANT_LIFETIME}; compute iat and exp from one clock reading"
    ]


def _check_optional(claims: Mapping[str, Any]) -> None:
    for name in ("jti", "consumer_org", "iss_onbehalfof", "pid"):
        if name in claims and not isinstance(claims[name], str):
            raise _bad_grant(f"{name} must be a string")
    resource = claims.get("resource", "")
    strings = isinstance(resource, list) and all(isinstance(r, str) for r in resource)
    if not isinstance(resource, str) and not (resource and strings):
        raise _bad_grant("resource must be a string or an array of strings")
    if "consumer_org" in claims:
        if not re.fullmatch(r"[0-9]{9}", claims["consumer_org"]):  # \d takes "٩" too
            raise _bad_grant("consumer_org must be a 9-digit organisation number")
        if "iss_onbehalfof" in claims:
            raise _bad_grant("consumer_org cannot be combined with iss_onbehalfof")


def check_authorization_details(details: Any) -> None:
    """RFC 9396 objects of the two Altinn types (MASKINPORTEN.md §3)."""
    if not isinstance(details, list) or not details:
        raise _bad_grant("authorization_details must be a non-empty array")
    for detail in details:
        kind = detail.get("type") if isinstance(detail, dict) else None
        fields = AUTHORIZATION_DETAIL_FIELDS.get(kind) if isinstance(kind, str) else None
        if fields is None:
            text = f"Unknown authorization_details type {kind}"
            raise Rejection("invalid_authorization_details", text, "MP-301")
        if unknown := sorted(set(detail) - fields):
            text = f"Unknown fields in authorization_details: {', '.join(unknown)}"
            raise Rejection("invalid_authorization_details", text, "MP-302")
        if kind == "urn:altinn:systemuser":
            _check_systemuser_org(detail.get("systemuser_org"))
    # One urn:altinn:systemuser object per grant (MASKINPORTEN.md §3): Altinn's usetoken guide
    # has the vendor ask "for a specific customer by providing the customer's organization
    # number", Maskinporten looks up one system user (GetSystemUser(client_id,
    # systemUserOrgNo)), and the exchanged Altinn token carries one object (emulator/altinn.py).
    # A second is a bad value: MP-303, the code for bad system-user values (§3).
    if sum(d["type"] == "urn:altinn:systemuser" for d in details) > 1:
        text = "Only one authorization_details object of type urn:altinn:systemuser per request"
        raise Rejection("invalid_altinn_customer_configuration", text, "MP-303")


def _check_systemuser_org(org: Any) -> None:
    ok = (
        isinstance(org, dict)
        and org.get("authority") == "iso6523-actorid-upis"
        and re.fullmatch(r"0192:[0-9]{9}", str(org.get("ID", ""))) is not None
    )
    if not ok:
        text = (
            'Invalid systemuser_org, expected {"authority": "iso6523-actorid-upis", "ID": "0192:…"}'
        )
        raise Rejection("invalid_altinn_customer_configuration", text, "MP-303")


def access_token_claims(
    grant: Mapping[str, Any], *, issuer: str, org: str | None, now: float, lifetime: int, jti: str
) -> dict[str, Any]:
    """The access token's body for an accepted grant; `org` is the certificate's, if any."""
    iat = int(now)
    claims: dict[str, Any] = {
        "iss": issuer,
        "client_id": grant["iss"],
        "scope": grant["scope"],
        "token_type": "Bearer",
        "iat": iat,
        "exp": iat + lifetime,
        "jti": jti,
        # Digdir sets "unspecified" when no audience-restricted token was asked for.
        "aud": grant.get("resource", "unspecified"),
        "client_amr": "virksomhetssertifikat" if org else "private_key_jwt",
    }
    if org and "consumer_org" in grant:
        claims["consumer"] = _org_claim(grant["consumer_org"])
        claims["supplier"] = _org_claim(org)
    elif org:
        claims["consumer"] = _org_claim(org)
    for name in ("pid", "authorization_details"):
        if name in grant:
            claims[name] = grant[name]
    return claims


def _org_claim(orgno: str) -> dict[str, str]:
    return {"authority": "iso6523-actorid-upis", "ID": f"0192:{orgno}"}
