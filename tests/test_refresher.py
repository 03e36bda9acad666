"""The Refresher on a fake clock: deadlines, single-flight, backoff, idle drop, reload.

Real code throughout except the two edges the Refresher takes as arguments: the clock (and
the random source) and the exchange, which here answers as the test tells it. The coroutines
run on a real asyncio loop whose timers follow the fake clock, so `asyncio.sleep(60)` inside
the refresher ends the moment a test moves the clock 60 s on; fetches run in a real thread
pool. The end-to-end tests in test_agent.py prove the wiring with the real issuer.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pytest

from mpagent import altinn, tokens
from mpagent.config import Profile
from mpagent.errors import ConfigError, IssuerRejected, IssuerUnavailable, MpagentError
from mpagent.refresher import (
    GET_WAIT,
    ISSUER_SLOTS,
    MAX_ON_DEMAND_KEYS,
    MAX_SLEEP,
    Entry,
    Refresher,
    Source,
)

if TYPE_CHECKING:
    from mpagent.exchange import Exchange

T = TypeVar("T")
START = 1_700_000_000.0
LIFETIME = 120.0
RAND = 0.37  # any fixed value in [0, 1): deadlines and backoffs become exact numbers
IDLE = 30.0
SCOPE = "a:read"


class Clock:
    """The wall clock as the refresher sees it: it moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


class ClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose timers run on the fake clock (as asyncio's own test loop does)."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.fake = clock
        # A timer set for `deadline - now` seconds lands an ulp or two (~0.5 us at today's
        # epoch) either side of `deadline`; a real clock moves past that, the fake one does not.
        self._clock_resolution = 1e-6

    def time(self) -> float:
        return self.fake()


Step = MpagentError | threading.Event  # raise it, or block until it is set, then succeed


class FakeExchange:
    """Stands in for exchange.Exchange: per scope, a plan of outcomes; an empty plan succeeds."""

    def __init__(self, clock: Clock, fingerprint: str = "sha256:aa") -> None:
        self.clock = clock
        self.key = SimpleNamespace(kid=None, fingerprint=fingerprint, warnings=())
        self.plans: dict[str, list[Step]] = {}
        self.calls: list[str] = []

    def will(self, scope: str, *steps: Step) -> None:
        self.plans.setdefault(scope, []).extend(steps)

    def fetch(self, scopes: list[str]) -> tokens.Token:
        scope = " ".join(scopes)
        requested_at = self.clock()  # as the real exchange does: before the request is sent
        self.calls.append(scope)
        plan = self.plans.get(scope, [])
        step = plan.pop(0) if plan else None
        if isinstance(step, threading.Event):
            assert step.wait(5), "the test never released this fetch"
        elif step is not None:
            raise step
        n = len(self.calls)
        return tokens.Token(f"token-{n}", "Bearer", scope, requested_at, requested_at + LIFETIME)


def source(name: str, exchange: FakeExchange, scopes: tuple[str, ...] = (SCOPE,)) -> Source:
    profile = Profile(name, "test", "client-" + name, scopes, Path("unused.p12"))
    return Source(profile, cast("Exchange", exchange))


@dataclass
class World:
    clock: Clock
    exchange: FakeExchange
    refresher: Refresher
    scheduler: asyncio.Task[None] | None = None

    def schedule(self) -> None:
        """Start the refresher's scheduler, `run()`, on the running loop."""
        self.scheduler = asyncio.create_task(self.refresher.run())

    def run(self, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
        async def body() -> T:
            try:
                return await main()
            finally:
                await self.stop_scheduler()

        with asyncio.Runner(loop_factory=lambda: ClockLoop(self.clock)) as runner:
            return runner.run(body())

    async def stop_scheduler(self) -> None:
        # On Python 3.11 `asyncio.wait_for` swallows a cancel that arrives as its awaitable
        # completes (gh-86296), so run() may need a second one.
        while self.scheduler is not None and not self.scheduler.done():
            self.scheduler.cancel()
            await asyncio.sleep(0)

    def entry(self, scope: str = SCOPE, profile: str = "p") -> Entry:
        return next(
            e
            for e in self.refresher.entries.values()
            if (e.key.profile, e.key.scope) == (profile, scope)
        )

    async def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        await settle()

    async def advance_to(self, moment: float) -> None:
        await self.advance(moment - self.clock.now)


@pytest.fixture
def world() -> Iterator[World]:
    clock = Clock()
    exchange = FakeExchange(clock)
    with ThreadPoolExecutor(4) as pool:
        refresher = Refresher(pool, idle_timeout=IDLE, clock=clock, rand=lambda: RAND)
        refresher.set_sources({"p": source("p", exchange)}, "p")
        yield World(clock, exchange, refresher)


async def until(condition: Callable[[], object], what: str) -> None:
    """Let the loop and the worker threads run until `condition` holds (milliseconds)."""
    deadline = time.monotonic() + 2.0
    await asyncio.sleep(0)
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0)


def failed(entry: Entry, times: int) -> Callable[[], bool]:
    """Whether the entry's refresh has failed `times` times in a row and has ended."""
    return lambda: entry.failures == times and entry.inflight is None


async def settle() -> None:
    """Let whatever can run at this moment of the fake clock run: due timers, started fetches."""
    for _ in range(20):
        await asyncio.sleep(0)
    await asyncio.to_thread(time.sleep, 0.002)  # real time, for a fetch thread that just started
    for _ in range(20):
        await asyncio.sleep(0)


def test_soft_deadline_starts_a_background_refresh(world: World) -> None:
    """The scheduler refreshes a token at tokens.soft_deadline (50-60 % of its life), not before."""

    async def main() -> None:
        world.schedule()
        await until(lambda: world.entry().token, "the first fetch")
        first = world.entry().token
        assert first is not None
        soft_at = tokens.soft_deadline(first, RAND)
        assert world.entry().soft_at == soft_at
        assert START + 0.5 * LIFETIME <= soft_at <= START + 0.6 * LIFETIME
        await world.advance_to(soft_at - 0.01)
        assert world.exchange.calls == [SCOPE]
        await world.advance_to(soft_at)
        await until(lambda: world.entry().token is not first, "the background refresh")
        assert world.exchange.calls == [SCOPE, SCOPE]

    world.run(main)


def test_get_between_soft_and_hard_deadline_answers_from_the_cache(world: World) -> None:
    """While a background refresh is in flight, a get before the hard deadline gets the old token."""
    gate = threading.Event()

    async def main() -> None:
        world.schedule()
        first = await world.refresher.get(None, [SCOPE], None)
        world.exchange.will(SCOPE, gate)
        await world.advance_to(tokens.hard_deadline(first) - 0.01)
        assert world.entry().inflight is not None, "the soft deadline has passed"
        assert await world.refresher.get(None, [SCOPE], None) is first
        assert world.refresher.cached(None, [SCOPE], None) is first
        gate.set()
        await until(lambda: world.entry().token is not first, "the background refresh")

    world.run(main)


def test_hard_deadline_makes_get_wait_for_the_refresh(world: World) -> None:
    """With less than min_ttl left, get waits for the in-flight refresh and serves its token."""
    gate = threading.Event()

    async def main() -> None:
        first = await world.refresher.get(None, [SCOPE], None)
        world.exchange.will(SCOPE, gate)
        await world.advance_to(tokens.hard_deadline(first))  # expires in 10 s: default min_ttl
        assert world.refresher.cached(None, [SCOPE], None) is None
        waiting = asyncio.create_task(world.refresher.get(None, [SCOPE], None))
        await settle()
        assert not waiting.done() and world.exchange.calls == [SCOPE, SCOPE]
        gate.set()
        second = await waiting
        assert second is not first and second.requested_at == world.clock.now

    world.run(main)


def test_min_ttl_moves_the_hard_deadline(world: World) -> None:
    """A get asking for 30 s refreshes a token with 25 s left; a get with the default does not."""

    async def main() -> None:
        first = await world.refresher.get(None, [SCOPE], None)
        await world.advance(LIFETIME - 25)
        assert await world.refresher.get(None, [SCOPE], None) is first
        assert world.refresher.cached(None, [SCOPE], 30) is None
        second = await world.refresher.get(None, [SCOPE], 30)
        assert second is not first and len(world.exchange.calls) == 2

    world.run(main)


def test_concurrent_gets_share_one_fetch(world: World) -> None:
    """Fifty gets for one key while it is fetched cause one fetch and all get its token."""
    gate = threading.Event()
    world.exchange.will(SCOPE, gate)

    async def main() -> None:
        gets = [asyncio.create_task(world.refresher.get(None, [SCOPE], None)) for _ in range(50)]
        await settle()
        assert world.exchange.calls == [SCOPE] and not any(g.done() for g in gets)
        gate.set()
        answers = await asyncio.gather(*gets)
        assert {a.access_token for a in answers} == {"token-1"}
        assert world.exchange.calls == [SCOPE]

    world.run(main)


def test_transient_failures_back_off_per_policy(world: World) -> None:
    """After the n-th transient failure the scheduler retries at now + tokens.backoff(n), not before."""
    down = IssuerUnavailable("the issuer is down")
    world.exchange.will(SCOPE, down, down)

    async def main() -> None:
        world.schedule()
        entry = world.entry()
        for n in (1, 2):
            await until(failed(entry, n), f"failure {n}")
            retry_at = entry.retry_at
            assert retry_at == world.clock.now + tokens.backoff(n, RAND)
            assert entry.due_at(world.clock.now) == retry_at
            await world.advance_to(retry_at - 0.01)
            assert len(world.exchange.calls) == n
            await world.advance_to(retry_at)
        await until(lambda: entry.token, "the third attempt's token")
        assert (entry.failures, entry.retry_at, entry.error) == (0, None, None)
        assert len(world.exchange.calls) == 3

    world.run(main)


def test_get_waits_out_a_short_transient_backoff(world: World) -> None:
    """A get whose fetch fails transiently sleeps the backoff (fake time) and returns the retry's token."""
    world.exchange.will(SCOPE, IssuerUnavailable("the issuer is down"))

    async def main() -> None:
        entry = world.entry()
        waiting = asyncio.create_task(world.refresher.get(None, [SCOPE], None))
        await until(failed(entry, 1), "the failure")
        await settle()
        assert not waiting.done() and world.exchange.calls == [SCOPE]
        assert entry.retry_at is not None
        await world.advance_to(entry.retry_at)
        token = await waiting
        assert token.access_token == "token-2" and entry.failures == 0

    world.run(main)


def test_get_gives_up_when_the_retry_is_beyond_its_patience(world: World) -> None:
    """A get fails with the last transient error once the next retry lies beyond GET_WAIT."""
    world.exchange.will(SCOPE, *(IssuerUnavailable("the issuer is down") for _ in range(10)))
    # Backoffs with RAND: 0.685, 1.37, 2.74, 5.48 s: the 4th failure (at 4.8 s) retries at 10.3 s.
    expected_calls = 4
    assert sum(tokens.backoff(n, RAND) for n in range(1, expected_calls)) <= GET_WAIT
    assert sum(tokens.backoff(n, RAND) for n in range(1, expected_calls + 1)) > GET_WAIT

    async def main() -> None:
        entry = world.entry()
        patience_ends = world.clock.now + GET_WAIT
        waiting = asyncio.create_task(world.refresher.get(None, [SCOPE], None))
        while not waiting.done():
            await until(
                lambda: (
                    waiting.done()
                    or (entry.inflight is None and entry.failures == len(world.exchange.calls) > 0)
                ),
                "a failure or the give-up",
            )
            retry_at = entry.retry_at
            if waiting.done() or retry_at is None:
                continue
            if retry_at > patience_ends:  # the get gives up now: moving the clock would race it
                await until(waiting.done, "the give-up")
            else:
                await world.advance_to(max(world.clock.now, retry_at))
        with pytest.raises(IssuerUnavailable) as caught:
            waiting.result()
        assert len(world.exchange.calls) == expected_calls
        assert str(caught.value) == (
            "the issuer is down (the agent tries again in 5 s; `mpagent refresh p` tries now)"
        )

    world.run(main)


def test_rejection_of_a_configured_key_backs_off_longer_then_retries(world: World) -> None:
    """A rejected configured key retries in the background at now + backoff(1, rejected=True)."""
    world.exchange.will(SCOPE, IssuerRejected("invalid_client", error="invalid_client"))

    async def main() -> None:
        world.schedule()
        entry = world.entry()
        await until(failed(entry, 1), "the rejection")
        retry_at = entry.retry_at
        assert retry_at == START + tokens.backoff(1, RAND, rejected=True)
        assert retry_at - START > tokens.backoff(1, RAND)
        assert not entry.waits_for_a_client
        await world.advance_to(retry_at)
        await until(lambda: entry.token, "the background retry")
        assert world.exchange.calls == [SCOPE, SCOPE]

    world.run(main)


def test_rejected_on_demand_key_waits_for_a_client(world: World) -> None:
    """A rejected on-demand key is never retried in the background; a get after retry_at retries it."""
    other = "b:read"
    refused = IssuerRejected("unauthorized_client for b:read", error="unauthorized_client")
    world.exchange.will(other, refused)

    async def main() -> None:
        world.schedule()
        with pytest.raises(IssuerRejected) as caught:
            await world.refresher.get(None, [other], None)
        entry = world.entry(other)
        assert entry.waits_for_a_client and entry.due_at(world.clock.now) is None
        retry_at = entry.retry_at
        assert retry_at == START + tokens.backoff(1, RAND, rejected=True)
        assert str(caught.value) == (
            "unauthorized_client for b:read (the agent tries again in 10 s at the earliest, when a "
            "client asks; `mpagent refresh p` tries now)"
        )
        await world.advance_to(retry_at - 1)
        with pytest.raises(IssuerRejected):  # before retry_at: the last error, no request
            await world.refresher.get(None, [other], None)
        await world.advance(IDLE - 2)  # well past retry_at, not yet idle
        assert world.exchange.calls.count(other) == 1
        token = await world.refresher.get(None, [other], None)
        assert token.scope == other and world.exchange.calls.count(other) == 2

    world.run(main)


def test_on_demand_keys_are_capped(world: World) -> None:
    """The 1,001st on-demand key is refused with advice; configured and known keys still serve."""
    refresher = world.refresher
    for n in range(MAX_ON_DEMAND_KEYS):
        assert refresher.cached(None, [f"x:{n}"], None) is None
    with pytest.raises(MpagentError) as caught:
        refresher.cached(None, ["x:one-too-many"], None)
    assert str(caught.value) == (
        "the agent already keeps 1000 on-demand token keys (scope sets no profile's `scopes` "
        "lists), its most; add the scopes you use to [profiles.p] scopes, or wait: a key "
        "nobody asks for is dropped after idle_timeout = 30 s"
    )
    assert refresher.cached(None, ["x:7"], None) is None  # an existing key: no error
    assert refresher.cached(None, [SCOPE], None) is None  # the configured key: no error
    assert len(refresher.entries) == MAX_ON_DEMAND_KEYS + 1


def test_idle_on_demand_key_is_dropped(world: World) -> None:
    """An on-demand key unused for idle_timeout is dropped within MAX_SLEEP; a configured key stays."""
    other = "b:read"

    async def main() -> None:
        world.schedule()
        await world.refresher.get(None, [other], None)
        await world.advance(IDLE - 10)
        assert world.refresher.cached(None, [other], None) is not None  # counts as a use
        await world.advance(IDLE - 0.01)
        assert world.entry(other)
        await world.advance(0.02)
        # The scheduler does not wake for idleness: it drops the key at its next slice.
        await world.advance(MAX_SLEEP)
        await until(lambda: len(world.refresher.entries) == 1, "the idle drop")
        assert world.entry(SCOPE).pinned

    world.run(main)


def test_refresh_now_forgets_the_backoff(world: World) -> None:
    """refresh_now retries a rejected key at once and returns once its refresh has ended."""
    world.exchange.will(SCOPE, IssuerRejected("invalid_client", error="invalid_client"))

    async def main() -> None:
        [entry] = await world.refresher.refresh_now("p")
        assert entry.error is not None and entry.retry_at is not None
        assert entry.retry_at > world.clock.now
        [again] = await world.refresher.refresh_now(None)
        assert again is entry and entry.token is not None and entry.retry_at is None
        assert world.exchange.calls == [SCOPE, SCOPE]
        with pytest.raises(ConfigError, match=r"no profile 'q' \(profiles: p\)"):
            await world.refresher.refresh_now("q")

    world.run(main)


def test_set_sources_keeps_unchanged_entries_tokens(world: World) -> None:
    """A reload keeps the tokens of unchanged keys, drops changed keys, unpins dropped scopes."""
    refresher, clock = world.refresher, world.clock
    q_exchange = FakeExchange(clock, fingerprint="sha256:q1")
    refresher.set_sources(
        {
            "p": source("p", world.exchange, (SCOPE, "a:write")),
            "q": source("q", q_exchange),
        },
        "p",
    )

    async def main() -> None:
        await refresher.refresh_now(None)

    world.run(main)
    p_read, p_write, q_read = world.entry(), world.entry("a:write"), world.entry(profile="q")
    assert p_read.token and p_write.token and q_read.token
    same_key = FakeExchange(clock)  # a new exchange, same signing key
    new_p = source("p", same_key)  # a:write no longer configured
    refresher.set_sources({"p": new_p, "q": source("q", FakeExchange(clock, "sha256:q2"))}, "p")
    assert world.entry() is p_read and p_read.token and p_read.source is new_p
    assert world.entry("a:write") is p_write and not p_write.pinned and p_write.token
    new_q = world.entry(profile="q")
    assert new_q is not q_read and new_q.token is None and new_q.pinned
    assert len(refresher.entries) == 3


def test_the_fake_loop_keeps_real_time_short() -> None:
    """The loop's timers follow the fake clock: an hour's sleep ends at once when the clock moves."""
    clock = Clock()

    async def main() -> float:
        started = time.monotonic()
        sleeper = asyncio.create_task(asyncio.sleep(3600))
        await settle()
        clock.now += 3600
        await sleeper
        return time.monotonic() - started

    with asyncio.Runner(loop_factory=lambda: ClockLoop(clock)) as runner:
        assert runner.run(main()) < 0.5


# -- tokens per customer organisation (Altinn 3, issue 14) --------------------------------

ORG_A, ORG_B = "123456785", "987654325"


class ClaimsExchange(FakeExchange):
    """A FakeExchange that also records the claims each fetch was asked for."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.claims: list[object] = []

    def fetch(self, scopes: list[str], claims: object = None) -> tokens.Token:
        self.claims.append(claims)
        return super().fetch(scopes)


def customer_world(world: World, ref: str | None = None) -> ClaimsExchange:
    exchange = ClaimsExchange(world.clock)
    profile = Profile("p", "test", "client-p", (SCOPE,), Path("k.p12"), systemuser_ref=ref)
    world.refresher.set_sources({"p": Source(profile, cast("Exchange", exchange))}, "p")
    return exchange


def test_customer_tokens_have_keys_of_their_own(world: World) -> None:
    """A token per customer organisation: each its own key, fetched with that organisation's
    claims (the profile's own token with none), then served from the cache; status names it."""
    from mpagent.refresher import Customer, customer

    exchange = customer_world(world)
    a, b = Customer(systemuser_org=ORG_A), customer(None, "0192:" + ORG_B)
    assert b == Customer(consumer_org=ORG_B)

    async def main() -> list[tokens.Token]:
        got = [await world.refresher.get(None, [SCOPE], None, org) for org in (None, a, b)]
        assert world.refresher.cached(None, [SCOPE], None, a) is got[1]
        return got

    got = world.run(main)
    assert len({t.access_token for t in got}) == 3 and len(world.refresher.entries) == 3
    assert exchange.claims == [
        None,
        {"authorization_details": altinn.systemuser_details(ORG_A)},
        {"consumer_org": ORG_B},
    ]
    listed = {
        (s["systemuser_org"], s["consumer_org"], s["configured"]) for s in world.refresher.status()
    }
    assert listed == {(None, None, True), (ORG_A, None, False), (None, ORG_B, False)}


def test_customer_keys_follow_the_profile_on_reload(world: World) -> None:
    """A reload keeps a customer's token while the profile's claims for it are unchanged, and
    drops it when they change (another systemuser_ref); the profile's own token stays."""
    from mpagent.refresher import Customer

    customer_world(world)
    a = Customer(systemuser_org=ORG_A)

    async def main() -> None:
        await world.refresher.get(None, [SCOPE], None)
        await world.refresher.get(None, [SCOPE], None, a)

    world.run(main)
    entries = dict(world.refresher.entries)
    customer_world(world)  # the same profile again
    assert world.refresher.entries == entries
    customer_world(world, ref="kunde-1")
    left = list(world.refresher.entries.values())
    assert len(left) == 1 and left[0].customer is None and left[0].token is not None


def test_customer_mistakes_are_config_errors() -> None:
    """Both organisations at once, or a bad check digit, fail before any key is made."""
    from mpagent.refresher import customer

    assert customer(None, None) is None
    with pytest.raises(ConfigError, match="not both at once"):
        customer(ORG_A, ORG_B)
    with pytest.raises(ConfigError, match="systemuser_org = '123456780' has a wrong check digit"):
        customer("123456780", None)


def test_keys_differ_by_exchange_target() -> None:
    """A Maskinporten token and the Altinn token it is exchanged for never share a key."""
    plain = Profile("p", "test", "c", (SCOPE,), Path("k.p12"))
    exchanged = Profile("p", "test", "c", (SCOPE,), Path("k.p12"), exchange="https://a.example/x")
    assert Source(plain).key_for([SCOPE]) != Source(exchanged).key_for([SCOPE])
    assert Source(exchanged).key_for([SCOPE]).exchange == "https://a.example/x"


def test_hanging_exchange_leaves_the_environment_its_slots() -> None:
    """Exchanging keys whose fetches hang (Altinn's step) hold slots of their own: a plain
    profile of the same environment still gets its token while ISSUER_SLOTS of them hang."""
    clock = Clock()
    altinn_side, plain_side = FakeExchange(clock), FakeExchange(clock)
    gate = threading.Event()
    scopes = [f"a:{n}" for n in range(ISSUER_SLOTS)]
    for scope in scopes:
        altinn_side.will(scope, gate)
    exchanging = Profile("alt", "test", "c", (), Path("k.p12"), exchange="https://a.example/x")
    sources = {
        "alt": Source(exchanging, cast("Exchange", altinn_side)),
        "plain": source("plain", plain_side),
    }
    with ThreadPoolExecutor(8) as pool:
        world = World(clock, plain_side, Refresher(pool, clock=clock, rand=lambda: RAND))
        world.refresher.set_sources(sources, "plain")

        async def main() -> None:
            hanging = [asyncio.create_task(world.refresher.get("alt", [s], None)) for s in scopes]
            await until(lambda: len(altinn_side.calls) == ISSUER_SLOTS, "all slots taken")
            plain = asyncio.create_task(world.refresher.get("plain", [SCOPE], None))
            try:
                await until(plain.done, "the plain profile's token, while Altinn hangs")
                assert plain.result().scope == SCOPE and not any(h.done() for h in hanging)
            finally:
                gate.set()
            await asyncio.gather(plain, *hanging)

        world.run(main)


def test_customer_keys_have_a_cap_of_their_own(world: World) -> None:
    """Customer organisations beyond MAX_CUSTOMER_KEYS are refused with their own message,
    and they take nothing from the on-demand cap: new plain on-demand keys still come."""
    from mpagent.refresher import MAX_CUSTOMER_KEYS, Customer

    customer_world(world)
    refresher = world.refresher
    orgs = [f"{n:08d}" for n in range(10_000_000, 10_000_000 + 2 * MAX_CUSTOMER_KEYS)]
    valid = [o + str(d) for o in orgs if (d := altinn.check_digit(o)) is not None]
    for org in valid[:MAX_CUSTOMER_KEYS]:
        assert refresher.cached(None, [SCOPE], None, Customer(systemuser_org=org)) is None
    with pytest.raises(MpagentError) as caught:
        refresher.cached(None, [SCOPE], None, Customer(consumer_org=valid[MAX_CUSTOMER_KEYS]))
    assert str(caught.value).startswith(
        f"too many customer organisations at once: {MAX_CUSTOMER_KEYS}; "
    )
    assert "idle_timeout = 30 s" in str(caught.value)
    for n in range(MAX_ON_DEMAND_KEYS):  # plain on-demand keys: their own cap, all of it
        assert refresher.cached(None, [f"x:{n}"], None) is None
    with pytest.raises(MpagentError, match="already keeps 1000 on-demand token keys"):
        refresher.cached(None, ["x:one-too-many"], None)
    assert len(refresher.entries) == 1 + MAX_CUSTOMER_KEYS + MAX_ON_DEMAND_KEYS
