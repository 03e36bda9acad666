"""Digdir's self-service API for integration management, the part that holds a client's own
keys: `GET|POST|DELETE {base}{client_id}/jwks` (Digdir's admin-API docs; MASKINPORTEN.md §8;
the wire contract in PLAN13). Authorised by a Maskinporten token with idporten:dcr.read (to
read) or idporten:dcr.write (to change), which mpagent fetches itself from the admin profile.

As with the token endpoint (issuer.py, whose deadline and error wording this reuses): each
request has a total deadline and a size limit, never follows a redirect (the bearer token
would go along), and turns every failure into one of mpagent's errors: the network and 5xx
into IssuerUnavailable, a refusal (4xx) or a body it cannot use into AdminApiError with the
next step. The bearer token is never shown or logged, only its fingerprint.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import requests

from mpagent.config import Config, Profile
from mpagent.console import printable
from mpagent.errors import AdminApiError, ConfigError, IssuerRejected, IssuerUnavailable
from mpagent.issuer import new_session, send
from mpagent.keys import Passwords
from mpagent.ownkeys import KeySet, RegisteredKey, parse_keyset, upload_body
from mpagent.tokens import Token, fingerprint

log = logging.getLogger(__name__)

BASE_URLS = {
    "test": "https://api.test.samarbeid.digdir.no/clients/",
    "prod": "https://api.samarbeid.digdir.no/clients/",
}
READ, WRITE = "idporten:dcr.read", "idporten:dcr.write"
MAX_DESCRIPTION = 300
TOKEN_MARGIN = 10.0  # a cached admin token is used only while it has this long to live


class AdminApi:
    """The key set of clients in one admin API. `token(scope)` returns a bearer token for
    the scope; with `show` (a dry run), changes are shown through it instead of being sent."""

    def __init__(
        self,
        base_url: str,
        token: Callable[[str], str],
        *,
        connect_timeout: float,
        read_timeout: float,
        show: Callable[[str], None] | None = None,
        admin: str = "the admin profile",
        admin_client: str = "the admin client",
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.token, self.show = token, show
        self.admin, self.admin_client = admin, admin_client
        self.timeout = (connect_timeout, read_timeout)
        self.session = new_session()

    def url(self, client_id: str) -> str:
        return f"{self.base_url}{requests.utils.quote(client_id, safe='')}/jwks"

    def keys(self, client_id: str) -> KeySet:
        url = self.url(client_id)
        return parse_keyset(self._send("GET", url, client_id, READ), url)

    def replace(self, client_id: str, keys: Sequence[RegisteredKey]) -> KeySet:
        """POST the whole set: every key in it gets a new expiry."""
        url, body = self.url(client_id), upload_body(keys)
        if self.show is not None:
            self.show(f"POST {url}\n{json.dumps(body, indent=2)}")
            return KeySet(tuple(RegisteredKey(k.kid, k.jwk) for k in keys))
        return parse_keyset(self._send("POST", url, client_id, WRITE, body), url)

    def delete_all(self, client_id: str) -> None:
        """DELETE the set: the client has no keys (the only way to remove the last one)."""
        url = self.url(client_id)
        if self.show is not None:
            self.show(f"DELETE {url}")
            return
        self._send("DELETE", url, client_id, WRITE)

    def _send(self, method: str, url: str, client_id: str, scope: str, body: Any = None) -> Any:
        """The answer's JSON (None for an empty 2xx body); every failure an mpagent error."""
        bearer = self.token(scope)
        log.debug("admin API: %s %s, token %s (%s)", method, url, fingerprint(bearer), scope)
        headers = {"Authorization": f"Bearer {bearer}", "Accept": "application/json"}
        answer = send(
            self.session,
            method,
            url,
            self.timeout,
            setting="admin_api",
            expected="a key set is a few KiB",
            json=body,
            headers=headers,
        )
        status, data = answer.status, answer.body
        if status == 429 or status >= 500:
            raise IssuerUnavailable(
                f"{url} answered HTTP {status}; Digdir's admin API is failing, try again later"
            )
        if 300 <= status < 400:
            raise AdminApiError(
                f"{url} answered HTTP {status}, a redirect; mpagent does not follow it (the "
                "admin token would go along): check admin_api",
                status=status,
            )
        if status >= 400:
            raise self._refusal(status, data, url, client_id, scope)
        if not data.strip():
            return None
        try:
            return json.loads(data, parse_constant=_no_constant(url, status))
        except ValueError:
            raise AdminApiError(
                f"{url} answered HTTP {status} with a body that is not JSON; is admin_api the "
                "admin API?",
                status=status,
            ) from None

    def _refusal(
        self, status: int, data: bytes, url: str, client_id: str, scope: str
    ) -> AdminApiError:
        error, description = _error_fields(data)
        said = f"{error}: {description}" if description else error or f"HTTP {status}"
        if status == 403 and error == "access_denied":
            step = (
                f"the admin profile {self.admin} must sign with its business certificate "
                "(Digdir's admin API takes no token of a grant signed with a registered key): "
                "give it the keystore with the certificate and no kid"
            )
        elif status == 401:
            step = (
                f"the admin API refused the token of profile {self.admin} (expired or "
                "invalid): try again; if it persists, check that the admin profile's "
                "environment is the admin API's (test or prod)"
            )
        elif status == 403:
            step = (
                f"the token of profile {self.admin} lacks {scope}; ask Digdir to add the scope "
                f"to client {self.admin_client}"
            )
        elif status == 404:
            step = (
                f"client {client_id} is not known to the admin API at {self.base_url}: is "
                "client_id right and is this the environment it lives in?"
            )
        else:
            step = (
                "see `mpagent keys list`: at most 5 RSA keys (RS256, 2048 bits or more), each "
                "with a kid no other client of any customer uses"
            )
        return AdminApiError(
            f"the admin API refused {url} (HTTP {status}, {said}); {step}",
            status=status,
            error=error,
            error_description=description,
        )


