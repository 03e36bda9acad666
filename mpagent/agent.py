"""The composition root: start, serve, reload, stop. The only module that knows every piece.

The event loop serves clients and schedules refreshes; key loading, keyring look-ups and the
env file run on a single I/O thread, token requests on a small pool. Signal handlers only
schedule work on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mpagent import __version__, config, envfile, paths, protocol, server
from mpagent.config import Config
from mpagent.errors import AlreadyRunning, ConfigError, MpagentError, ProtocolError
from mpagent.exchange import open_exchange
from mpagent.keys import certificate_warning
from mpagent.passwords import ProfilePasswords
from mpagent.private import ensure_private_dir, try_lock
from mpagent.refresher import Refresher, Source

log = logging.getLogger("mpagent")

RELOAD_DEBOUNCE = 0.3
SD_LISTEN_FDS_START = 3
DRAIN_TIMEOUT = 10.0
QUEUED_CLIENTS_WAIT = 0.5


def load_sources(
    cfg: Config, *, interactive: bool = False, previous: dict[str, Source] | None = None
) -> tuple[dict[str, Source], dict[str, MpagentError], dict[str, str]]:
    """Open every profile's key; each profile fails alone. Returns the sources, the profiles
    whose configuration is wrong (they have no source), and a problem line per profile that
    cannot be used. On a reload (`previous`), a profile that worked keeps its previous source
    when its new version cannot be used: an edit that breaks prod never costs prod's tokens."""
    sources: dict[str, Source] = {}
    unusable: dict[str, MpagentError] = {}
    problems: dict[str, str] = {}
    for name in cfg.names:
        try:
            profile = cfg.profile(name)
            passwords = ProfilePasswords(name, interactive=interactive)
            sources[name] = Source(profile, exchange=open_exchange(cfg, profile, passwords))
            continue
        except MpagentError as exc:
            error = exc
        old = (previous or {}).get(name)
        if old is not None and old.exchange is not None:
            sources[name] = old
            problems[name] = f"{error.message}; its previous configuration keeps running"
        elif name in cfg.broken:
            unusable[name] = error
            problems[name] = error.message
        else:
            sources[name] = Source(cfg.profiles[name], error=error)
            problems[name] = error.message
        log.error("profile %s cannot be used: %s", name, problems[name])
    return sources, unusable, problems


