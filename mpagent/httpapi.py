"""The texas-compatible token endpoint: `[http] listen = "127.0.0.1:7164"` serves, on loopback,
what NAV's token sidecar texas serves (texas.py parses and answers; this module listens):
POST /api/v1/token, POST /api/v1/introspect, GET /openapi.json (the spec implemented, shipped
as package data) and GET /healthz (200 once every configured token is held, else 503 naming
the missing ones). Tokens are one profile's, from the agent's cache: `[http] profile`, else
default_profile, else the only profile; a target that is another profile's scope is a 400 that
says so, never a request to Maskinporten as the wrong client. skip_cache serves a token fetched
within the last 5 s (refresher.SKIP_CACHE_AGE) rather than asking the issuer again.

Who may call it. texas has no secret, and neither has this endpoint: an app written against
texas sends none. The guard is the peer check: a loopback port is open to every local user,
so each connection's peer socket owner (uid, asked of the kernel by `peers`) must be the
agent's own user or one of `[http] allow_uids`; `allow_any_local = true` answers any local
peer, for a pod, whose loopback is private to the pod (its containers share one network
namespace, nothing outside it reaches 127.0.0.1). Where the platform cannot tell a peer's uid
(macOS, Windows) the endpoint starts only with allow_any_local = true. A refused peer hears a
fixed 403 access_denied naming its uid and [http] allow_uids, its request never parsed.

As the bridge: loopback bind only; Host must be a loopback name (DNS rebinding); browsers
(Origin, Sec-Fetch-*) refused; head, body, read time and connections per peer uid capped
(loopback.Slots); one request per connection; logs show token fingerprints only. A request's
own mistake is a 400, never a 500: 500 is for the agent's side (issuer unreachable, keystore,
configuration), as texas's spec says."""

from __future__ import annotations

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
from mpagent.loopback import READ_TIMEOUT, Refusal, Request, listen_text, render
from mpagent.loopserver import LoopbackServer, bind, bug_log
from mpagent.peers import PEER_CHECK
from mpagent.refresher import Customer, Refresher, request_claims
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
    refresher: Refresher,
    *,
    read_timeout: float = READ_TIMEOUT,
    clock: Callable[[], float] = time.time,
    files_problem: Callable[[], str | None] = lambda: None,
) -> Listener:
    """Listen on the loopback address of `[http] listen`; ConfigError when it cannot.
    `files_problem`: why the token files ([files] dir) are not all written, or None; /healthz
    is not ready while there is one (an app may read the files once the probe says ready)."""
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
    api = Listener(refresher, settings, spec, read_timeout, clock, files_problem)
    server = await bind("[http]", listen, api.serve)
    api.server = server
    api.bound = tuple(server.sockets[0].getsockname()[:2])
    log.info("texas-compatible token endpoint on %s", token_url(listen))
    api.check_profile()
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


def restart_note(bound: tuple[str, int] | None, wanted: tuple[str, int] | None) -> str | None:
    """What status says when a reload changed [http] listen: it applies at the next start."""
    if wanted == bound:
        return None
    if wanted is None:
        return "[http] listen is unset now: the endpoint stops at restart"
    return f"listen changes to {listen_text(wanted)} at restart (`mpagent stop`, then start it)"


