"""The agent's watch over each profile's registered keys (Digdir's admin API): their expiry
for `status` and `doctor`, a warning under RENEW_DAYS, and with `auto_renew = true` a renewal
(the same set posted again restarts every key's one-year clock; MP-121 "Expired key" after a
year, MASKINPORTEN.md §8).

A profile is watched when it has `admin_profile` or `auto_renew`. Its set is fetched at start
and every CHECK_EVERY (RETRY_AFTER after a failure), in a thread of its own, with an admin
token the agent's refresher holds for the admin profile. The decisions (`decide`,
`after_renewal`, `next_check`, `summary`, `warning`) are pure functions of the key set and
the time; `KeyWatch` does the I/O and the scheduling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mpagent.console import printable
from mpagent.errors import ConfigError, MpagentError
from mpagent.ownkeys import RENEW_DAYS, KeySet, RegisteredKey, expiring

if TYPE_CHECKING:
    from mpagent.config import Config, Profile
    from mpagent.refresher import Refresher

log = logging.getLogger("mpagent.keywatch")

CHECK_EVERY = 12 * 3600.0
RETRY_AFTER = 3600.0
MAX_SLEEP = 60.0  # sleep in slices checked against the wall clock: a suspend cannot oversleep
ADMIN_TOKEN_WAIT = 60.0
DAY = 86400.0


# -- pure policy ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    renew: bool  # post the same set again now
    expiring: tuple[str, ...]  # kids under RENEW_DAYS (expired ones included)


def decide(keys: KeySet, now: float, *, auto_renew: bool) -> Decision:
    """One check's verdict: with auto_renew, re-post the set when a key has fewer than
    RENEW_DAYS days left; never more than once per check (the caller posts at most once)."""
    soon = tuple(k.kid for k in expiring(keys, now))
    return Decision(renew=auto_renew and bool(soon), expiring=soon)


def after_renewal(renewed: KeySet, now: float, *, noted: bool) -> tuple[str | None, bool]:
    """What to log after a renewal whose keys still have fewer than RENEW_DAYS days (the
    server gives keys a shorter life): a message the first time only, so that a short
    lifetime is said once rather than at every check. Returns (message or None, noted)."""
    short = expiring(renewed, now)
    if not short:
        return None, False
    if noted:
        return None, True
    days = min(k.days_left(now) or 0.0 for k in short)
    kids = ", ".join(k.kid for k in short)
    return (
        f"renewed keys {kids} still expire within {RENEW_DAYS} days ({days:.1f} days): the "
        f"admin API gives keys a shorter life; the agent renews again at each check",
        True,
    )


def next_check(now: float, *, ok: bool) -> float:
    return now + (CHECK_EVERY if ok else RETRY_AFTER)


def summary(keys: KeySet, now: float, signing: str | None) -> list[dict[str, Any]]:
    """`status`'s registered_keys: each key's kid, days left (one decimal; None if the API
    gave no exp), and whether the profile signs with it."""
    return [
        {
            "kid": k.kid,
            "expires_in_days": None if (left := k.days_left(now)) is None else round(left, 1),
            "signing": k.kid == signing,
        }
        for k in keys.keys
    ]


def warning(keys: KeySet, now: float, profile: str, *, auto_renew: bool) -> str | None:
    """The warning under RENEW_DAYS days, saying what to do."""
    soon = expiring(keys, now)
    if not soon:
        return None
    parts = [_left_text(k, now) for k in soon]
    what = "registered key " + ", ".join(parts)
    if auto_renew:
        return f"{what}; auto_renew is on: the agent renews it (see its log)"
    return f"{what}; renew: mpagent keys renew --profile {profile} (or set auto_renew = true)"


def _left_text(key: RegisteredKey, now: float) -> str:
    left = key.days_left(now) or 0.0
    return f"{key.kid} expired" if left <= 0 else f"{key.kid} expires in {int(left)} days"


def render(doc: Mapping[str, Any]) -> list[str]:
    """`mpagent status`'s lines for the registered keys in the agent's status document."""
    watched = doc.get("registered_keys") or {}
    if not watched:
        return []
    lines = ["", f"{'PROFILE':<12} {'REGISTERED KID':<40} {'EXPIRES':<14} SIGNS"]
    for name, state in sorted(watched.items()):
        for key in state.get("keys") or []:
            days = key.get("expires_in_days")
            when = "unknown" if days is None else "expired" if days <= 0 else f"in {int(days)} days"
            mark = "!" if days is not None and days < RENEW_DAYS else " "
            lines.append(
                f"{name:<12} {key['kid']:<40} {mark}{when:<13} {'*' if key['signing'] else ''}"
            )
        if state.get("error"):
            lines.append(f"{name:<12} key check failed: {state['error']}")
        elif state.get("checked_at") is None:
            lines.append(f"{name:<12} key check under way")
    for name, text in sorted((doc.get("key_warnings") or {}).items()):
        lines.append(f"WARNING profile {name}: {text}")
    return [printable(line) for line in lines]


# -- the agent side ------------------------------------------------------------------------


@dataclass
class Watched:
    """One profile's latest check."""

    profile: Profile
    keys: KeySet | None = None
    checked_at: float | None = None
    error: str | None = None
    due: float = 0.0
    noted_short: bool = False
    noted_busy: bool = False  # a renewal was skipped while another writer held the lock