def _no_constant(url: str, status: int) -> Callable[[str], Any]:
    """json.loads' parse_constant: NaN and Infinity are no JSON (RFC 8259), and no expiry."""

    def refuse(name: str) -> Any:
        raise AdminApiError(
            f"{url} answered HTTP {status} with {name} in its JSON, which JSON does not allow; "
            "is admin_api the admin API?",
            status=status,
        )

    return refuse


def _error_fields(data: bytes) -> tuple[str, str]:
    """(error, error_description) of an error body, escaped and shortened; "" when absent."""
    try:
        body = json.loads(data)
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}

    def field(name: str) -> str:
        text = printable(str(body.get(name) or ""))
        return text if len(text) <= MAX_DESCRIPTION else text[:MAX_DESCRIPTION] + "…"

    return field("error"), field("error_description")


# -- which profile, which URL --------------------------------------------------------------


def admin_profile(cfg: Config, profile: Profile) -> Profile:
    """The profile whose token authorises the admin API for `profile`'s client: its
    admin_profile, else the profile itself when it signs with a certificate."""
    if profile.admin_profile is not None:
        admin = cfg.profile(profile.admin_profile)
    elif profile.kid is None and profile.key_location is not None:
        admin = profile
    else:
        raise ConfigError(
            f"{cfg.path}: [profiles.{profile.name}] names no admin_profile, and it signs with "
            'its own key, not a business certificate; add admin_profile = "NAME" naming the '
            "profile (with the certificate) whose client has the scopes idporten:dcr.read and "
            "idporten:dcr.write"
        )
    if admin.exchange is not None:
        raise ConfigError(
            f"{cfg.path}: [profiles.{admin.name}] has exchange = {admin.exchange_name!r}: its "
            "tokens are Altinn's, and Digdir's admin API takes Maskinporten tokens; add "
            f'admin_profile = "NAME" to [profiles.{profile.name}] naming a profile without exchange'
        )
    if admin.kid is not None:
        raise ConfigError(
            f"{cfg.path}: [profiles.{profile.name}] has admin_profile = {admin.name!r}, which "
            f"signs with kid {admin.kid!r}; Digdir's admin API takes only tokens signed with the "
            "business certificate: name a profile that signs with its certificate (a keystore "
            "with it, no kid)"
        )
    if admin.environment != profile.environment:
        raise ConfigError(
            f"{cfg.path}: [profiles.{profile.name}] is in environment {profile.environment} but "
            f"its admin_profile {admin.name} in {admin.environment}; a client's keys are managed "
            "with a token from its own environment: name a profile of that environment"
        )
    return admin


