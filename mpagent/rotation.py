"""`mpagent keys rotate`: a new key takes over a profile's signing with no moment in which
the profile has no usable key, and an interrupted rotation finishes when run again.

The steps, each idempotent and recorded in a state file (0600, written atomically after each
one) so that a rerun continues at the first step not done:

1. generated   a new RSA key, its private half in a 0600 PEM file under the data dir;
2. registered  its public JWK added to the client's set (merged: Digdir's POST replaces the
               whole set), skipped when the kid is there already;
3. verified    a real grant signed with the new kid gets a token: Digdir's changes take 0-2
               minutes to reach the token endpoint, up to 15 seen (MASKINPORTEN.md §8), so
               this polls, and the profile keeps signing with the old key meanwhile;
4. switched    config.toml rewritten in place (keystore, kid, keystore_type = "pem"; alias and
               certificate removed; comments kept), and a running agent asked to reload;
5. grace       a wait, so that every process still holding the old key moves on (prior art:
               oslokommune/okdata-maskinporten-api waits 300 s);
6. removed     the old kid taken out of the set;
then the state file is removed.

The state names the profile, its configuration file and its key settings before and after, so
that a rerun against a configuration edited by hand meanwhile stops and says what to do
instead of guessing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mpagent import config, paths
from mpagent.config import Config, Profile
from mpagent.errors import (
    AdminApiError,
    ConfigError,
    IssuerRejected,
    IssuerUnavailable,
    MpagentError,
)
from mpagent.private import ensure_private_dir, read_regular, try_lock, write_atomic

STEPS = ("generated", "registered", "verified", "switched", "grace", "removed")
KEY_FIELDS = ("keystore", "keystore_type", "alias", "certificate", "kid")
POLL_EVERY = 2.0
GIVE_UP_AFTER = 20 * 60.0
PROGRESS_EVERY = 30.0
GRACE_SLICE = 5.0  # the grace is slept in slices checked against the clock (suspend, resume)
STATE_VERSION = 1


def state_path(profile: str) -> Path:
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in profile)
    return Path(paths.state_dir()) / "rotate" / f"{safe.lstrip('.') or '_'}.json"


def lock_path(profile: str) -> Path:
    return state_path(profile).with_suffix(".lock")


@contextlib.contextmanager
def exclusive(profile: str) -> Iterator[None]:
    """Be the one writer of the profile's key set: a rotation (for all its steps) and `keys
    create/renew/delete` hold the profile's rotate lock, so that none posts a set made
    before another's change. Held elsewhere: ConfigError with check "busy"."""
    path = lock_path(profile)
    ensure_private_dir(path.parent)
    lock = try_lock(path)
    if lock is None:
        raise ConfigError(
            f"the keys of profile {profile} are being changed by another mpagent (a `mpagent "
            f"keys rotate`, or keys create, renew or delete; it holds {path}): wait for it to "
            "finish, then run this again",
            check="busy",
        )
    try:
        yield
    finally:
        os.close(lock)


def rotating_kids(cfg: Config, client_id: str) -> dict[str, Path]:
    """The new kids of the rotations under way (running or interrupted) for the profiles
    of `client_id`, each with its state file."""
    found: dict[str, Path] = {}
    for prof in cfg.profiles.values():
        path = state_path(prof.name)
        if prof.client_id != client_id or not path.exists():
            continue
        try:
            state = json.loads(read_regular(path, private=True))
        except (OSError, ValueError):
            continue  # the rotation's own rerun says what is wrong with it
        if isinstance(state, dict) and isinstance(state.get("new_kid"), str):
            found[state["new_kid"]] = path
    return found


def key_settings(profile: Profile) -> dict[str, str | None]:
    """The settings that say which key a profile signs with, as config.toml holds them."""
    return {f: None if (v := getattr(profile, f)) is None else str(v) for f in KEY_FIELDS}