def watches(profile: Profile) -> bool:
    return bool(profile.admin_profile or profile.auto_renew)


class KeyWatch:
    """Checks each watched profile's key set on its schedule; `update` follows reloads."""

    def __init__(self, refresher: Refresher, *, clock: Callable[[], float] = time.time) -> None:
        self.refresher, self.clock = refresher, clock
        self.cfg: Config | None = None
        self.watched: dict[str, Watched] = {}
        self.stopping = threading.Event()  # checked before each admin API request
        self._wake = asyncio.Event()

    def update(self, cfg: Config) -> None:
        """The profiles of a new configuration: one whose key settings did not change keeps
        its last check and schedule, a new or changed one is checked now."""
        self.cfg = cfg
        before, self.watched = self.watched, {}
        for name, profile in cfg.profiles.items():
            if not watches(profile):
                continue
            old = before.get(name)
            self.watched[name] = Watched(profile) if old is None or _changed(old, profile) else old
            self.watched[name].profile = profile
        self._wake.set()

    def status(self) -> dict[str, Any]:
        now = self.clock()
        keys: dict[str, Any] = {}
        warnings: dict[str, str] = {}
        for name, w in self.watched.items():
            p = w.profile
            keys[name] = {
                "keys": summary(w.keys, now, p.kid) if w.keys else [],
                "checked_at": w.checked_at,
                "next_check": w.due,
                "auto_renew": p.auto_renew,
                "error": w.error,
            }
            if w.keys and (text := warning(w.keys, now, name, auto_renew=p.auto_renew)):
                warnings[name] = text
        return {"registered_keys": keys, "key_warnings": warnings}

    def keys_of(self, name: str) -> KeySet | None:
        w = self.watched.get(name)
        return w.keys if w else None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._wake.clear()
                now = self.clock()
                for w in list(self.watched.values()):
                    if w.due <= now and self.cfg is not None:
                        await self._in_thread(loop, self.cfg, w, self._token_source(loop))
                pending = [w.due for w in self.watched.values()]
                wait = min([MAX_SLEEP, *(d - self.clock() for d in pending)])
                if wait > 0:
                    try:
                        await asyncio.wait_for(self._wake.wait(), wait)
                    except TimeoutError:
                        pass
        finally:
            self.stopping.set()

    async def _in_thread(
        self,
        loop: asyncio.AbstractEventLoop,
        cfg: Config,
        w: Watched,
        token: Callable[[str, str], str],
    ) -> None:
        """One check in a daemon thread: the interpreter does not wait for it at exit (an
        executor's thread it would join, so a hanging admin API would hold `stop` up for
        the request's whole deadline)."""
        done = asyncio.Event()

        def work() -> None:
            try:
                self._check(cfg, w, token)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop closed: the agent stopped
                    loop.call_soon_threadsafe(done.set)

        threading.Thread(target=work, name="mpagent-keys", daemon=True).start()
        await done.wait()

    def _token_source(self, loop: asyncio.AbstractEventLoop) -> Callable[[str, str], str]:
        """An admin token from the agent's own refresher (its passwords, its cache), asked for
        from the worker thread."""

        def token(admin: str, scope: str) -> str:
            future = asyncio.run_coroutine_threadsafe(
                self.refresher.get(admin, [scope], None), loop
            )
            return future.result(ADMIN_TOKEN_WAIT).access_token

        return token

    def _check(self, cfg: Config, w: Watched, token: Callable[[str, str], str]) -> None:
        """One check of one profile (in the worker thread): fetch, maybe renew, record.
        Every failure is recorded for `status` and retried after RETRY_AFTER."""
        from mpagent import adminapi

        p = w.profile

        def bearer(scope: str) -> str:  # asked for before each request: none once stopping
            if self.stopping.is_set():
                raise _Stopping
            return token(admin.name, scope)

        try:
            admin = adminapi.admin_profile(cfg, p)
            api = adminapi.AdminApi(
                adminapi.base_url(p),
                bearer,
                connect_timeout=cfg.http.connect_timeout,
                read_timeout=cfg.http.read_timeout,
            )
            keys = api.keys(p.client_id)
            now = self.clock()
            if decide(keys, now, auto_renew=p.auto_renew).renew:
                keys = self._renew_alone(api, w, keys, now)
        except _Stopping:
            return
        except MpagentError as exc:
            w.error, w.due = exc.message, next_check(self.clock(), ok=False)
            log.error("profile %s: cannot check the registered keys: %s", p.name, exc.message)
            return
        except Exception as exc:  # a bug: said, and retried like a failure
            w.error, w.due = f"unexpected {type(exc).__name__}", next_check(self.clock(), ok=False)
            log.exception("profile %s: key check failed", p.name)
            return
        w.keys, w.error, w.checked_at = keys, None, self.clock()
        w.due = next_check(w.checked_at, ok=True)
        if not p.auto_renew and (text := warning(keys, w.checked_at, p.name, auto_renew=False)):
            log.warning("profile %s: %s", p.name, text)  # with auto_renew, _renew said it

    def _renew_alone(self, api: Any, w: Watched, keys: KeySet, now: float) -> KeySet:
        """Renew holding the profile's rotate lock (rotation.exclusive), with the set read
        again under it: a set read before could lack a key another writer just added. While
        a rotation or a keys command holds the lock, skip (said once) until a later check."""
        from mpagent import rotation

        p = w.profile
        try:
            with rotation.exclusive(p.name):
                renewed = self._renew(api, w, api.keys(p.client_id), now)
        except ConfigError as exc:
            if exc.details.get("check") != "busy":
                raise
            if not w.noted_busy:
                log.info(
                    "profile %s: a rotation or keys command is changing the registered keys "
                    "(it holds %s); the agent renews them at a later check",
                    p.name,
                    rotation.lock_path(p.name),
                )
            w.noted_busy = True
            return keys
        w.noted_busy = False
        return renewed

    def _renew(self, api: Any, w: Watched, keys: KeySet, now: float) -> KeySet:
        p = w.profile
        before = {k.kid: _left_text(k, now) for k in expiring(keys, now)}
        renewed: KeySet = api.replace(p.client_id, keys.keys)
        after = ", ".join(f"{k.kid} until {_date(k.expires)}" for k in renewed.keys)
        log.info(
            "profile %s: renewed the registered keys (auto_renew; %s): %s",
            p.name,
            "; ".join(before.values()),
            after,
        )
        note, w.noted_short = after_renewal(renewed, self.clock(), noted=w.noted_short)
        if note:
            log.warning("profile %s: %s", p.name, note)
        return renewed


class _Stopping(Exception):
    """The agent is stopping: a check in flight sends no further request."""


def _date(epoch: float | None) -> str:
    if epoch is None:
        return "an unknown date"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _changed(old: Watched, profile: Profile) -> bool:
    """Whether a reload changed what the check does or shows for this profile (a new kid:
    a rotation, whose set changed too)."""
    p = old.profile
    fields = ("client_id", "environment", "kid", "admin_profile", "admin_api", "auto_renew")
    return any(getattr(p, f) != getattr(profile, f) for f in fields)
