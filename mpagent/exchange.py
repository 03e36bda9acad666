"""One profile's path from key material to access token: load the key, sign, exchange; and,
for a profile with `exchange`, the Maskinporten token exchanged for an Altinn token.

Shared by `mpagent get --no-agent` and the agent's refresher. Blocking (keyring, password
command, disk, HTTP): the agent runs it in worker threads.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from mpagent import altinn, altinnapi, grant
from mpagent.config import Config, Profile
from mpagent.errors import ConfigError, IssuerRejected, KeystoreError, MpagentError
from mpagent.issuer import Issuer, hint_for
from mpagent.keys import Passwords, SigningKey, keystore_from_env, load_signing_key, usage_cause
from mpagent.passwords import ProfilePasswords
from mpagent.tokens import Token, fingerprint

log = logging.getLogger(__name__)

# Refusals that a certificate Maskinporten will not take can give: "invalid certificate",
# "invalid signature", the generic "client authentication failed".
_CERTIFICATE_CODES = ("MP-120", "MP-124", "MP-100")


class Exchange:
    def __init__(
        self,
        profile: Profile,
        key: SigningKey,
        issuer: Issuer,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.profile, self.key, self.issuer, self.clock = profile, key, issuer, clock
        # One session per Exchange keeps the connection to Altinn between refreshes.
        self.altinn_session = altinnapi.new_session() if profile.exchange else None

    def grant(self, scopes: Iterable[str], claims: Mapping[str, Any] | None = None) -> str:
        """The signed grant for `scopes`, with the profile's claims or, for a per-customer
        token, `claims` (customer_claims)."""
        body = grant.claims(
            audience=self.issuer.endpoints().issuer,
            client_id=self.profile.client_id,
            scopes=scopes,
            now=self.clock(),
            jti=str(uuid.uuid4()),
            extra=self.profile.claims if claims is None else claims,
        )
        return grant.sign(self.key, body, kid=self.profile.kid, algorithm=self.profile.algorithm)

    def fetch(self, scopes: Iterable[str], claims: Mapping[str, Any] | None = None) -> Token:
        """A Maskinporten token for `scopes` (with `claims` in place of the profile's, when
        given); with `exchange`, the Altinn token it is exchanged for, served until the
        earlier of both expiries."""
        scopes = list(scopes)
        extra = self.profile.claims if claims is None else claims
        details = extra.get("authorization_details")
        if details is not None:
            altinn.check_systemuser_grant(scopes, details, f"profile {self.profile.name}")
        try:
            token = self.issuer.request_token(self.grant(scopes, extra))
        except IssuerRejected as exc:
            explained = self._explained(exc, details)
            if explained is exc:
                raise
            raise explained from exc
        log.debug(
            "profile %s: token %s for %r, %.0f s",
            self.profile.name,
            fingerprint(token.access_token),
            token.scope,
            token.lifetime,
        )
        return self._exchanged(token) if self.profile.exchange else token

    def _explained(self, exc: IssuerRejected, details: object) -> IssuerRejected:
        """The refusal with what it likely means for this profile: a hint naming it, the
        next step for an authorization_details refusal, or the certificate's likely cause."""
        if "<profile>" in exc.message:  # a hint naming the profile (MP-121: keys renew)
            named = exc.message.replace("<profile>", self.profile.name)
            return type(exc)(named, **exc.details)
        hint = altinn.rar_hint(exc.mp_code, altinn.systemuser_org_of(details))
        if hint:
            return type(exc)(f"{exc.message} — {hint}", **exc.details)
        cause = usage_cause(self.key)
        if cause is None or not may_be_the_certificate(exc):
            return exc
        message = f"{exc.message}. Likely cause: {cause}"
        return type(exc)(message, **exc.details, likely_cause=cause)

    def _exchanged(self, token: Token) -> Token:
        """The Altinn token for Maskinporten's `token`; altinnapi's errors say the step."""
        assert self.profile.exchange is not None
        connect_timeout, read_timeout = self.issuer.timeout
        altinn_token = altinnapi.exchange(
            self.profile.exchange,
            token.access_token,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            session=self.altinn_session,
        )
        expires_at = altinn.altinn_expiry(altinn_token, token.expires_at)
        log.debug(
            "profile %s: Altinn token %s from %s, %.0f s",
            self.profile.name,
            fingerprint(altinn_token),
            self.profile.exchange_name,
            expires_at - token.requested_at,
        )
        return Token(altinn_token, token.token_type, token.scope, token.requested_at, expires_at)


