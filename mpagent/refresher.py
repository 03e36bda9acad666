"""Keeps each token key fresh: one scheduler, single-flight per key, backoff on failure.

Runs on the agent's event loop; the blocking exchange (keyring, disk, HTTP) runs in a thread
pool, never on the loop. Each key fails alone. Times are wall-clock (`time.time`) because
expiry is absolute; the scheduler sleeps in slices of at most MAX_SLEEP so that a suspended
laptop cannot oversleep a deadline.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import difflib
import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from mpagent import altinn, tokens
from mpagent.config import Profile, choose_profile
from mpagent.errors import ConfigError, IssuerRejected, IssuerUnavailable, MpagentError
from mpagent.exchange import ONE_CUSTOMER, Exchange, customer_claims
from mpagent.tokens import Token, TokenKey, fingerprint, scope_string

log = logging.getLogger(__name__)

MAX_SLEEP = 5.0
# How long a `get` may wait out transient failures (backoff and retries) before it fails
# with the last error. Clients wait 30 s for an answer; HTTP timeouts bound each attempt.
GET_WAIT = 10.0
# On-demand token keys (scope sets no profile configures) kept at once, at most. Each costs a
# refresh per token lifetime: the bench measured 1,000 of them idle at 6 % of a core.
MAX_ON_DEMAND_KEYS = 1000
# Per-customer keys (`get --systemuser-org` / `--consumer-org`) kept at once, at most: a cap of
# their own, so that many customer organisations (rejected ones included) cannot lock out the
# plain on-demand keys until idle_timeout.
MAX_CUSTOMER_KEYS = 500
# Keys of texas requests' own resource / authorization_details (the HTTP endpoint's callers,
# who may be other uids, [http] allow_uids): a cap of their own, smaller, so that they can
# neither lock out `get --systemuser-org` nor make the agent keep (and refresh) many keys.
MAX_REQUEST_CLAIM_KEYS = 100
# texas's skip_cache serves a token fetched at most this long ago instead of fetching again:
# a caller asking in a loop costs one issuer request (and one env-file / token-file write for
# a configured key) per SKIP_CACHE_AGE s, not one each.
SKIP_CACHE_AGE = 5.0
# Tokens of one key kept for introspection (texas's /api/v1/introspect): a client may hold
# any of them until it expires, refreshes or skip_cache notwithstanding.
KEPT_ISSUED = 8
# Token requests in flight towards one issuer, at most: half of the agent's 8 fetch threads,
# so an issuer that answers a byte at a time (each request then lasts its whole deadline)
# cannot take the threads every other issuer's refreshes need.
ISSUER_SLOTS = 4


@dataclass(frozen=True)
class Customer:
    """What a per-request token is for: an organisation (`get --systemuser-org` /
    `--consumer-org`), or `claims`, a texas request's resource and authorization_details as
    canonical JSON (they replace the profile's claims of those names)."""

    systemuser_org: str | None = None
    consumer_org: str | None = None
    claims: str | None = None


def request_claims(scopes: Iterable[str], claims: Mapping[str, Any]) -> Customer | None:
    """The Customer of a texas request's own claims (TokenRequest.claims), None for none;
    a system-user grant Maskinporten would refuse is a ConfigError naming the field."""
    if not claims:
        return None
    details = claims.get("authorization_details")
    if details is not None:
        altinn.check_systemuser_grant(list(scopes), details, "authorization_details")
    return Customer(claims=canonical(claims))


def customer(systemuser_org: str | None, consumer_org: str | None) -> Customer | None:
    """The Customer a request names (the wire's and the bridge's fields of these names),
    each number checked and kept as its nine digits; None when it names none."""
    if not systemuser_org and not consumer_org:
        return None
    if systemuser_org and consumer_org:
        raise ConfigError(ONE_CUSTOMER)
    if systemuser_org:
        return Customer(systemuser_org=altinn.check_org_number(systemuser_org, "systemuser_org"))
    return Customer(consumer_org=altinn.check_org_number(consumer_org, "consumer_org"))


@dataclass
class Source:
    """A profile as the agent can use it: its exchange, or why it has none."""

    profile: Profile
    exchange: Exchange | None = None
    error: MpagentError | None = None

    def __post_init__(self) -> None:
        # Computed once: every cached `get` builds a token key, and hashing the certificate
        # and serialising the claims each time cost ~15 % of the agent's time per request.
        p, exchange = self.profile, self.exchange
        key_id = "unavailable"
        if exchange is not None:
            key_id = p.kid or exchange.key.kid or exchange.key.fingerprint
        self._identity = (p.name, p.environment, p.client_id, key_id)
        self._claims = p.claims_json
        self._exchange = p.exchange or ""

    def key_for(self, scopes: Iterable[str], claims: Mapping[str, Any] | None = None) -> TokenKey:
        """The key of the token for `scopes`, with the profile's claims or `claims`."""
        text = self._claims if claims is None else canonical(claims)
        return TokenKey(*self._identity, scope_string(scopes), text, self._exchange)

    def claims_for(self, customer: Customer | None) -> dict[str, Any] | None:
        """The claims of a token for `customer` (None: the profile's own)."""
        if customer is None:
            return None
        claims = customer_claims(self.profile, customer.systemuser_org, customer.consumer_org)
        return {**claims, **json.loads(customer.claims)} if customer.claims else claims


def canonical(claims: Mapping[str, Any]) -> str:
    """Claims as part of a token's identity (as Profile.claims_json)."""
    return json.dumps(claims, sort_keys=True, separators=(",", ":"))


class Entry:
    """One token key's state."""

    def __init__(
        self,
        key: TokenKey,
        source: Source,
        *,
        pinned: bool,
        now: float,
        customer: Customer | None = None,
        claims: Mapping[str, Any] | None = None,
    ) -> None:
        self.key, self.source, self.pinned = key, source, pinned
        # A per-customer token's organisation and the claims its grants carry (None: the
        # profile's own).
        self.customer, self.claims = customer, claims
        self.token: Token | None = None
        # The tokens issued for this key, newest last (`token` among them), KEPT_ISSUED at
        # most: clients may hold any of them until it expires (introspection).
        self.issued: collections.deque[Token] = collections.deque(maxlen=KEPT_ISSUED)
        self.error: MpagentError | None = source.error
        self.failures = 0
        self.retry_at: float | None = None
        self.soft_at: float | None = None
        self.inflight: asyncio.Task[None] | None = None
        self.expiry_noted = False
        self.refreshes = 0
        self.issuer_requests = 0
        self.last_used = now

    def due_at(self, now: float) -> float | None:
        if self.inflight is not None or self.source.exchange is None:
            return None
        if self.retry_at is not None:
            # A rejected on-demand key waits for a client to ask again: the issuer says no
            # until someone changes the registration, and 500 such keys cost 1,500 requests
            # a minute in the background.
            return None if self.waits_for_a_client else self.retry_at
        if self.token is None:
            return now
        return self.soft_at

    def succeed(self, token: Token, rand: float) -> None:
        self.issued.append(token)
        self.token, self.error, self.failures, self.retry_at = token, None, 0, None
        self.expiry_noted = False
        self.soft_at = tokens.soft_deadline(token, rand)
        self.refreshes += 1

    @property
    def waits_for_a_client(self) -> bool:
        """Not retried in the background: an on-demand key the issuer (or config) refused."""
        return not self.pinned and isinstance(self.error, IssuerRejected | ConfigError)

    def fail(self, exc: MpagentError, now: float, rand: float) -> None:
        self.error = exc
        self.failures += 1
        rejected = isinstance(exc, IssuerRejected | ConfigError)
        self.retry_at = now + tokens.backoff(self.failures, rand, rejected=rejected)

    def status(self, now: float) -> dict[str, Any]:
        t = self.token
        customer = self.customer or Customer()
        return {
            "profile": self.key.profile,
            "scope": self.key.scope,
            "key": self.key.key_id,
            "exchange": self.source.profile.exchange_name,
            "systemuser_org": customer.systemuser_org,
            "consumer_org": customer.consumer_org,
            # A texas request's own resource / authorization_details: the two rows of one
            # scope are told apart (report.py's FOR column).
            "claims": _claims_label(customer.claims),
            "configured": self.pinned,
            "expires_at": t.expires_at if t else None,
            "valid": bool(t and t.expires_at > now),
            "next_refresh": self.due_at(now),
            "refreshes": self.refreshes,
            "issuer_requests": self.issuer_requests,
            "failures": self.failures,
            "last_error": self.error.to_wire() if self.error else None,
        }


class Refresher:
    def __init__(
        self,
        pool: Executor,
        *,
        idle_timeout: float = 900.0,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.pool, self.idle_timeout, self.on_change = pool, idle_timeout, on_change
        self.clock, self.rand = clock, rand
        self.sources: dict[str, Source] = {}
        self.unusable: dict[str, MpagentError] = {}
        self.default_profile: str | None = None
        self.entries: dict[TokenKey, Entry] = {}
        self._wake = asyncio.Event()
        self._issuer_slots: collections.defaultdict[str, asyncio.Semaphore] = (
            collections.defaultdict(lambda: asyncio.Semaphore(ISSUER_SLOTS))
        )

    # -- configuration -------------------------------------------------------------------

    def set_sources(
        self,
        sources: dict[str, Source],
        default_profile: str | None,
        unusable: dict[str, MpagentError] | None = None,
    ) -> None:
        """Adopt a new configuration. Entries whose identity is unchanged keep their
        tokens; the others are dropped; configured scopes are pinned. `unusable`: profiles
        whose configuration is wrong, so that a request for one gets its error."""
        self.sources, self.default_profile = sources, default_profile
        self.unusable = dict(unusable or {})
        now = self.clock()
        pinned = {s.key_for([scope]): s for s in sources.values() for scope in s.profile.scopes}
        kept: dict[TokenKey, Entry] = {}
        for key, entry in self.entries.items():
            source = sources.get(key.profile)
            try:  # a per-customer key's claims follow the profile's (systemuser_ref, say)
                claims = source.claims_for(entry.customer) if source else None
            except ConfigError:
                source = None
            if source is not None and source.key_for([key.scope], claims) == key:
                entry.source, entry.pinned = source, key in pinned
                kept[key] = entry
            else:
                log.info("dropping token %s: its configuration changed", key)
        for key, source in pinned.items():
            kept.setdefault(key, Entry(key, source, pinned=True, now=now))
        self.entries = kept
        self._wake.set()
        self.on_change()

    def source(self, profile: str | None) -> Source:
        if profile in self.sources:  # what choose_profile answers, without a list per `get`
            return self.sources[profile]
        names = [*self.sources, *self.unusable]
        name = choose_profile(profile, self.default_profile, names, "the agent's configuration")
        if name in self.unusable:
            raise self.unusable[name].again()
        return self.sources[name]

    # -- serving -------------------------------------------------------------------------

    def cached(
        self,
        profile: str | None,
        scopes: list[str],
        min_ttl: float | None,
        customer: Customer | None = None,
    ) -> Token | None:
        """The fast path: a usable cached token, without awaiting anything."""
        entry = self._entry(profile, scopes, customer)
        token = entry.token
        if tokens.usable(token, self.clock(), min_ttl):
            return token
        return None

    async def get(
        self,
        profile: str | None,
        scopes: list[str],
        min_ttl: float | None,
        customer: Customer | None = None,
        *,
        cli: bool = True,
    ) -> Token:
        """A token with at least min_ttl left (for `customer`, when given): from the cache,
        else from the single in-flight refresh, else the last error (`cli`: saying which
        `mpagent refresh` tries now; False for an HTTP caller, who has no CLI)."""
        entry = self._entry(profile, scopes, customer)
        give_up_at = self.clock() + GET_WAIT
        while True:
            now = self.clock()
            if tokens.usable(entry.token, now, min_ttl):
                assert entry.token is not None
                return entry.token
            if entry.source.exchange is None:
                raise (
                    entry.error or ConfigError(f"profile {entry.key.profile} is not usable")
                ).again()
            if entry.inflight is None:
                retry_at = entry.retry_at or now
                if retry_at > now:
                    self._give_up_unless_transient(entry, retry_at, give_up_at, cli)
                    await asyncio.sleep(retry_at - now)
                    continue
                self._start(entry)
            assert entry.inflight is not None
            await asyncio.shield(entry.inflight)
            if tokens.usable(entry.token, self.clock(), min_ttl):
                continue
            if entry.error is not None:
                self._give_up_unless_transient(entry, entry.retry_at or 0.0, give_up_at, cli)
                continue
            if entry.token is not None:
                raise MpagentError(
                    f"the issuer's tokens live {entry.token.lifetime:.0f} s, less than the "
                    f"{min_ttl:g} s asked for with --min-ttl; ask for less"
                )

    async def fresh(
        self,
        profile: str | None,
        scopes: list[str],
        customer: Customer | None = None,
        *,
        cli: bool = True,
    ) -> Token:
        """texas's skip_cache: a token fetched within the last SKIP_CACHE_AGE s (5 s), else
        one fetched after the request came, by the refresh in flight when there is one (so a
        burst of such requests costs one issuer request, not one each), else by one started
        now. A caller asking in a loop so costs one issuer request per SKIP_CACHE_AGE s.
        During a backoff after a failed fetch it answers as `get` does: the held token while
        it lasts, else after the backoff, or the error."""
        entry = self._entry(profile, scopes, customer)
        token, now = entry.token, self.clock()
        recent = token is not None and 0 <= now - token.requested_at < SKIP_CACHE_AGE
        if recent and tokens.usable(token, now, None):
            assert token is not None
            return token
        if entry.inflight is None:
            retry_at = entry.retry_at
            if entry.source.exchange is None or (retry_at and retry_at > now):
                return await self.get(profile, scopes, None, customer, cli=cli)
            self._start(entry)
        assert entry.inflight is not None
        before = entry.refreshes
        await asyncio.shield(entry.inflight)
        if entry.refreshes > before and entry.token is not None:
            return entry.token
        # its error, said as get says it
        return await self.get(profile, scopes, None, customer, cli=cli)

    def _give_up_unless_transient(
        self, entry: Entry, retry_at: float, give_up_at: float, cli: bool = True
    ) -> None:
        """A `get` waits out a short backoff after a transient failure; a rejection, a
        configuration error or a retry beyond its patience fails it with the last error,
        saying when the agent tries again and how to make it try now."""
        transient = isinstance(entry.error, IssuerUnavailable)
        if entry.error is None or (transient and retry_at <= give_up_at):
            return
        exc = entry.error
        wait = max(0.0, retry_at - self.clock())
        profile = entry.key.profile
        again = f"the agent tries again in {wait:.0f} s"
        if entry.waits_for_a_client:
            again += " at the earliest, when a client asks"
        now_hint = f"; `mpagent refresh {profile}` tries now" if cli else ""
        raise type(exc)(f"{exc.message} ({again}{now_hint})", **exc.details)

    def _entry(
        self, profile: str | None, scopes: list[str], customer: Customer | None = None
    ) -> Entry:
        source = self.source(profile)
        claims = source.claims_for(customer)
        key = source.key_for(scopes, claims)
        now = self.clock()
        entry = self.entries.get(key)
        if entry is None:
            self._check_cap(key, customer)
            entry = Entry(key, source, pinned=False, now=now, customer=customer, claims=claims)
            self.entries[key] = entry
            log.info("new on-demand token key %s%s", key, _for(customer))
        entry.last_used = now
        return entry

    def _check_cap(self, key: TokenKey, customer: Customer | None) -> None:
        """Room for a new on-demand key: per-customer keys and texas requests' own claims have
        caps of their own."""
        kind = _kind(customer)
        kept = sum(not e.pinned and _kind(e.customer) == kind for e in self.entries.values())
        idle = f"idle_timeout = {self.idle_timeout:g} s"
        wait = f"wait: a key nobody asks for is dropped after {idle}"
        if kind == "claims" and kept >= MAX_REQUEST_CLAIM_KEYS:
            raise MpagentError(
                f"too many distinct resource / authorization_details at once: the agent keeps "
                f"tokens for {MAX_REQUEST_CLAIM_KEYS} of them at most; {wait}"
            )
        if kind == "customer" and kept >= MAX_CUSTOMER_KEYS:
            raise MpagentError(
                f"too many customer organisations at once: {MAX_CUSTOMER_KEYS}; the agent "
                f"keeps tokens for that many (systemuser_org / consumer_org) at most; {wait}"
            )
        if customer is None and kept >= MAX_ON_DEMAND_KEYS:
            raise MpagentError(
                f"the agent already keeps {MAX_ON_DEMAND_KEYS} on-demand token keys (scope "
                "sets no profile's `scopes` lists), its most; add the scopes you use to "
                f"[profiles.{key.profile}] scopes, or {wait}"
            )

    async def refresh_now(self, profile: str | None) -> list[Entry]:
        """`mpagent refresh [PROFILE]`: forget the backoff of every key of the profile (or of
        all profiles), refresh them now, and return them once every refresh has ended."""
        if profile is not None:
            self.source(profile)  # an unknown or unusable profile fails here
        chosen = [e for e in self.entries.values() if profile in (None, e.key.profile)]
        for entry in chosen:
            entry.retry_at = None
            if entry.inflight is None and entry.source.exchange is not None:
                self._start(entry)
        await asyncio.gather(*(asyncio.shield(e.inflight) for e in chosen if e.inflight))
        return chosen

    # -- refreshing ----------------------------------------------------------------------

    async def run(self) -> None:
        """The scheduler: sleeps until the next deadline (in bounded slices), starts due
        refreshes, drops on-demand keys nobody has asked for in idle_timeout."""
        while True:
            now = self.clock()
            wake_at = now + MAX_SLEEP
            for key, entry in list(self.entries.items()):
                if not entry.pinned and now - entry.last_used > self.idle_timeout:
                    log.info("dropping idle on-demand token key %s", key)
                    del self.entries[key]
                    continue
                if entry.token is not None and not entry.expiry_noted:
                    # The env file must drop a token the moment it expires.
                    if entry.token.expires_at <= now:
                        entry.expiry_noted = True
                        self.on_change()
                    else:
                        wake_at = min(wake_at, entry.token.expires_at)
                due = entry.due_at(now)
                if due is None:
                    continue
                if due <= now:
                    self._start(entry)
                else:
                    wake_at = min(wake_at, due)
            self._wake.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that comes
            # as the wait ends (gh-86296), and the agent's stop would then wait on this loop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, wake_at - self.clock())):
                    await self._wake.wait()

    def _start(self, entry: Entry) -> None:
        entry.inflight = asyncio.get_running_loop().create_task(self._refresh(entry))

    async def _refresh(self, entry: Entry) -> None:
        exchange = entry.source.exchange
        assert exchange is not None
        loop = asyncio.get_running_loop()
        try:
            # An exchanging key's fetch lasts up to one more deadline (Altinn's step): its
            # slots are the exchange's own, so a hanging Altinn cannot starve the plain
            # profiles of the same environment.
            async with self._issuer_slots[entry.key.exchange or entry.key.environment]:
                entry.issuer_requests += 1
                scopes = entry.key.scope.split()
                # The claims only for a per-customer key: the profile's are the default.
                args = (scopes,) if entry.claims is None else (scopes, entry.claims)
                token = await loop.run_in_executor(self.pool, exchange.fetch, *args)
            if not tokens.acceptable(token, self.clock()):
                raise IssuerUnavailable(
                    f"the issuer answered with a token that expires in "
                    f"{token.expires_at - self.clock():.0f} s; check the local clock"
                )
        except MpagentError as exc:
            entry.fail(_with_scope_hint(exc, entry), self.clock(), self.rand())
            log.warning(
                "token %s: %s (retry in %.1f s)",
                entry.key,
                exc,
                (entry.retry_at or 0) - self.clock(),
            )
        except Exception as exc:  # a bug or an unexpected library error: this key fails alone
            log.exception("token %s: unexpected error", entry.key)
            entry.fail(
                MpagentError(f"unexpected error: {type(exc).__name__}"), self.clock(), self.rand()
            )
        else:
            entry.succeed(token, self.rand())
            log.info(
                "token %s refreshed: %s, expires in %.0f s, next refresh in %.0f s",
                entry.key,
                fingerprint(token.access_token),
                token.expires_at - self.clock(),
                (entry.soft_at or 0) - self.clock(),
            )
        finally:
            entry.inflight = None
            self._wake.set()
        if self.entries.get(entry.key) is entry:
            self.on_change()

    def status(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [e.status(now) for _, e in sorted(self.entries.items())]


def _kind(customer: Customer | None) -> str:
    """Which cap a key counts against: plain on-demand, per-customer, or a request's claims."""
    if customer is None:
        return "plain"
    return "claims" if customer.claims else "customer"


def _claims_label(claims: str | None) -> str | None:
    """A texas request's own claims, short, for status: "resource=URI", the details' types."""
    if claims is None:
        return None
    parsed = json.loads(claims)
    parts = [f"resource={parsed['resource']}"] if "resource" in parsed else []
    details = parsed.get("authorization_details") or []
    types = ",".join(str(d.get("type")) for d in details if isinstance(d, dict))
    if types:
        parts.append(f"authorization_details={types}")
    return " ".join(parts) or "claims"


def _for(customer: Customer | None) -> str:
    if customer is None:
        return ""
    if customer.systemuser_org:
        return f" for the system user of {customer.systemuser_org}"
    if customer.claims:
        return " with the request's own resource / authorization_details"
    return f" for consumer_org {customer.consumer_org}"


def _with_scope_hint(exc: MpagentError, entry: Entry) -> MpagentError:
    """A scope the issuer does not know, asked for on demand: a typo of a configured one?"""
    if not isinstance(exc, IssuerRejected) or exc.error != "invalid_scope" or entry.pinned:
        return exc
    configured = {s for item in entry.source.profile.scopes for s in item.split()}
    hints = [
        f"{scope!r}: did you mean {close[0]!r}?"
        for scope in entry.key.scope.split()
        if scope not in configured
        and (close := difflib.get_close_matches(scope, sorted(configured), n=1))
    ]
    if not hints:
        return exc
    return type(exc)(f"{exc.message}; {'; '.join(hints)}", **exc.details)
