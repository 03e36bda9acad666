"""The texas-compatible token endpoint: `[http] listen = "127.0.0.1:7164"` serves, on loopback,
what NAV's token sidecar texas serves (texas.py parses and answers; this module listens):
POST /api/v1/token, POST /api/v1/introspect, GET /openapi.json (the spec implemented, shipped
as package data) and GET /healthz (200 once every configured token is held, else 503 naming
the missing ones). Tokens are the default profile's, from the agent's cache.

Who may call it. texas has no secret, and neither has this endpoint: an app written against
texas sends none. The guard is the peer check: a loopback port is open to every local user,
so each connection's peer socket owner (uid, asked of the kernel by `peers`) must be the
agent's own user or one of `[http] allow_uids`; `allow_any_local = true` answers any local
peer, for a pod, whose loopback is private to the pod (its containers share one network
namespace, nothing outside it reaches 127.0.0.1). Where the platform cannot tell a peer's uid
(macOS, Windows) the endpoint starts only with allow_any_local = true.

As the bridge: loopback bind only; Host must be a loopback name (DNS rebinding); browsers
(Origin, Sec-Fetch-*) refused; head, body, read time and connections per peer uid capped
(loopback.Slots); one request per connection; logs show token fingerprints only. A request's
own mistake is a 400, never a 500: 500 is for the agent's side (issuer unreachable, keystore,
configuration), as texas's spec says."""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from mpagent import texas
from mpagent.altinn import is_loopback
from mpagent.config import HttpSettings
from mpagent.errors import ConfigError, MpagentError
from mpagent.logs import RateLimit
from mpagent.loopback import MAX_HEAD, READ_TIMEOUT, Refusal, Request, listen_text, render
from mpagent.loopserver import LoopbackServer
from mpagent.peers import PEER_CHECK, describe, holder
from mpagent.refresher import Customer, request_claims
from mpagent.tokens import Token, fingerprint

log = logging.getLogger(__name__)
peer_log = logging.getLogger(f"{__name__}.peers")  # refusals: a line a minute, then a count
peer_log.addFilter(RateLimit(burst=1))

HEALTH_PATH = "/healthz"
ROUTES = {
    texas.TOKEN_PATH: "POST",
    texas.INTROSPECT_PATH: "POST",
    texas.SPEC_PATH: "GET",
    HEALTH_PATH: "GET",
}


async def start(
    settings: HttpSettings,
    refresher: Any,
    *,
    read_timeout: float = READ_TIMEOUT,
    clock: Callable[[], float] = time.time,
) -> Listener:
    """Listen on the loopback address of `[http] listen`; ConfigError when it cannot."""
    listen = settings.listen
    if listen is None or not is_loopback(listen[0]):
        raise ConfigError(f"[http] listen {listen}: use 127.0.0.1:PORT or [::1]:PORT")
    if not PEER_CHECK and not settings.allow_any_local:
        raise ConfigError(
            "[http] this platform cannot tell which user a loopback connection is from, and "
            "the endpoint has no secret; set [http] allow_any_local = true only where the "
            "loopback is private (a pod, a container), else leave [http] listen unset"
        )
    spec = resources.files("mpagent").joinpath(texas.SPEC_RESOURCE).read_bytes()
    api = Listener(refresher, settings, spec, read_timeout, clock)
    try:
        server = await asyncio.start_server(api.serve, *listen, limit=MAX_HEAD)
    except OSError as exc:
        where = listen_text(listen)
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"[http] listen {where} is taken by {describe(holder(listen))}; stop it, or "
                "set [http] listen to a free port; then `mpagent stop` and start the agent again"
            ) from exc
        raise ConfigError(f"[http] cannot listen on {where}: {exc.strerror}") from exc
    if not all(is_loopback(s.getsockname()[0]) for s in server.sockets):
        server.close()
        raise ConfigError(f"[http] listen {listen}: not only loopback addresses")
    api.server = server
    log.info("texas-compatible token endpoint on %s", token_url(listen))
    return api


def token_url(listen: tuple[str, int]) -> str:
    return f"http://{listen_text(listen)}{texas.TOKEN_PATH}"


def environment(listen: tuple[str, int]) -> dict[str, str]:
    """The variables an app written against texas reads (`mpagent agent --print-env`)."""
    base = f"http://{listen_text(listen)}"
    return {
        "NAIS_TOKEN_ENDPOINT": base + texas.TOKEN_PATH,
        "NAIS_TOKEN_INTROSPECTION_ENDPOINT": base + texas.INTROSPECT_PATH,
    }