ONE_CUSTOMER = (
    "ask for a system-user token (systemuser_org) or a delegated one (consumer_org), not both "
    "at once"
)


def customer_claims(
    profile: Profile, systemuser_org: str | None = None, consumer_org: str | None = None
) -> dict[str, Any]:
    """The claims of a token for one customer organisation, asked for per request: the
    profile's, with authorization_details for a system user of `systemuser_org` (its
    externalRef the profile's systemuser_ref), or with consumer_org set (Altinn delegation).
    The one kind asked for replaces the other kind the profile may carry: a system user's
    token without the profile's consumer_org, a delegated one without its system user.
    A bad organisation number is a ConfigError naming the field."""
    if systemuser_org and consumer_org:
        raise ConfigError(ONE_CUSTOMER)
    claims = dict(profile.claims)
    if systemuser_org:
        claims.pop("consumer_org", None)
        claims["authorization_details"] = altinn.systemuser_details(
            systemuser_org, profile.systemuser_ref, "systemuser_org"
        )
    if consumer_org:
        details = [
            d
            for d in claims.pop("authorization_details", None) or []
            if not (isinstance(d, dict) and d.get("type") == altinn.SYSTEMUSER)
        ]
        if details:  # details of other types stay; the key goes when none is left
            claims["authorization_details"] = details
        if "iss_onbehalfof" in claims:
            raise ConfigError(
                f"profile {profile.name} sets iss_onbehalfof, and Maskinporten takes only one "
                "of iss_onbehalfof and consumer_org; use a profile without it"
            )
        claims["consumer_org"] = altinn.check_org_number(consumer_org, "consumer_org")
    return claims


def may_be_the_certificate(exc: IssuerRejected) -> bool:
    """Whether a refusal may come from the certificate: by its MP code, or an invalid_grant
    without a code or a known other cause. Scope and delegation refusals come after the
    certificate was accepted; clock, aud and replay refusals name their own cause."""
    if exc.mp_code is not None:
        return exc.mp_code in _CERTIFICATE_CODES
    known = hint_for(None, exc.error, exc.error_description or "")
    return exc.error == "invalid_grant" and not known


def load_key(
    profile: Profile, passwords: Passwords | None = None, *, strict: bool = True
) -> SigningKey:
    """The profile's signing key. Without `passwords`, they come from the profile's usual
    sources, with a prompt only in the foreground on a terminal. Without `keystore`, the
    keystore comes from the variable config resolved (Profile.keystore_env), in memory."""
    path, data = profile.keystore, None
    if path is None and profile.keystore_env is not None:
        try:
            found = keystore_from_env((profile.keystore_env,), os.environ)
        except KeystoreError as exc:
            raise KeystoreError(f"profile {profile.name}: {exc.message}", **exc.details) from None
        if found is not None:  # the variable names the keystore in messages
            path, data = Path(found[0]), found[1]
    if path is None:  # allowed only with admin_profile (config.py)
        raise KeystoreError(
            f"profile {profile.name} has no key yet; create one: "
            f"mpagent keys create --profile {profile.name} --switch",
            check="no_key",
        )
    if passwords is None:
        passwords = ProfilePasswords.for_profile(profile, interactive=sys.stdin.isatty())
    try:
        return load_signing_key(
            path,
            data=data,
            keystore_type=profile.keystore_type,
            alias=profile.alias,
            certificate=profile.certificate,
            passwords=passwords,
            x5c_mode=profile.kid is None,
            strict=strict,
        )
    except MpagentError as exc:
        # mpagent.keys knows files, not profiles: a password error says again which source it
        # used, and the other hints name the profile.
        explained = passwords.explain(exc) if isinstance(passwords, ProfilePasswords) else None
        if explained is not None:
            raise explained from exc
        if "<profile>" not in exc.message:
            raise
        raise type(exc)(exc.message.replace("<profile>", profile.name), **exc.details) from exc


def open_exchange(config: Config, profile: Profile, passwords: Passwords | None = None) -> Exchange:
    issuer = Issuer(
        profile.environment,
        connect_timeout=config.http.connect_timeout,
        read_timeout=config.http.read_timeout,
    )
    if passwords is None and config.agent.mode == "server":  # `get --no-agent` in CI: no keyring
        passwords = ProfilePasswords.for_profile(profile, server=True)
    return Exchange(profile, load_key(profile, passwords), issuer)
