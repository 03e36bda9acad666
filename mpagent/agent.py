"""The composition root: start, serve, reload, stop. The only module that knows every piece.

The event loop serves clients and schedules refreshes; key loading, keyring look-ups and the
env file run on a single I/O thread, token requests on a small pool. Signal handlers only
schedule work on the loop. The wall clock is injected (`clock`), as the refresher's is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpagent import __version__, config, envfile, logs, paths, protocol, server, systemd
from mpagent.config import Config, Profile
from mpagent.errors import AlreadyRunning, ConfigError, MpagentError, ProtocolError
from mpagent.exchange import open_exchange
from mpagent.keys import certificate_warning
from mpagent.keywatch import KeyWatch
from mpagent.passwords import ProfilePasswords
from mpagent.private import ensure_private_dir, remove_leftovers, try_lock, write_atomic
from mpagent.refresher import Customer, Entry, Refresher, Source, customer
from mpagent.tokenfiles import TokenFilesWriter
from mpagent.tokens import Token, scope_string

log = logging.getLogger("mpagent")

RELOAD_DEBOUNCE = 0.3
# At SIGTERM, requests in flight get this long; a refresh still hanging on a slow issuer is
# then abandoned: a container runtime kills after 10 s (Docker) or 30 s (Kubernetes), and the
# agent must be gone within 5 s of SIGTERM (run()).
DRAIN_TIMEOUT = 3.0
FILES_RETRY = 5.0  # seconds before token files that failed to be written are tried again
# At stop, an env-file write already running on the io thread gets this long (it is quick);
# one still queued there (behind a reload's slow password_command, say) is cancelled.
STOP_WRITE_WAIT = 0.5


class Pool(ThreadPoolExecutor):
    """A thread pool that counts its jobs not finished yet (queued or running): what an exit
    would wait for. Its idle threads are not counted."""

    def __init__(self, max_workers: int, name: str) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=name)
        self._count_lock = threading.Lock()
        self.unfinished = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        future = super().submit(fn, *args, **kwargs)
        with self._count_lock:
            self.unfinished += 1
        future.add_done_callback(self._finished)  # also when cancelled
        return future

    def _finished(self, _future: Any) -> None:
        with self._count_lock:
            self.unfinished -= 1


@dataclass
class Loaded:
    """Every profile of a configuration, opened: what the agent adopts."""

    sources: dict[str, Source] = field(default_factory=dict)
    unusable: dict[str, MpagentError] = field(default_factory=dict)  # no Profile to use
    problems: dict[str, str] = field(default_factory=dict)  # a line per unusable profile
    passwords: dict[str, str] = field(default_factory=dict)  # "locked", "unlocked (from: env)"


def load_sources(
    cfg: Config,
    *,
    interactive: bool = False,
    previous: dict[str, Source] | None = None,
    unlocked: dict[str, dict[str, str]] | None = None,
    server: bool = False,
) -> Loaded:
    """Open every profile's key; each profile fails alone. On a reload (`previous`), a
    profile that worked keeps its previous source when its new version cannot be used: an
    edit that breaks prod never costs prod's tokens. `unlocked`: the passwords `mpagent
    unlock` handed over, by profile. `server` (server mode): no keyring, no prompt."""
    out = Loaded()
    for name in cfg.names:
        passwords = None
        try:
            profile = cfg.profile(name)
            passwords = ProfilePasswords.for_profile(
                profile, unlocked=(unlocked or {}).get(name), interactive=interactive, server=server
            )
            out.sources[name] = Source(profile, exchange=open_exchange(cfg, profile, passwords))
            source = passwords.source("keystore")
            out.passwords[name] = f"unlocked (from: {source})" if source else "not needed"
            continue
        except MpagentError as exc:
            error = exc
        if error.details.get("locked"):
            out.passwords[name] = "locked"
            error = type(error)(error.message, **{**error.details, "profile": name})
        elif passwords is not None and (source := passwords.source("keystore")):
            out.passwords[name] = f"wrong password? (from: {source})"
        old = (previous or {}).get(name)
        if old is not None and old.exchange is not None:
            out.sources[name] = old
            out.problems[name] = f"{error.message}; its previous configuration keeps running"
        elif name in cfg.broken:
            out.unusable[name] = error
            out.problems[name] = error.message
        else:
            out.sources[name] = Source(cfg.profiles[name], error=error)
            out.problems[name] = error.message
        log.error("profile %s cannot be used: %s", name, out.problems[name])
    return out


class Agent:
    def __init__(
        self,
        cfg: Config,
        config_path: str | None,
        *,
        clock: Callable[[], float] = time.time,
        server_mode: bool = False,
    ) -> None:
        self.cfg, self.config_path, self.clock = cfg, config_path, clock
        self.server_mode = server_mode  # no keyring, no prompt: fixed at start
        self.socket_path = Path(paths.socket_path())
        self.env_path = cfg.agent.env_file or Path(paths.default_env_file())
        self.started = clock()
        self.reload_error: MpagentError | None = None
        self.problems: dict[str, str] = {}
        self.passwords: dict[str, str] = {}
        self.unlocked: dict[str, dict[str, str]] = {}  # `mpagent unlock`: memory only
        self.bridge: Any = None  # set by _start_bridge; a client may ask for a reload before
        self.http: Any = None  # the texas-compatible endpoint, set by _start_http
        self._unwarned: set[str] = set()  # profiles whose key warnings no `get` has carried yet
        self.stopping = asyncio.Event()
        self.fetch_pool = Pool(8, "mpagent-fetch")
        self.io = Pool(1, "mpagent-io")
        self.refresher = Refresher(
            self.fetch_pool,
            idle_timeout=cfg.agent.idle_timeout,
            on_change=self._changed,
            clock=clock,
        )
        self.keywatch = KeyWatch(self.refresher, clock=clock)  # registered keys' expiry
        self._env_written: str | None = None
        self.env_error: str | None = None  # the last env-file write failure, for `status`
        self._env_task: asyncio.Task[None] | None = None
        self._env_write: Any = None  # the env file's write on the io thread (a Future)
        self._env_dirty = False
        self.token_files = TokenFilesWriter(server_mode=server_mode)  # [files]: io thread
        self._files_task: asyncio.Task[None] | None = None
        self._files_dirty = False
        self._files_retry: asyncio.TimerHandle | None = None
        self._reload_handle: asyncio.TimerHandle | None = None
        self._watcher: Any = None

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        lock = self._lock()
        try:
            listener = self._open_listener()
            await loop.run_in_executor(self.io, self._prepare_env_file)
            server_mode = self.server_mode
            loaded = await loop.run_in_executor(
                self.io,
                lambda: load_sources(
                    self.cfg, interactive=os.isatty(0) and not server_mode, server=server_mode
                ),
            )
            self._adopt(self.cfg, loaded)
            http_server = await self._start_http()  # listening once clients see the agent
            await listener.start(self.handle)
            bridge_server = await self._start_bridge()
            self._install_signals(loop)
            self._watch()
            scheduler = loop.create_task(self.refresher.run())
            key_checks = loop.create_task(self.keywatch.run())
            log.info(
                "mpagent %s serving on %s (pid %d)", __version__, self.socket_path, os.getpid()
            )
            systemd.notify("READY=1")
            await self.stopping.wait()
            systemd.notify("STOPPING=1")
            log.info("stopping")
            listener.close()
            if bridge_server is not None:
                bridge_server.close()
            http_server.close()
            await self._drain(listener)
            scheduler.cancel()
            key_checks.cancel()
            if self._reload_handle is not None:
                self._reload_handle.cancel()
            # A reload in flight is abandoned (reload(), _adopt): nothing here waits on it.
            await self._finish_env()
            with contextlib.suppress(FileNotFoundError):
                self.env_path.unlink()
            await self._finish_files()
            return 0
        finally:
            if self._watcher is not None:
                self._watcher.stop()
            self.fetch_pool.shutdown(wait=False, cancel_futures=True)
            self.io.shutdown(wait=False, cancel_futures=True)
            os.close(lock)

    def unfinished(self) -> int:
        """Jobs of the pools not finished: a fetch or a password_command still running."""
        return self.fetch_pool.unfinished + self.io.unfinished

    def _open_listener(self) -> server.Listener:
        if sys.platform == "win32":
            from mpagent import pipeserver

            return pipeserver.PipeListener(str(self.socket_path))
        sock = systemd.inherited_listener()
        if sock is None:
            return server.UnixListener(server.bind_private(self.socket_path), owned=True)
        self.socket_path = Path(sock.getsockname())
        log.info("using the socket passed by the service manager")
        return server.UnixListener(sock, owned=False)  # the service manager keeps it

    async def _drain(self, listener: server.Listener) -> None:
        """Let requests in flight finish (a refresh they wait for is bounded by HTTP timeouts)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_TIMEOUT  # the loop's monotonic clock: a wait, not a date
        while listener.busy() and loop.time() < deadline:
            await asyncio.sleep(0.02)

    async def _start_bridge(self) -> Any:
        """The opt-in loopback token endpoint for HTTP tools: its address applies at start,
        its secret at every reload (`self.bridge.reread`)."""
        from mpagent import bridge

        self.bridge = bridge.Off()
        if self.cfg.bridge.listen is None:
            return self.bridge
        try:
            self.bridge = await bridge.start(self.cfg.bridge, self.refresher, self.io)
        except MpagentError as exc:  # e.g. the port is taken: the socket still serves
            log.error("the token bridge is off: %s", exc)
            self.bridge = bridge.Off(self.cfg.bridge.listen, exc.message)  # `status` says why
        return self.bridge

    async def _start_http(self) -> Any:
        """The texas-compatible endpoint ([http] listen): its address applies at start, who
        may call it (allow_uids, allow_any_local) at every reload (`self.http.reread`)."""
        from mpagent import httpapi

        self.http = httpapi.Off()
        if self.cfg.http.listen is None:
            return self.http
        try:
            self.http = await httpapi.start(
                self.cfg.http, self.refresher, clock=self.clock, files_problem=self._http_files
            )
        except MpagentError as exc:  # e.g. the port is taken: the socket still serves
            log.error("the texas-compatible endpoint is off: %s", exc)
            self.http = httpapi.Off(self.cfg.http.listen, exc.message)  # `status` says why
        return self.http

    def _http_files(self) -> str | None:
        """For /healthz: with [files] dir set, why the held tokens' files are not all there."""
        if self.cfg.files.dir is None:
            return None
        held = {(e.key.profile, e.key.scope) for e, _ in self._kept_tokens()}
        return self.token_files.problem(held)

    def _lock(self) -> int:
        """Single instance per socket: a lock held for the agent's life."""
        lock_path = Path(paths.lock_file())
        ensure_private_dir(lock_path.parent)
        fd = try_lock(lock_path)
        if fd is None:
            raise AlreadyRunning(
                f"an agent is already running on {self.socket_path}; stop it with `mpagent stop`"
            ) from None
        return fd

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        if sys.platform == "win32":  # no add_signal_handler, no SIGHUP: reload via the pipe
            for sig in (signal.SIGINT, signal.SIGBREAK):
                signal.signal(sig, lambda *_: loop.call_soon_threadsafe(self.stopping.set))
            return
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

    # -- requests ------------------------------------------------------------------------

    def handle(self, words: list[str], fields: protocol.Fields) -> bytes | Any:
        verb = words[0] if len(words) == 1 else None
        if verb == "get":
            return self._get(fields)
        if verb == "env":
            return self._env(fields)
        if verb == "status":
            return server.json_reply(self.status())
        if verb == "reload":
            return self._reload_reply()
        if verb == "refresh":
            return self._refresh_reply(protocol.first(fields, "profile"))
        if verb == "unlock":
            return self._unlock(fields)
        if verb == "lock":
            return self._lock_profiles(protocol.every(fields, "profile"))
        if verb == "stop":
            self.stopping.set()
            return server.ok_reply([("pid", str(os.getpid()))])
        raise ProtocolError(
            f"unknown request {' '.join(words)!r}; "
            "this agent knows get, env, status, reload, refresh, unlock, lock, stop"
        )

    def _get(self, fields: protocol.Fields) -> bytes | Any:
        scopes = protocol.every(fields, "scope")
        if not scopes:
            raise ProtocolError("get needs at least one scope")
        profile = protocol.first(fields, "profile")
        min_ttl = _float(protocol.first(fields, "min_ttl"), "min_ttl")
        # Per customer (`get --systemuser-org` / `--consumer-org`): a key of its own.
        org = customer(
            protocol.first(fields, "systemuser_org"), protocol.first(fields, "consumer_org")
        )
        token = self.refresher.cached(profile, scopes, min_ttl, org)
        if token is not None:
            return server.token_reply(token, self._warnings(profile))
        return self._get_slow(profile, scopes, min_ttl, org)

    async def _get_slow(
        self, profile: str | None, scopes: list[str], min_ttl: float | None, org: Customer | None
    ) -> bytes:
        token = await self.refresher.get(profile, scopes, min_ttl, org)
        return server.token_reply(token, self._warnings(profile))

    def _env(self, fields: protocol.Fields) -> bytes | Any:
        """`mpagent env` and `exec`: a fresh token for each scope asked for, else for each the
        profile configures, as name/value pairs under the env file's names."""
        source = self.refresher.source(protocol.first(fields, "profile"))
        profile = source.profile
        scopes = protocol.every(fields, "scope") or list(profile.scopes)
        min_ttl = _float(protocol.first(fields, "min_ttl"), "min_ttl")
        cached = [self.refresher.cached(profile.name, [scope], min_ttl) for scope in scopes]
        if all(token is not None for token in cached):
            return self._env_reply(profile, scopes, cached)
        return self._env_slow(profile, scopes, min_ttl)

    async def _env_slow(self, profile: Profile, scopes: list[str], min_ttl: float | None) -> bytes:
        """The tokens are fetched side by side; the first scope (in request order) that
        fails fails the request with its error, as `get` for it would."""
        fetched = await asyncio.gather(
            *(self.refresher.get(profile.name, [scope], min_ttl) for scope in scopes),
            return_exceptions=True,
        )
        for result in fetched:
            if isinstance(result, BaseException):
                raise result
        return self._env_reply(profile, scopes, fetched)

    def _env_reply(self, profile: Profile, scopes: list[str], tokens: list[Any]) -> bytes:
        """NAME and NAME_EXPIRES_AT (integer epoch seconds) for each token, as in the env file."""
        variables = envfile.variables(
            profile.name,
            profile.env_names,
            [
                (scope_string([s]), t.access_token, t.expires_at)
                for s, t in zip(scopes, tokens, strict=True)
            ],
            short=profile.name == self.cfg.default_name,
        )
        pairs = [f for n, v in variables.items() for f in (("name", n), ("value", v))]
        warnings = [("warning", w) for w in self._warnings(profile.name)]
        return server.ok_reply([*pairs, *warnings])

    def _warnings(self, profile: str | None) -> tuple[str, ...]:
        """A profile's key warnings (e.g. a nonRepudiation-only certificate), carried by its
        first served token only, so that the user sees them once on stderr."""
        if not self._unwarned:
            return ()
        source = self.refresher.source(profile)
        if source.profile.name not in self._unwarned or source.exchange is None:
            return ()
        self._unwarned.discard(source.profile.name)
        return tuple(source.exchange.key.warnings)

    async def _reload_reply(self) -> bytes:
        await self.reload("requested")
        return server.json_reply({"unusable": self.problems, "files": await self._files_settled()})

    async def _unlock(self, fields: protocol.Fields) -> bytes:
        """`mpagent unlock`: passwords the client checked against the keystore, kept in this
        process's memory only; the profile's key is opened with them at once."""
        name = protocol.first(fields, "profile")
        if name not in self.cfg.names:
            raise ConfigError(f"no profile {name!r} (profiles: {', '.join(self.cfg.names)})")
        given = {w: v for w in ("keystore", "key") if (v := protocol.first(fields, w))}
        if not given:
            raise ProtocolError("unlock needs a keystore or key password")
        before = self.unlocked.get(name)
        self.unlocked[name] = {**(before or {}), **given}
        try:
            await self.reload(f"profile {name} unlocked")
        finally:
            if name in self.problems or self.reload_error:  # keep what worked before, if any
                if before is None:
                    self.unlocked.pop(name, None)
                else:
                    self.unlocked[name] = before
        if name in self.problems:
            raise ConfigError(f"profile {name} is still unusable: {self.problems[name]}")
        return server.ok_reply()

    async def _lock_profiles(self, names: list[str]) -> bytes:
        """`mpagent lock [PROFILE...]`: forget passwords given by unlock (all, without names);
        those profiles' keys and tokens go with them."""
        forgotten = [n for n in (names or list(self.unlocked)) if self.unlocked.pop(n, None)]
        if forgotten:
            await self.reload(f"locked {', '.join(forgotten)}", forget=set(forgotten))
        return server.ok_reply([("locked", name) for name in forgotten])

    async def _refresh_reply(self, profile: str | None) -> bytes:
        entries = await self.refresher.refresh_now(profile)
        results = [
            {
                "profile": e.key.profile,
                "scope": e.key.scope,
                # A per-customer key's organisation: two of one scope are told apart.
                "systemuser_org": e.customer.systemuser_org if e.customer else None,
                "consumer_org": e.customer.consumer_org if e.customer else None,
                "ok": e.error is None and e.token is not None,
                "error": e.error.to_wire() if e.error else None,
            }
            for e in entries
        ]
        return server.json_reply(results)

    def status(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": self.clock() - self.started,
            "socket": str(self.socket_path),
            "env_file": str(self.env_path),
            "env_file_error": self.env_error,
            "config": str(self.cfg.path),
            "reload_error": self.reload_error.message if self.reload_error else None,
            "profiles": {name: self.problems.get(name) for name in self.cfg.names},
            # Altinn 3: the profiles whose tokens are exchanged, and where ("altinn-tt02").
            "exchanges": {
                name: p.exchange_name for name, p in self.cfg.profiles.items() if p.exchange
            },
            "passwords": {name: self.passwords.get(name) for name in self.cfg.names},
            "warnings": {
                name: warning
                for name, s in self.refresher.sources.items()
                if s.exchange and (warning := certificate_warning(s.exchange.key, self.clock()))
            },
            "tokens": self.refresher.status(),
            "bridge": self.bridge.status() if self.bridge is not None else None,
            "http": self.http.status() if self.http is not None else None,
            "files": self.token_files.status(),
            **self.keywatch.status(),  # registered_keys, key_warnings
        }

    # -- reload --------------------------------------------------------------------------

    def request_reload(self) -> None:
        """From a signal or the file watcher: coalesce bursts of events into one reload."""
        loop = asyncio.get_running_loop()
        if self._reload_handle is not None:
            self._reload_handle.cancel()
        self._reload_handle = loop.call_later(
            RELOAD_DEBOUNCE, lambda: loop.create_task(self._reload_logged())
        )

    async def _reload_logged(self) -> None:
        with contextlib.suppress(MpagentError):
            await self.reload("a watched file changed or SIGHUP")

    async def reload(self, reason: str, *, forget: set[str] | None = None) -> None:
        """Apply every valid change. Only a file that cannot be read or parsed, or a mistake
        outside [profiles], keeps the whole old configuration; a profile that cannot be used
        is reported and keeps its previous version if it had a working one."""
        loop = asyncio.get_running_loop()
        log.info("reloading (%s)", reason)
        try:
            cfg = await loop.run_in_executor(self.io, config.load, self.config_path)
            self.reload_error = None
        except MpagentError as exc:
            self.reload_error = exc
            log.error("reload refused, the previous configuration keeps running: %s", exc)
            if not forget:
                raise
            cfg = self.cfg  # a lock holds even now: its profiles go, from the running config
        # `forget`: profiles just locked, whose previous (unlocked) version must not live on.
        previous = {n: s for n, s in self.refresher.sources.items() if n not in (forget or ())}
        unlocked = dict(self.unlocked)
        loaded = await loop.run_in_executor(
            self.io,
            lambda: load_sources(
                cfg, previous=previous, unlocked=unlocked, server=self.server_mode
            ),
        )
        if self.stopping.is_set():
            return  # stopped meanwhile: nothing of it is adopted
        self._adopt(cfg, loaded)
        self._watch()
        if self.bridge is not None:
            await self.bridge.reread(cfg.bridge)
        if self.http is not None:
            self.http.reread(cfg.http)
        log.info("reloaded" + (f"; unusable: {', '.join(self.problems)}" if self.problems else ""))

    def _adopt(self, cfg: Config, loaded: Loaded) -> None:
        if self.stopping.is_set():
            return  # a reload that finished after "stopping": its tokens and files never come
        self.cfg, self.problems, self.passwords = cfg, loaded.problems, loaded.passwords
        self._unwarned = {
            name for name, s in loaded.sources.items() if s.exchange and s.exchange.key.warnings
        }
        self.refresher.idle_timeout = cfg.agent.idle_timeout
        self.refresher.set_sources(loaded.sources, cfg.default_profile, loaded.unusable)
        self.keywatch.update(cfg)

    def _watch(self) -> None:
        from mpagent import watch

        profiles = [s.profile for s in self.refresher.sources.values()]
        files = [self.cfg.path] + [f for p in profiles for f in (p.keystore, p.certificate) if f]
        loop = asyncio.get_running_loop()
        if self._watcher is not None:
            self._watcher.stop()
        self._watcher = watch.watch(files, lambda: loop.call_soon_threadsafe(self.request_reload))

    # -- env file ------------------------------------------------------------------------

    def _prepare_env_file(self) -> None:
        """Before the first write: remove temp files a killed agent left (they hold tokens),
        and the expired tokens of its env file. Its valid ones stay until ours replace them:
        tools keep working while this agent fetches, even with the issuer down."""
        remove_leftovers(self.env_path)
        try:
            old = self.env_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return
        valid = envfile.unexpired(old, self.clock())
        if valid == old:
            return
        try:
            write_atomic(self.env_path, valid)
        except OSError as exc:
            self.env_error = f"cannot write {self.env_path}: {exc.strerror or exc}"
            log.error("cannot remove expired tokens from %s: %s", self.env_path, exc)
            return
        log.info("removed the expired tokens a previous agent left in %s", self.env_path)

    def _env_changed(self) -> None:
        if self.stopping.is_set():
            return  # the env file is being removed: no write may recreate it
        self._env_dirty = True
        if self._env_task is None or self._env_task.done():
            self._env_task = asyncio.get_running_loop().create_task(self._write_env())

    async def _write_env(self) -> None:
        loop = asyncio.get_running_loop()
        while self._env_dirty:
            self._env_dirty = False
            try:
                tokens = self._env_tokens()
                content = envfile.render(tokens)
                if content == self._env_written or (not tokens and self._env_written is None):
                    continue  # nothing new; and a crashed agent's file keeps its tokens until ours
                self._env_write = self.io.submit(write_atomic, self.env_path, content)
                await asyncio.wrap_future(self._env_write, loop=loop)
                self._env_written, self.env_error = content, None
                log.debug("env file %s updated", self.env_path)
            except OSError as exc:
                self.env_error = f"cannot write {self.env_path}: {exc.strerror or exc}"
                log.error("cannot write the env file %s: %s", self.env_path, exc)
            except Exception as exc:  # a bug: said, and the next change tries again
                # Its type only: what is being written is tokens.
                self.env_error = f"cannot write {self.env_path}: {type(exc).__name__}"
                log.error(
                    "cannot write the env file %s: unexpected %s", self.env_path, type(exc).__name__
                )

    async def _finish_env(self) -> None:
        """At stop, before the agent removes the file: the write under way ends (the writer
        reports its own failures), for STOP_WRITE_WAIT s at most; one still queued on the io
        thread then (behind a reload's slow password_command) is cancelled, not waited for."""
        task = self._env_task
        if task is None:
            return
        await asyncio.wait([task], timeout=STOP_WRITE_WAIT)
        if task.done():
            return
        task.cancel()
        write = self._env_write
        if write is not None and not write.cancel():  # running after all: it is quick
            await asyncio.wait([asyncio.wrap_future(write)], timeout=STOP_WRITE_WAIT)
            if not write.done():  # a very slow disk: the file it renames in goes too
                write.add_done_callback(lambda _: self.env_path.unlink(missing_ok=True))

    def _env_tokens(self) -> list[tuple[str, str, float]]:
        default = self.cfg.default_name
        out: list[tuple[str, str, float]] = []
        for entry, token in self._kept_tokens():
            profile = entry.source.profile
            names = envfile.variable_names(
                profile.name, entry.key.scope, profile.env_names, short=profile.name == default
            )
            out.extend((name, token.access_token, token.expires_at) for name in names)
        return out

    def _kept_tokens(self) -> list[tuple[Entry, Token]]:
        """What the env file and the token files hold: each configured (pinned) scope set's
        token while it has not expired."""
        now = self.clock()
        return [
            (entry, entry.token)
            for entry in self.refresher.entries.values()
            if entry.pinned and entry.token is not None and entry.token.expires_at > now
        ]

    # -- token files ([files], tokenfiles.py) -------------------------------------------

    def _changed(self) -> None:
        """The refresher's on_change: a token came, was replaced, expired or was dropped."""
        if self.stopping.is_set():
            return  # the env file and the token files are going
        self._env_changed()
        self._files_changed()

    def _files_changed(self) -> None:
        writer = self.token_files
        if writer.closed or (self.cfg.files.dir is None and writer.status() is None):
            return  # stopping, or no [files] now and none before
        self._files_dirty = True
        if self._files_task is None or self._files_task.done():
            self._files_task = asyncio.get_running_loop().create_task(self._write_files())

    async def _write_files(self) -> None:
        """As _write_env: changes coalesced, the files written on the io thread (the first
        write of a directory after clearing what an earlier run left); a failure is tried
        again after FILES_RETRY s."""
        loop = asyncio.get_running_loop()
        while self._files_dirty:
            self._files_dirty = False
            files = self.cfg.files
            wanted = {(e.key.profile, e.key.scope): token for e, token in self._kept_tokens()}
            args = (files.dir, files.file_mode, files.group, wanted, self.clock())
            try:
                done = await loop.run_in_executor(self.io, self.token_files.sync, *args)
            except Exception as exc:  # a bug: said, and retried; its type only (tokens)
                log.error("cannot write the token files: unexpected %s", type(exc).__name__)
                self.token_files.error = f"unexpected {type(exc).__name__}"
                done = False
            if not done and self._files_retry is None:
                self._files_retry = loop.call_later(FILES_RETRY, self._retry_files)

    def _retry_files(self) -> None:
        self._files_retry = None
        self._files_changed()

    async def _finish_files(self) -> None:
        """At stop: no more writes, then this agent's files go, here on the loop thread
        (unlinks only: quick, not queued behind a slow reload on the io thread; a write under
        way finishes its one file pair first, a queued one does nothing)."""
        if self._files_retry is not None:
            self._files_retry.cancel()
        self.token_files.close()

    async def _files_settled(self) -> str | None:
        """For the reload reply: once the files write a reload set off has run (so a new
        setting that fails is said, not only "reloaded"), what /healthz says of the files."""
        if self._files_task is not None and not self.token_files.closed:
            await asyncio.shield(self._files_task)
        return self._http_files()


def _float(value: str | None, name: str) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        raise ProtocolError(f"{name} must be a number, not {value!r}") from None
    if not number >= 0:
        raise ProtocolError(f"{name} must be zero or more")
    return number


def run(config_path: str | None, *, foreground_only: bool = False) -> int:
    """`mpagent agent`: load the configuration (exit 78 if it is wrong), then serve.
    Server mode (`foreground_only`, or [agent] mode = "server"; CI, containers): no keyring,
    no prompt, JSON log lines on stdout unless log_format = "text", and gone within 5 s of
    SIGTERM even while a refresh hangs. (Clients of a configuration with mode = "server" never
    start an agent: autostart.py.)"""
    try:
        cfg = config.load(config_path)
    except ConfigError as exc:
        systemd.refuse_queued_clients(exc)
        raise
    server_mode = foreground_only or cfg.agent.mode == "server"
    log_format = cfg.agent.log_format or ("json" if server_mode else "text")
    logs.setup(
        os.environ.get("MPAGENT_LOG_LEVEL", cfg.agent.log_level),
        journal=bool(os.environ.get("JOURNAL_STREAM")),
        json_lines=log_format == "json",
    )
    if server_mode:
        log.info(
            "server mode (%s): no keyring, no prompt; config %s",
            "--foreground-only" if foreground_only else '[agent] mode = "server"',
            cfg.path,
        )
    limit = server.raise_open_files_limit()
    log.debug("open-files limit %d, so at most %d clients", limit, server.connection_cap(limit))
    agent = Agent(cfg, config_path, server_mode=server_mode)
    status = asyncio.run(agent.run())
    _exit_now_if_stuck(status, agent.unfinished())
    return status


def _exit_now_if_stuck(status: int, unfinished: int) -> None:
    """A fetch still hanging on a slow issuer (or a password_command) would hold the exit
    until its read timeout: Python joins worker threads at exit. Its result is not wanted
    any more, so the process ends here, its log flushed. `unfinished`: the jobs still
    running (the pools' idle threads end at once and are not counted)."""
    if unfinished:
        log.info(
            "stopped; not waiting for %d unfinished request(s) (to the issuer, or a password "
            "command)",
            unfinished,
        )
        logging.shutdown()
        sys.stdout.flush()
        os._exit(status)