class Off:
    """The endpoint when [http] listen is not set (`error` None) or it could not start."""

    def __init__(self, listen: tuple[str, int] | None = None, error: str | None = None) -> None:
        self.listen, self.error = listen, error
        self.pending: str | None = None

    def reread(self, settings: HttpSettings) -> None:
        """The listen address applies when the agent starts: status says a change waits."""
        self.pending = restart_note(self.listen, settings.listen)

    def close(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        listen = listen_text(self.listen) if self.listen else None
        return {"listen": listen, "serving": False, "error": self.error, "pending": self.pending}


class Listener(LoopbackServer):
    """Serves connections (loopserver); `refresher` is the agent's (source, entries, cached,
    get, fresh)."""

    name, log, peer_log = "http", log, peer_log
    routes, example = ROUTES, f"http://127.0.0.1:PORT{texas.TOKEN_PATH}"

    def __init__(
        self,
        refresher: Refresher,
        settings: HttpSettings,
        spec: bytes,
        read_timeout: float,
        clock: Callable[[], float],
        files_problem: Callable[[], str | None] = lambda: None,
    ) -> None:
        super().__init__(read_timeout)
        self.refresher, self.settings, self.spec, self.clock = refresher, settings, spec, clock
        self.files_problem = files_problem
        self.listen = settings.listen  # as at start: a reload does not move it
        self.bound: tuple[str, int] | None = None  # the address listened on (port 0: the kernel's)
        self.pending: str | None = None

    def reread(self, settings: HttpSettings) -> None:
        """On a reload: who may call and the profile served apply at once; the address when
        the agent restarts (status says so; the bound address is kept)."""
        self.pending = restart_note(self.listen, settings.listen)
        if self.pending:
            log.warning("http: [http] %s", self.pending)
        self.settings = settings
        self.check_profile()

    def check_profile(self) -> None:
        """At start and each reload: an endpoint that cannot serve says why in the log (and
        in status and /healthz)."""
        name, problem = self.served()
        if problem is not None:
            log.error("http: the endpoint serves no tokens: %s", problem)
        else:
            log.info("http: serving profile %s", name)

    def served(self) -> tuple[str | None, str | None]:
        """The profile the endpoint serves ([http] profile, else default_profile, else the
        only one), or None and why it has none, saying what to set."""
        refresher = self.refresher
        names = [*refresher.sources, *(n for n in refresher.unusable if n not in refresher.sources)]
        listed = ", ".join(names)
        wanted = self.settings.profile or refresher.default_profile
        if wanted is None:
            if len(names) == 1:
                return names[0], None
            return None, (
                f"[http] profile is not set and there is no default_profile: set [http] profile = "
                f'"NAME" to the profile whose tokens the endpoint serves (one of: {listed})'
            )
        if wanted not in names:
            return None, f"[http] profile = {wanted!r} names no profile; write one of: {listed}"
        if wanted in refresher.unusable:
            return wanted, f"profile {wanted} is unusable: {refresher.unusable[wanted].message}"
        return wanted, None

    def refused_reply(self, uid: int | None) -> bytes:
        """403 access_denied naming the fix, for a peer whose uid is not answered (texas's
        callers read the JSON; a reset connection says nothing)."""
        who = f"uid {uid}" if uid is not None else "a peer whose uid cannot be found"
        fix = (
            "add it to [http] allow_uids"
            if uid is not None
            else "set [http] allow_any_local = true only where the loopback is private (a pod)"
        )
        document = {
            "error": "access_denied",
            "error_description": f"{who} may not call this endpoint: {fix}",
        }
        return render(403, document)

    def allowed(self, uid: int) -> bool:
        settings = self.settings
        return settings.allow_any_local or uid == self.uid or uid in settings.allow_uids

    def answers(self) -> str:
        if self.settings.allow_any_local:
            return "any local user (allow_any_local: the loopback is private to the pod)"
        uids = ", ".join(str(u) for u in (self.uid, *self.settings.allow_uids))
        return f"only uid {uids} (the agent's user, and [http] allow_uids)"

    def status(self) -> dict[str, Any]:
        listen = self.bound or self.listen
        profile, problem = self.served()
        return {
            "listen": listen_text(listen) if listen else None,
            "serving": True,
            "url": token_url(listen) if listen else None,
            "pending": self.pending,  # a reload's new [http] listen, waiting for a restart
            "profile": profile,
            "profile_error": problem,
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
            bug_log.exception(
                "http: unexpected error answering %s %s", request.method, request.path
            )
            status, document = texas.error_response(exc)
        return render(status, document)

    async def _answer(self, request: Request) -> tuple[int, dict[str, Any]]:
        content_type = request.headers.get("content-type")
        if request.path == HEALTH_PATH:
            return self.health()
        if request.path == texas.INTROSPECT_PATH:
            asked = texas.parse_introspect_request(content_type, request.body)
            # A token replaced by refreshes is still this agent's: a client may hold it.
            held = [t for e in self.refresher.entries.values() for t in e.issued]
            return texas.introspect(asked, held, self.clock())
        wanted = texas.parse_token_request(content_type, request.body)
        try:
            token = await self._token(wanted)
        except MpagentError as exc:
            return texas.error_response(exc)
        log.debug("http: token %s for %s", fingerprint(token.access_token), wanted.scope)
        return texas.token_response(token, self.clock())

    async def _token(self, wanted: texas.TokenRequest) -> Token:
        name, problem = self.served()
        if name is None or problem is not None:  # the agent's side: 500, saying what to set
            raise ConfigError(problem or "no profile")
        scopes = list(wanted.scopes)
        self._refuse_other_profiles(name, scopes)
        try:  # the request's own mistakes: a system-user grant Maskinporten refuses, a full cap
            org: Customer | None = request_claims(scopes, wanted.claims)
            cached = None if wanted.skip_cache else self.refresher.cached(name, scopes, None, org)
        except MpagentError as exc:
            raise Refusal(exc.message) from exc
        if cached is not None:
            return cached
        try:
            if wanted.skip_cache:
                return await self.refresher.fresh(name, scopes, org, cli=False)
            return await self.refresher.get(name, scopes, None, org, cli=False)
        except ConfigError as exc:
            if org is None:
                raise
            raise Refusal(exc.message) from exc  # what the request's own claims made

    def _refuse_other_profiles(self, name: str, scopes: list[str]) -> None:
        """A scope another profile configures and this one does not: 400 invalid_scope before
        the issuer is asked (it would refuse this profile's client, with hints for a CLI)."""
        own = {s for item in self.refresher.sources[name].profile.scopes for s in item.split()}
        for other, source in self.refresher.sources.items():
            theirs = {s for item in source.profile.scopes for s in item.split()}
            scope = next((s for s in scopes if s in theirs and s not in own), None)
            if other != name and scope is not None:
                raise Refusal(
                    f"{scope} is a scope of profile {other}; this endpoint serves profile "
                    f"{name} ([http] profile)",
                    400,
                    "invalid_scope",
                )

    def health(self) -> tuple[int, dict[str, Any]]:
        """Ready once the profile served resolves, every configured (pinned) token is held and
        unexpired, no profile is unusable and (with [files] dir) the token files are written;
        else 503 with what is missing."""
        now = self.clock()
        _, problem = self.served()
        missing = [problem] if problem else []
        missing += [
            f"profile {e.key.profile} scope {e.key.scope}"
            + (f": {e.error.message}" if e.error else "")
            for e in self.refresher.entries.values()
            if e.pinned and not (e.token is not None and e.token.expires_at > now)
        ]
        missing += [
            f"profile {name}: {exc.message}" for name, exc in self.refresher.unusable.items()
        ]
        files = self.files_problem()
        if files:
            missing.append(files)
        if missing:
            return 503, {"status": "not ready", "missing": list(dict.fromkeys(missing))}
        return 200, {"status": "ready"}