def rotate(
    cfg_path: Path | None,
    profile: str | None,
    *,
    grace: float,
    dry_run: bool,
    say: Callable[[str], None],
    out: Callable[[str], None],
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Rotate the profile's key, or with `dry_run` print what would be done, each request
    to the admin API included, changing nothing (no key file, no config write, no state)."""
    cfg = config.load(cfg_path)
    prof = cfg.profile(profile)
    path = state_path(prof.name)

    def run(state: dict[str, Any]) -> None:
        Rotation(cfg, prof, state, path, dry_run=dry_run, grace=grace, say=say, out=out,
                 clock=clock, sleep=sleep).run()  # fmt: skip

    if dry_run:
        state = _read_state(path, cfg, prof)
        if state is not None:
            say(f"a rotation to kid {state['new_kid']} is under way; a rerun would continue it")
        run(state or _new_state(cfg, prof, clock()))
        return
    with exclusive(prof.name):
        state = _read_state(path, cfg, prof)
        if state is not None:
            say(f"continuing the rotation of profile {prof.name} to kid {state['new_kid']}")
        run(state or _new_state(cfg, prof, clock()))


def _new_state(cfg: Config, prof: Profile, now: float) -> dict[str, Any]:
    """A rotation about to begin, once the profile can do one: a key to replace, a scope to
    prove the new one with, an admin profile and admin API (checked before any change)."""
    from mpagent import adminapi
    from mpagent.keys.generate import keys_dir, new_kid

    if prof.keystore is None and prof.keystore_env is not None:
        raise ConfigError(
            f"profile {prof.name} reads its keystore from {prof.keystore_env}, which rotate "
            'cannot replace; rotate where the profile has keystore = "FILE", then put the '
            f"new keystore in {prof.keystore_env} (base64)"
        )
    if prof.key_location is None:
        raise ConfigError(
            f"profile {prof.name} has no key yet, so there is none to rotate; create one: "
            f"mpagent keys create --profile {prof.name} --switch"
        )
    if not prof.scopes:
        raise ConfigError(
            f"{cfg.path}: [profiles.{prof.name}] has no scopes; rotate proves the new key with "
            'a real token for the first one before it switches: add scopes = ["..."]'
        )
    adminapi.admin_profile(cfg, prof)
    adminapi.refuse_admin_lockout(cfg, prof)
    adminapi.base_url(prof)
    kid = new_kid(prof.name, now)
    return {
        "version": STATE_VERSION,
        "profile": prof.name,
        "config": str(cfg.path),
        "client_id": prof.client_id,
        "environment": prof.environment,
        "old": key_settings(prof),
        "new_kid": kid,
        "new_keystore": str(keys_dir() / f"{kid}.pem"),
        "jwk": None,
        "done": [],
        "switched_at": None,
        "started_at": now,
    }


def _read_state(path: Path, cfg: Config, prof: Profile) -> dict[str, Any] | None:
    """The rotation under way for this profile, or None; one that belongs elsewhere is an
    error that says what to do."""
    try:
        state = json.loads(read_regular(path, private=True))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{path}: the state of an interrupted rotation cannot be read ({exc}); if no "
            "rotation is under way, delete the file and run `mpagent keys rotate` again"
        ) from None
    ok = isinstance(state, dict) and state.get("version") == STATE_VERSION
    if not ok or not all(isinstance(state.get(k), str) for k in ("profile", "config", "new_kid")):
        raise ConfigError(
            f"{path} is not a rotation state of this mpagent version; delete it and run "
            "`mpagent keys rotate` again (keys it registered show in `mpagent keys list`)"
        )
    finish = f"mpagent keys rotate --config {state['config']} --profile {state['profile']}"
    if state["profile"] != prof.name or state["config"] != str(cfg.path):
        raise ConfigError(
            f"{path} records a rotation of profile {state['profile']} in {state['config']}, "
            f"not of profile {prof.name} in {cfg.path}; finish that one ({finish}), or delete "
            "the file if you gave it up"
        )
    if state.get("client_id") != prof.client_id or state.get("environment") != prof.environment:
        raise ConfigError(
            f"{path}: the rotation to kid {state['new_kid']} was for client "
            f"{state.get('client_id')} in {state.get('environment')}, but profile {prof.name} "
            f"is now client {prof.client_id} in {prof.environment}; restore the profile and "
            f"rerun, or delete the file and check `mpagent keys list` for kid {state['new_kid']}"
        )
    return state


class Rotation:
    def __init__(
        self,
        cfg: Config,
        prof: Profile,
        state: dict[str, Any],
        path: Path,
        *,
        dry_run: bool,
        grace: float,
        say: Callable[[str], None],
        out: Callable[[str], None],
        clock: Callable[[], float],
        sleep: Callable[[float], None],
    ) -> None:
        self.cfg, self.prof, self.state, self.path = cfg, prof, state, path
        self.dry, self.grace = dry_run, grace
        self.say, self.out, self.clock, self.sleep = say, out, clock, sleep
        self.name, self.kid = prof.name, state["new_kid"]
        self.old_kid: str | None = state["old"]["kid"]
        self._key: Any = None  # the dry run's new key, in memory only
        self._dry_set: Any = None  # the dry run's set after the registration it did not do

    def run(self) -> None:
        self._check_config()
        if not self.dry:  # before the key file exists: a rerun must find that file
            self._save()
        steps = {
            "generated": self.generate,
            "registered": self.register,
            "verified": self.verify,
            "switched": self.switch,
            "grace": self.wait_grace,
            "removed": self.remove_old,
        }
        for step in STEPS:
            if step not in self.state["done"]:
                line = steps[step]()
                if not self.dry:
                    self.state["done"].append(step)
                    self._save()
                self.out(line)
        if not self.dry:
            self.path.unlink(missing_ok=True)
        self.out(self._farewell())

    # -- the steps: each returns its line -------------------------------------------------

    def generate(self) -> str:
        from mpagent.keys.generate import create_key, keys_dir, public_jwk

        path = Path(self.state["new_keystore"])
        if self.dry:
            from cryptography.hazmat.primitives.asymmetric import rsa

            self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.state["jwk"] = public_jwk(self._key, self.kid)
            return f"would generate kid {self.kid}, its private key in {path} (0600)"
        # A file here is of a run killed before it recorded the key (maybe mid-write, so
        # truncated): nothing was registered yet, and the path is this rotation's own.
        path.unlink(missing_ok=True)
        if path.parent == keys_dir():
            ensure_private_dir(path.parent)
        _, self.state["jwk"] = create_key(path, self.kid)
        return f"generated kid {self.kid}, its private key in {path} (0600)"

    def register(self) -> str:
        from mpagent.ownkeys import RegisteredKey, with_key

        api, client = self._api(), self.prof.client_id
        keys = self._keys(api)
        if keys.get(self.kid) is not None:
            return f"registered kid {self.kid} (it was already in client {client}'s set)"
        if self.old_kid is None:
            self.say(
                f"profile {self.name} signs with its certificate; once the client has a "
                "registered key, Maskinporten refuses certificate grants for it (kid needed), "
                "so its certificate tokens may fail until the switch"
            )
        merged = with_key(keys, RegisteredKey.new(self.state["jwk"]))
        api.replace(client, merged)
        self._dry_set = merged
        kids = ", ".join(k.kid for k in merged)
        verb = "would register" if self.dry else "registered"
        return f"{verb} kid {self.kid} with client {client}: the set is now {kids}"

    def verify(self) -> str:
        scope = self.prof.scopes[0]
        if self.dry:
            return (
                f"would wait until Maskinporten gives a token for {scope} to a grant signed "
                f"with kid {self.kid} (polling every {POLL_EVERY:g} s)"
            )
        from mpagent.exchange import open_exchange

        self._still_registered()
        candidate = dataclasses.replace(
            self.prof,
            keystore=Path(self.state["new_keystore"]),
            keystore_type="pem",
            kid=self.kid,
            alias=None,
            certificate=None,
        )
        exchange = open_exchange(self.cfg, candidate)
        started = self.clock()
        told = started - PROGRESS_EVERY
        while True:
            try:
                exchange.fetch([scope])
                break
            except (IssuerRejected, IssuerUnavailable) as exc:
                waited = self.clock() - started
                if waited >= GIVE_UP_AFTER:
                    raise IssuerUnavailable(
                        f"Maskinporten has not accepted kid {self.kid} in {waited / 60:.0f} "
                        f"minutes (last answer: {exc.message}); the rotation's state is kept "
                        f"in {self.path} and profile {self.name} still signs with its old "
                        f"key: run `mpagent keys rotate --profile {self.name}` again later to "
                        "continue"
                    ) from exc
                if self.clock() - told >= PROGRESS_EVERY:
                    told = self.clock()
                    answer = exc.details.get("error_description") or exc.message
                    self.say(
                        f"waiting for Maskinporten to accept kid {self.kid} ({waited:.0f} s so "
                        f"far; a change takes 0-2 minutes, sometimes more); it says: {answer}"
                    )
                self.sleep(POLL_EVERY)
        waited = self.clock() - started
        return (
            f"verified: Maskinporten gave a token for {scope} to a grant signed with kid "
            f"{self.kid} (after {waited:.0f} s)"
        )

    def switch(self) -> str:
        from mpagent import configedit

        values = self._new_settings()
        where = self.cfg.path
        if self.dry:
            return f"would rewrite {where} [profiles.{self.name}]: {configedit.lines_for(values)}"
        if self._still_registered():  # verified no more: the set was changed meanwhile
            self.say(self.verify())
        current = key_settings(self._current())
        if current != self._expected_new():  # not yet written (a rerun may find it written)
            configedit.update_profile(where, self.name, values)
        self.state["switched_at"] = self.clock()
        self._save()
        return f"switched profile {self.name} to kid {self.kid} in {where}; " + self._reload()

    def wait_grace(self) -> str:
        if self.dry:
            return f"would wait {self.grace:g} s (--grace) before removing the old key"
        now = self.clock()
        switched = self.state.get("switched_at")
        switched = now if switched is None else switched
        end = min(switched + self.grace, now + self.grace)
        if end > now:
            self.say(
                f"waiting {end - now:.0f} s (grace) so that whatever still holds the old key "
                "moves to the new one"
            )
        while (left := end - self.clock()) > 0:
            self.sleep(min(left, GRACE_SLICE))
        return f"grace: {self.grace:g} s have passed since the switch"

    def remove_old(self) -> str:
        from mpagent.ownkeys import KeySet, without_key

        if self.old_kid is None:
            return "no old kid to remove: the profile signed with its certificate"
        api, client = self._api(), self.prof.client_id
        keys = self._keys(api)
        if self.dry and self._dry_set is not None:
            keys = KeySet(self._dry_set)  # as it would be after the registration
        if keys.get(self.kid) is None:
            raise AdminApiError(
                f"kid {self.kid}, which profile {self.name} now signs with, is no longer in "
                f"client {client}'s set (changed meanwhile?), so the old kid {self.old_kid} "
                f"stays; check `mpagent keys list --profile {self.name}`"
            )
        if keys.get(self.old_kid) is None:
            return f"removed the old kid {self.old_kid} (it was no longer registered)"
        api.replace(client, without_key(keys, self.old_kid))
        verb = "would remove" if self.dry else "removed"
        return f"{verb} the old kid {self.old_kid} from client {client}'s set"

    # -- helpers ------------------------------------------------------------------------

    def _still_registered(self) -> bool:
        """Put the new kid back when another writer posted the set without it (while the
        rotation was interrupted, or a writer mpagent cannot lock out, such as Digdir's web
        portal); True if it had to."""
        from mpagent.ownkeys import RegisteredKey, with_key

        api, client = self._api(), self.prof.client_id
        keys = self._keys(api)
        if keys.get(self.kid) is not None:
            return False
        api.replace(client, with_key(keys, RegisteredKey.new(self.state["jwk"])))
        self.say(
            f"kid {self.kid} was no longer in client {client}'s set (another change posted "
            "the set without it); registered it again"
        )
        return True

    def _save(self) -> None:
        write_atomic(self.path, json.dumps(self.state, indent=2) + "\n")

    def _keys(self, api: Any) -> Any:
        if self.dry:  # GETs are sent in a dry run too; shown, as every request is
            self.out(f"GET {api.url(self.prof.client_id)}")
        return api.keys(self.prof.client_id)

    def _api(self) -> Any:
        """The admin API as the configuration now says (a switch may have changed it)."""
        from mpagent import adminapi

        cfg = config.load(self.cfg.path) if not self.dry else self.cfg
        show = self._show if self.dry else None
        return adminapi.for_profile(cfg, cfg.profile(self.name), show=show)

    def _show(self, request: str) -> None:
        for line in request.splitlines():  # the request line and its JSON body, a line each
            self.out(line)

    def _current(self) -> Profile:
        return config.load(self.cfg.path).profile(self.name)

    def _new_settings(self) -> dict[str, str | None]:
        return {
            "keystore": self.state["new_keystore"],
            "keystore_type": "pem",
            "kid": self.kid,
            "alias": None,
            "certificate": None,
        }

    def _expected_new(self) -> dict[str, str | None]:
        return {f: None for f in KEY_FIELDS} | self._new_settings()

    def _check_config(self) -> None:
        """The profile's key settings must be those the state expects at this step: the old
        ones before the switch, the new ones after (either, when a run was killed between
        writing config.toml and recording it)."""
        current = key_settings(self.prof)
        old, new = self.state["old"], self._expected_new()
        switched = "switched" in self.state["done"]
        if current == new or (current == old and not switched):
            return
        expected = "the new key" if switched else "the old key"
        raise ConfigError(
            f"{self.cfg.path}: [profiles.{self.name}] was changed while its key was being "
            f"rotated: it should sign with {expected} (kid {self.kid if switched else old['kid']}"
            f") but says kid {current['kid']}, keystore {current['keystore']}; restore those "
            f"lines and run `mpagent keys rotate --profile {self.name}` again to finish, or "
            f"delete {self.path} to give the rotation up (kid {self.kid} may then still be "
            "registered: see `mpagent keys list`)"
        )

    def _reload(self) -> str:
        """Ask a running agent to reload now (its file watcher would, a little later); a
        profile it cannot use after the reload stops the rotation before the old key goes."""
        from mpagent import client
        from mpagent.errors import AgentNotRunning

        try:
            reply = dict(client.call(paths.socket_path(), "reload", timeout=30))
        except AgentNotRunning as exc:
            if exc.details.get("absent"):
                return "no agent is running"
            self.say(f"could not ask the agent to reload ({exc.message}); it rereads the file")
            return "the agent was not asked to reload"
        except MpagentError as exc:
            raise ConfigError(
                f"the agent refused to reload: {exc.message}; the old key stays registered: "
                f"fix that, then run `mpagent keys rotate --profile {self.name}` again"
            ) from exc
        unusable = json.loads(reply.get("json", "{}")).get("unusable") or {}
        if self.name in unusable:
            raise ConfigError(
                f"the agent cannot use profile {self.name} with the new key: "
                f"{unusable[self.name]}; the old key stays registered: fix that, then run "
                f"`mpagent keys rotate --profile {self.name}` again"
            )
        return "the agent reloaded"

    def _farewell(self) -> str:
        from mpagent.keys.generate import keys_dir

        old = self.state["old"]["keystore"]
        head = f"done: profile {self.name} signs with kid {self.kid}"
        if self.dry:
            return f"{head} (dry run: nothing was changed)"
        if old and Path(old).parent == keys_dir():
            return f"{head}; the old private key {old} was made by mpagent: delete it"
        if old:
            return (
                f"{head}; it no longer uses {old}, which mpagent did not make: delete it only "
                "if nothing else uses it"
            )
        return head