class Agent:
    def __init__(self, cfg: Config, config_path: str | None) -> None:
        self.cfg, self.config_path = cfg, config_path
        self.socket_path = Path(paths.socket_path())
        self.env_path = cfg.agent.env_file or Path(paths.default_env_file())
        self.started = time.time()
        self.reload_error: MpagentError | None = None
        self.problems: dict[str, str] = {}
        self._unwarned: set[str] = set()  # profiles whose key warnings no `get` has carried yet
        self.stopping = asyncio.Event()
        self.fetch_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="mpagent-fetch")
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mpagent-io")
        self.refresher = Refresher(
            self.fetch_pool, idle_timeout=cfg.agent.idle_timeout, on_change=self._env_changed
        )
        self._env_written: str | None = None
        self._env_task: asyncio.Task[None] | None = None
        self._env_dirty = False
        self._reload_handle: asyncio.TimerHandle | None = None
        self._watcher: Any = None

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        lock = self._lock()
        try:
            listener = self._open_listener()
            await loop.run_in_executor(self.io, self._prepare_env_file)
            loaded = await loop.run_in_executor(
                self.io, lambda: load_sources(self.cfg, interactive=os.isatty(0))
            )
            self._adopt(self.cfg, *loaded)
            await listener.start(self.handle)
            bridge_server = await self._start_bridge()
            self._install_signals(loop)
            self._watch()
            scheduler = loop.create_task(self.refresher.run())
            log.info(
                "mpagent %s serving on %s (pid %d)", __version__, self.socket_path, os.getpid()
            )
            notify("READY=1")
            await self.stopping.wait()
            notify("STOPPING=1")
            log.info("stopping")
            listener.close()
            if bridge_server is not None:
                bridge_server.close()
            await self._drain(listener)
            scheduler.cancel()
            await self._finish_env()
            with contextlib.suppress(FileNotFoundError):
                self.env_path.unlink()
            return 0
        finally:
            if self._watcher is not None:
                self._watcher.stop()
            self.fetch_pool.shutdown(wait=False, cancel_futures=True)
            self.io.shutdown(wait=False, cancel_futures=True)
            os.close(lock)

    def _open_listener(self) -> server.Listener:
        if sys.platform == "win32":
            from mpagent import winpipe

            return winpipe.PipeListener(str(self.socket_path))
        sock = inherited_listener()
        if sock is None:
            return server.UnixListener(server.bind_private(self.socket_path), owned=True)
        self.socket_path = Path(sock.getsockname())
        log.info("using the socket passed by the service manager")
        return server.UnixListener(sock, owned=False)  # the service manager keeps it

    async def _drain(self, listener: server.Listener) -> None:
        """Let requests in flight finish (a refresh they wait for is bounded by HTTP timeouts)."""
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while listener.busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def _start_bridge(self) -> asyncio.AbstractServer | None:
        """The opt-in loopback token endpoint for HTTP tools; its settings apply at start."""
        if self.cfg.bridge.listen is None:
            return None
        from mpagent import bridge

        try:
            return await bridge.start(self.cfg.bridge, self.refresher, self.io)
        except MpagentError as exc:  # e.g. the port is taken: the socket still serves
            log.error("the token bridge is off: %s", exc)
            return None

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
        if verb == "status":
            return protocol.encode(["ok"], [("json", json.dumps(self.status()))])
        if verb == "reload":
            return self._reload_reply()
        if verb == "refresh":
            return self._refresh_reply(protocol.first(fields, "profile"))
        if verb == "stop":
            self.stopping.set()
            return protocol.encode(["ok"], [("pid", str(os.getpid()))])
        raise ProtocolError(
            f"unknown request {' '.join(words)!r}; "
            "this agent knows get, status, reload, refresh, stop"
        )

    def _get(self, fields: protocol.Fields) -> bytes | Any:
        scopes = protocol.every(fields, "scope")
        if not scopes:
            raise ProtocolError("get needs at least one scope")
        profile = protocol.first(fields, "profile")
        min_ttl = _float(protocol.first(fields, "min_ttl"), "min_ttl")
        token = self.refresher.cached(profile, scopes, min_ttl)
        if token is not None:
            return _token_reply(token, self._warnings(profile))
        return self._get_slow(profile, scopes, min_ttl)

    async def _get_slow(
        self, profile: str | None, scopes: list[str], min_ttl: float | None
    ) -> bytes:
        token = await self.refresher.get(profile, scopes, min_ttl)
        return _token_reply(token, self._warnings(profile))

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
        return protocol.encode(["ok"], [("json", json.dumps({"unusable": self.problems}))])

    async def _refresh_reply(self, profile: str | None) -> bytes:
        entries = await self.refresher.refresh_now(profile)
        results = [
            {
                "profile": e.key.profile,
                "scope": e.key.scope,
                "ok": e.error is None and e.token is not None,
                "error": e.error.to_wire() if e.error else None,
            }
            for e in entries
        ]
        return protocol.encode(["ok"], [("json", json.dumps(results))])

    def status(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": time.time() - self.started,
            "socket": str(self.socket_path),
            "env_file": str(self.env_path),
            "config": str(self.cfg.path),
            "reload_error": self.reload_error.message if self.reload_error else None,
            "profiles": {name: self.problems.get(name) for name in self.cfg.names},
            "warnings": {
                name: warning
                for name, s in self.refresher.sources.items()
                if s.exchange and (warning := certificate_warning(s.exchange.key, time.time()))
            },
            "tokens": self.refresher.status(),
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

    async def reload(self, reason: str) -> None:
        """Apply every valid change. Only a file that cannot be read or parsed, or a mistake
        outside [profiles], keeps the whole old configuration; a profile that cannot be used
        is reported and keeps its previous version if it had a working one."""
        loop = asyncio.get_running_loop()
        log.info("reloading (%s)", reason)
        try:
            cfg = await loop.run_in_executor(self.io, config.load, self.config_path)
        except MpagentError as exc:
            self.reload_error = exc
            log.error("reload refused, the previous configuration keeps running: %s", exc)
            raise
        previous = self.refresher.sources
        loaded = await loop.run_in_executor(self.io, lambda: load_sources(cfg, previous=previous))
        self.reload_error = None
        self._adopt(cfg, *loaded)
        self._watch()
        log.info("reloaded" + (f"; unusable: {', '.join(self.problems)}" if self.problems else ""))

    def _adopt(
        self,
        cfg: Config,
        sources: dict[str, Source],
        unusable: dict[str, MpagentError],
        problems: dict[str, str],
    ) -> None:
        self.cfg, self.problems = cfg, problems
        self._unwarned = {
            name for name, s in sources.items() if s.exchange and s.exchange.key.warnings
        }
        self.refresher.idle_timeout = cfg.agent.idle_timeout
        self.refresher.set_sources(sources, cfg.default_profile, unusable)

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
        """Before the first write: remove temp files a killed agent left (they hold tokens)."""
        envfile.remove_leftovers(self.env_path)

    def _env_changed(self) -> None:
        self._env_dirty = True
        if self._env_task is None or self._env_task.done():
            self._env_task = asyncio.get_running_loop().create_task(self._write_env())

    async def _write_env(self) -> None:
        loop = asyncio.get_running_loop()
        while self._env_dirty:
            self._env_dirty = False
            tokens = self._env_tokens()
            content = envfile.render(tokens)
            if content == self._env_written or (not tokens and self._env_written is None):
                continue  # nothing new; and a crashed agent's file keeps its tokens until ours
            try:
                await loop.run_in_executor(self.io, envfile.write_atomic, self.env_path, content)
                self._env_written = content
                log.debug("env file %s updated", self.env_path)
            except OSError as exc:
                log.error("cannot write the env file %s: %s", self.env_path, exc)

    async def _finish_env(self) -> None:
        if self._env_task is not None:
            with contextlib.suppress(Exception):
                await self._env_task

    def _env_tokens(self) -> list[tuple[str, str, float]]:
        now = time.time()
        default = self.cfg.default_name
        out: list[tuple[str, str, float]] = []
        for entry in self.refresher.entries.values():
            token, profile = entry.token, entry.source.profile
            if entry.pinned and token is not None and token.expires_at > now:
                names = envfile.variable_names(
                    profile.name, entry.key.scope, profile.env_names, short=profile.name == default
                )
                out.extend((name, token.access_token, token.expires_at) for name in names)
        return out


def _token_reply(token: Any, warnings: tuple[str, ...] = ()) -> bytes:
    return protocol.encode(
        ["ok"],
        [
            ("token", token.access_token),
            ("expires_at", f"{token.expires_at:.3f}"),
            ("scope", token.scope),
            ("token_type", token.token_type),
            *(("warning", w) for w in warnings),
        ],
    )


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


PLAIN = logging.Formatter("%(asctime)s mpagent[%(process)d] %(levelname)s %(message)s")


class JournalFormatter(logging.Formatter):
    """Under systemd: journald adds time and pid itself; a <N> prefix gives the priority,
    so `journalctl -p err` finds errors."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelname, 6)}>{super().format(record)}"


_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


def inherited_listener() -> socket.socket | None:
    """sd_listen_fds(3): a listening socket passed as fd 3, if LISTEN_PID names us."""
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS", "0")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for our children
    if pid != str(os.getpid()) or not count.isdigit() or int(count) < 1:
        return None
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise MpagentError("the socket passed by the service manager is not a Unix stream socket")
    sock.set_inheritable(False)
    return sock


def refuse_queued_clients(exc: MpagentError) -> None:
    """Under socket activation the clients that made systemd start us wait in the inherited
    socket's queue; answer them with the error at once instead of leaving them to time out.
    (With RestartPreventExitStatus=78 the next `get` starts us again and gets the same.)"""
    sock = inherited_listener()
    if sock is None:
        return
    sock.settimeout(QUEUED_CLIENTS_WAIT)
    with sock:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:  # nobody else is waiting
                return
            with conn:
                if server.peer_uid(conn) != os.getuid():
                    continue
                conn.settimeout(QUEUED_CLIENTS_WAIT)
                with contextlib.suppress(OSError):
                    conn.recv(protocol.MAX_REQUEST)
                    conn.sendall(server.error_reply(exc))


def notify(message: str) -> None:
    """sd_notify(3): tell systemd about our state when it asked (NOTIFY_SOCKET)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
        sock.sendto(message.encode(), address)


def run(config_path: str | None) -> int:
    """`mpagent agent`: load the configuration (exit 78 if it is wrong), then serve."""
    try:
        cfg = config.load(config_path)
    except ConfigError as exc:
        refuse_queued_clients(exc)
        raise
    handler = logging.StreamHandler()
    handler.setFormatter(JournalFormatter() if os.environ.get("JOURNAL_STREAM") else PLAIN)
    logging.basicConfig(
        level=os.environ.get("MPAGENT_LOG_LEVEL", cfg.agent.log_level).upper(), handlers=[handler]
    )
    # watchdog logs every event at debug level; a log file in a watched directory would then
    # feed itself forever.
    logging.getLogger("watchdog").setLevel(logging.INFO)
    return asyncio.run(Agent(cfg, config_path).run())