class Off:
    """The endpoint when [http] listen is not set (`error` None) or it could not start."""

    def __init__(self, listen: tuple[str, int] | None = None, error: str | None = None) -> None:
        self.listen, self.error = listen, error

    def reread(self, settings: HttpSettings) -> None:
        """Nothing to re-read: the listen address applies when the agent starts."""

    def close(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        listen = listen_text(self.listen) if self.listen else None
        return {"listen": listen, "serving": False, "error": self.error}


class Listener(LoopbackServer):
    """Serves connections (loopserver); `refresher` is the agent's (source, entries, cached,
    get, fresh)."""

    name, log, peer_log = "http", log, peer_log
    routes, example = ROUTES, f"http://127.0.0.1:PORT{texas.TOKEN_PATH}"

    def __init__(
        self,
        refresher: Any,
        settings: HttpSettings,
        spec: bytes,
        read_timeout: float,
        clock: Callable[[], float],
    ) -> None:
        super().__init__(read_timeout)
        self.refresher, self.settings, self.spec, self.clock = refresher, settings, spec, clock

    def reread(self, settings: HttpSettings) -> None:
        """On a reload: who may call applies at once; the address when the agent restarts."""
        if settings.listen != self.settings.listen:
            log.warning("http: [http] listen changes when the agent restarts (`mpagent stop`)")
        self.settings = settings

    def allowed(self, uid: int) -> bool:
        settings = self.settings
        return settings.allow_any_local or uid == self.uid or uid in settings.allow_uids

    def answers(self) -> str:
        if self.settings.allow_any_local:
            return "any local user (allow_any_local: the loopback is private to the pod)"
        uids = ", ".join(str(u) for u in (self.uid, *self.settings.allow_uids))
        return f"only uid {uids} (the agent's user, and [http] allow_uids)"

    def status(self) -> dict[str, Any]:
        listen = self.settings.listen
        return {
            "listen": listen_text(listen) if listen else None,
            "serving": True,
            "url": token_url(listen) if listen else None,
            "peer_check": self.answers(),
            "allow_uids": list(self.settings.allow_uids),
            "allow_any_local": self.settings.allow_any_local,
            "connections": sum(len(s) for s in self.slots.by_uid.values()),
            "refused": {str(uid): n for uid, n in self.refused.items()},
        }

    async def answer(self, request: Request) -> bytes:
        if request.path == texas.SPEC_PATH:
            return render(200, self.spec)
        try:
            status, document = await self._answer(request)
        except Refusal:
            raise
        except Exception as exc:  # a bug: the log has it, the client a plain 500
            log.exception("http: unexpected error answering %s %s", request.method, request.path)
            status, document = texas.error_response(exc)
        return render(status, document)

    async def _answer(self, request: Request) -> tuple[int, dict[str, Any]]:
        content_type = request.headers.get("content-type")
        if request.path == HEALTH_PATH:
            return self.health()
        if request.path == texas.INTROSPECT_PATH:
            asked = texas.parse_introspect_request(content_type, request.body)
            # A token just replaced by a refresh is still this agent's: a client may hold it.
            held = [t for e in self.refresher.entries.values() for t in (e.token, e.previous) if t]
            return texas.introspect(asked, held, self.clock())
        wanted = texas.parse_token_request(content_type, request.body)
        try:
            token = await self._token(wanted)
        except MpagentError as exc:
            return texas.error_response(exc)
        log.debug("http: token %s for %s", fingerprint(token.access_token), wanted.scope)
        return texas.token_response(token, self.clock())

    async def _token(self, wanted: texas.TokenRequest) -> Token:
        self.refresher.source(None)  # no default profile, or an unusable one: the agent's side
        scopes = list(wanted.scopes)
        try:  # the request's own mistakes: a system-user grant Maskinporten refuses, a full cap
            org: Customer | None = request_claims(scopes, wanted.claims)
            cached = None if wanted.skip_cache else self.refresher.cached(None, scopes, None, org)
        except MpagentError as exc:
            raise Refusal(exc.message) from exc
        if cached is not None:
            return cached
        try:
            if wanted.skip_cache:
                return await self.refresher.fresh(None, scopes, org)
            return await self.refresher.get(None, scopes, None, org)
        except ConfigError as exc:
            if org is None:
                raise
            raise Refusal(exc.message) from exc  # what the request's own claims made

    def health(self) -> tuple[int, dict[str, Any]]:
        """Ready once every configured (pinned) token is held and unexpired, and no profile
        is unusable; else 503 with what is missing."""
        now = self.clock()
        missing = [
            f"profile {e.key.profile} scope {e.key.scope}"
            + (f": {e.error.message}" if e.error else "")
            for e in self.refresher.entries.values()
            if e.pinned and not (e.token is not None and e.token.expires_at > now)
        ]
        missing += [
            f"profile {name}: {exc.message}" for name, exc in self.refresher.unusable.items()
        ]
        if missing:
            return 503, {"status": "not ready", "missing": missing}
        return 200, {"status": "ready"}
