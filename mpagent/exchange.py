"""One profile's path from key material to access token: load the key, sign, exchange.

Shared by `mpagent get --no-agent` and the agent's refresher. Blocking (keyring, disk, HTTP):
the agent runs it in worker threads.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable

from mpagent import grant
from mpagent.config import Config, Profile
from mpagent.errors import MpagentError
from mpagent.issuer import Issuer, Token, fingerprint
from mpagent.keys import Passwords, SigningKey, load_signing_key
from mpagent.passwords import ProfilePasswords

log = logging.getLogger(__name__)


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
        token = self.issuer.request_token(self.grant(scopes))
        log.debug(
            "profile %s: token %s for %r, %.0f s",
            self.profile.name,
            fingerprint(token.access_token),
            token.scope,
            token.lifetime,
        )
        return token


def load_key(profile: Profile, passwords: Passwords | None = None) -> SigningKey:
    try:
        return load_signing_key(
            profile.keystore,
            keystore_type=profile.keystore_type,
            alias=profile.alias,
            certificate=profile.certificate,
            passwords=passwords or ProfilePasswords(profile.name),
            x5c_mode=profile.kid is None,
        )
    except MpagentError as exc:
        # keys.py knows files, not profiles: name the profile in its "how to fix" hints.
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
