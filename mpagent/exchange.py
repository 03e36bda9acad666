"""One profile's path from key material to access token: load the key, sign, exchange.

Shared by `mpagent get --no-agent` and the agent's refresher. Blocking (keyring, password
command, disk, HTTP): the agent runs it in worker threads.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections.abc import Callable, Iterable

from mpagent import grant
from mpagent.config import Config, Profile
from mpagent.errors import IssuerRejected, MpagentError
from mpagent.issuer import Issuer, hint_for
from mpagent.keys import Passwords, SigningKey, load_signing_key, usage_cause
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

    def grant(self, scopes: Iterable[str]) -> str:
        body = grant.claims(
            audience=self.issuer.endpoints().issuer,
            client_id=self.profile.client_id,
            scopes=scopes,
            now=self.clock(),
            jti=str(uuid.uuid4()),
            extra=self.profile.claims,
        )
        return grant.sign(self.key, body, kid=self.profile.kid, algorithm=self.profile.algorithm)

    def fetch(self, scopes: Iterable[str]) -> Token:
        try:
            token = self.issuer.request_token(self.grant(scopes))
        except IssuerRejected as exc:
            cause = usage_cause(self.key)
            if cause is None or not may_be_the_certificate(exc):
                raise
            message = f"{exc.message}. Likely cause: {cause}"
            raise type(exc)(message, **exc.details, likely_cause=cause) from exc
        log.debug(
            "profile %s: token %s for %r, %.0f s",
            self.profile.name,
            fingerprint(token.access_token),
            token.scope,
            token.lifetime,
        )
        return token


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
    sources, with a prompt only in the foreground on a terminal."""
    if passwords is None:
        passwords = ProfilePasswords.for_profile(profile, interactive=sys.stdin.isatty())
    try:
        return load_signing_key(
            profile.keystore,
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
    return Exchange(profile, load_key(profile, passwords), issuer)