def refuse_admin_lockout(cfg: Config, profile: Profile) -> None:
    """Refuse to give a registered key to the client of a profile whose certificate tokens
    authorise the admin API (its own, or another profile's): with a registered key its
    client's certificate grants are refused, and the admin API with them, for good."""
    if profile.kid is not None or profile.key_location is None:
        return
    users = [p.name for p in cfg.profiles.values() if p.admin_profile == profile.name]
    if admin_profile(cfg, profile).name != profile.name and not users:
        return
    role = "its own admin profile" if not users else f"admin_profile of {', '.join(users)}"
    raise ConfigError(
        f"profile {profile.name} signs with its business certificate and is {role}: once its "
        "client has a registered key, Maskinporten refuses its certificate grants, and with "
        "them the token the admin API needs (it takes only tokens signed with the business "
        "certificate). Keep the keys on another client: give that client a profile with "
        f'admin_profile = "{profile.name}" and run this for that profile'
    )


def base_url(profile: Profile) -> str:
    """Where the admin API of the profile's environment is: admin_api, else Digdir's."""
    if profile.admin_api is not None:
        return profile.admin_api
    if profile.environment in BASE_URLS:
        return BASE_URLS[profile.environment]
    raise ConfigError(
        f"profile {profile.name} uses the issuer {profile.environment}, so mpagent cannot tell "
        f'where its admin API is; add admin_api = "URL" to [profiles.{profile.name}] (for the '
        "emulator: its issuer URL followed by clients/)"
    )


def for_profile(
    cfg: Config,
    profile: Profile,
    *,
    passwords: Passwords | None = None,
    show: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.time,
) -> AdminApi:
    """The admin API for `profile`'s client, authorised by tokens of its admin profile
    (fetched when first needed, one per scope, reused while they live)."""
    from mpagent.exchange import open_exchange

    admin = admin_profile(cfg, profile)
    url = base_url(profile)
    exchange: list[Any] = []
    cache: dict[str, Token] = {}

    def token(scope: str) -> str:
        held = cache.get(scope)
        if held is None or held.expires_at - clock() < TOKEN_MARGIN:
            if not exchange:
                exchange.append(open_exchange(cfg, admin, passwords))
            try:
                held = cache[scope] = exchange[0].fetch([scope])
            except IssuerRejected as exc:
                raise no_admin_token(exc, admin, scope) from exc
        return held.access_token

    return AdminApi(
        url,
        token,
        connect_timeout=cfg.http.connect_timeout,
        read_timeout=cfg.http.read_timeout,
        show=show,
        admin=admin.name,
        admin_client=admin.client_id,
    )


def no_admin_token(exc: IssuerRejected, admin: Profile, scope: str) -> IssuerRejected:
    """Maskinporten's refusal of the admin token, said as what it means for the keys."""
    step = ""
    if exc.error == "invalid_scope" or exc.mp_code in ("MP-200", "MP-250"):
        step = (
            f"; the admin client {admin.client_id} needs the scope {scope}: ask Digdir "
            "(servicedesk@digdir.no) to add it"
        )
    return IssuerRejected(
        f"the admin profile {admin.name} gets no token for {scope}, which the admin API "
        f"needs: {exc.message}{step}",
        **exc.details,
    )
