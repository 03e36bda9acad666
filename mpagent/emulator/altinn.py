"""The emulator's Altinn 3 parts: the token exchange (`GET /authentication/api/v1/exchange/
maskinporten`) and which organisations each client has a system user for.

Like rules.py, pure functions: the server passes the request's parts, its clock reading, its
token verifier and its key, and sends what comes back.

Evidence for the exchanged token's shape: real tt02 tokens in Altinn/app-lib-dotnet's
AuthenticatedTests ("Maskinporten exchanged org token", "Exchanged Maskinporten for
systemuser"). They carry scope, token_type, client_id and consumer from the Maskinporten
token, add urn:altinn:orgNumber (the consumer's number without "0192:"),
urn:altinn:authenticatemethod = "maskinporten", urn:altinn:authlevel = 3, iss = the platform's
`/authentication/api/v1/openid/`, a fresh jti, iat = nbf = the exchange time; the header has
alg RS256, kid and typ JWT. Their exp is 1800 s after the exchange, past the Maskinporten
token's own exp (120 s tokens): production does not cap it, and neither does this emulator,
so a client must take the earlier expiry itself (altinn.altinn_expiry).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from mpagent.altinn import AUTHORITY, ORG_PREFIX, systemuser_org_of
from mpagent.emulator.rules import Rejection

EXCHANGE_PATH = "/authentication/api/v1/exchange/maskinporten"
OPENID_PATH = "/authentication/api/v1/openid/"
DEFAULT_LIFETIME = 1800  # the tt02 tokens above: exp - iat = 1800
TEXT = "text/plain; charset=utf-8"
# With ?test=true, Altinn gives a service-owner token of Digdir's the service owner
# Testdepartementet, urn:altinn:org = "ttd" (Altinn/altinn-authentication
# AuthenticationControllerTests,
# AuthenticateOrganisationWithSoScope_RequestTestTokenWithValidExternalToken_ReturnsNewToken).
TEST_ORG = "ttd"
SERVICEOWNER = "altinn:serviceowner"


def handle_exchange(
    authorization: str | None,
    query: str,
    *,
    verify: Callable[[str], Mapping[str, Any]],
    signing_key: RSAPrivateKey,
    lifetime: int = DEFAULT_LIFETIME,
    now: float,
    issuer: str | None = None,
    kid: str | None = None,
) -> tuple[int, bytes, str]:
    """(status, body, content type) answering one exchange request. Only an unexpired Bearer
    token that `verify` (the emulator's own verifier: signature and issuer; it raises
    jwt.InvalidTokenError or ValueError for any other token) accepts gets an Altinn token, as
    plain text; anything else a 401 with a short reason, as Altinn answers a missing, unreadable
    or foreign token (AuthenticationControllerTests: MissingBearerToken, UnreadableBearerToken,
    InvalidIss all give 401). `issuer` is the Altinn token's iss: the server's base URL +
    OPENID_PATH."""
    test = _test_flag(query)
    if test is None:
        return 400, b"test must be true or false", TEXT
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return 401, b"send Authorization: Bearer <a Maskinporten access token>", TEXT
    try:
        claims = dict(verify(token.strip()))
    except (jwt.InvalidTokenError, ValueError):
        return 401, b"the token was not issued by this Maskinporten", TEXT
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float) or exp <= now:
        return 401, b"the Maskinporten token has expired", TEXT
    body = altinn_claims(claims, now=now, lifetime=lifetime, issuer=issuer, test=test)
    headers = {"typ": "JWT"} | ({"kid": kid} if kid else {})
    altinn_token = jwt.encode(body, signing_key, algorithm="RS256", headers=headers)
    return 200, altinn_token.encode("ascii"), TEXT


def _test_flag(query: str) -> bool | None:
    """?test=true / false (any case, as ASP.NET binds a bool), absent: False; else None."""
    values = [v for k, v in parse_qsl(query, keep_blank_values=True) if k.lower() == "test"]
    if not values:
        return False
    return {"true": True, "false": False}.get(values[-1].strip().lower())


def altinn_claims(
    mp: Mapping[str, Any], *, now: float, lifetime: int, issuer: str | None, test: bool = False
) -> dict[str, Any]:
    """The Altinn token's body for a verified Maskinporten token's claims `mp`."""
    iat = int(now)
    claims: dict[str, Any] = {}
    details = mp.get("authorization_details")
    if details is not None:
        # The exchanged system-user token holds the one detail as an object where
        # Maskinporten's token holds a one-element array (the tt02 tokens above).
        claims["authorization_details"] = (
            details[0] if isinstance(details, list) and len(details) == 1 else details
        )
    for name in ("scope", "client_id"):
        if name in mp:
            claims[name] = mp[name]
    claims.update({"token_type": "Bearer", "iat": iat, "nbf": iat, "exp": iat + lifetime})
    for name in ("consumer", "supplier"):
        if name in mp:
            claims[name] = mp[name]
    consumer = mp.get("consumer")
    ident = consumer.get("ID") if isinstance(consumer, Mapping) else None
    if isinstance(ident, str):
        claims["urn:altinn:orgNumber"] = ident.removeprefix(ORG_PREFIX)
    if test and any(s.startswith(SERVICEOWNER) for s in str(mp.get("scope", "")).split()):
        claims["urn:altinn:org"] = TEST_ORG
    claims["urn:altinn:authenticatemethod"] = "maskinporten"
    claims["urn:altinn:authlevel"] = 3
    if issuer:
        claims["iss"] = issuer
    claims["jti"] = str(uuid.uuid4())
    return claims


# -- system users (for the token endpoint) ---------------------------------------------------


def parse_systemusers(specs: list[str] | tuple[str, ...]) -> dict[str, frozenset[str]]:
    """`--systemuser CLIENT=ORGNO,ORGNO ...` (repeatable) as {client_id: organisations};
    ValueError naming the bad entry."""
    found: dict[str, set[str]] = {}
    for spec in specs:
        client, _, orgs = spec.partition("=")
        numbers = [o.strip().removeprefix(ORG_PREFIX) for o in orgs.split(",") if o.strip()]
        if not client.strip() or not numbers:
            raise ValueError(f"--systemuser {spec!r}: write CLIENT_ID=ORGNO[,ORGNO...]")
        if bad := [n for n in numbers if not re.fullmatch(r"[0-9]{9}", n)]:
            raise ValueError(f"--systemuser {spec!r}: {bad[0]!r} is not a nine-digit number")
        found.setdefault(client.strip(), set()).update(numbers)
    return {client: frozenset(orgs) for client, orgs in found.items()}


def check_systemuser(
    client_id: str, details: Any, systemusers: Mapping[str, frozenset[str]]
) -> None:
    """The urn:altinn:systemuser detail of a grant (one at most, rules.
    check_authorization_details) names an organisation that has a system user for this
    client, else Maskinporten's MP-303 invalid_altinn_customer_configuration.
    Maskinporten asks Altinn for the system user by (client_id, systemuser_org): "Maskinporten
    ->> Altinn Authorization: GetSystemUser(client_id, systemUserOrgNo)", and issues the token
    only "If a valid System User exists in Altinn" (docs.altinn.studio, authorization/guides/
    system-vendor/system-user/usetoken); Altinn's troubleshooting page for MP-303: no system
    user registered for the client and organisation. Run after
    rules.check_authorization_details (shape, MP-301/302)."""
    for detail in details if isinstance(details, list) else []:
        org = systemuser_org_of([detail])
        if org is None or org in systemusers.get(client_id, frozenset()):
            continue
        text = (
            f"No system user found for client {client_id} and systemuser_org "
            f"{AUTHORITY} {ORG_PREFIX}{org}"
        )
        raise Rejection("invalid_altinn_customer_configuration", text, "MP-303")


SYSTEMUSER_NAMESPACE = uuid.UUID("6f0d3c2e-5b8a-4e57-9d7c-2a1b0c9e8f41")  # this emulator's own


def token_details(details: Any, client_id: str, vendor_org: str | None) -> Any:
    """A grant's authorization_details as Maskinporten puts them in the access token of a
    system user it found: each urn:altinn:systemuser detail gains systemuser_id (a list of
    the system user's ids) and system_id ("<vendor orgno>_<name>") beside what the grant sent
    (the usetoken page's "Token contents", and the real tt02 token in app-lib-dotnet's
    AuthenticatedTests: systemuser_org, systemuser_id, system_id, externalRef). The ids here
    are stable per client and organisation, so the same system user has the same id."""
    if not isinstance(details, list):
        return details
    out = []
    for detail in details:
        org = systemuser_org_of([detail])
        if org is not None:
            ident = uuid.uuid5(SYSTEMUSER_NAMESPACE, f"{client_id}/{org}")
            system = f"{vendor_org}_emulator" if vendor_org else "emulator"
            detail = dict(detail) | {"systemuser_id": [str(ident)], "system_id": system}
        out.append(detail)
    return out
