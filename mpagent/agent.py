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


def load_sources(cfg: Config, *, strict: bool, interactive: bool = False) -> dict[str, Source]:
    """Open every profile's key. Strict (a reload): any failure rejects the whole config.
    Not strict (start-up): a failing profile is kept as unusable, so the rest still work."""
    sources: dict[str, Source] = {}
    for name, profile in cfg.profiles.items():
        try:
            passwords = ProfilePasswords(name, interactive=interactive)
            sources[name] = Source(profile, exchange=open_exchange(cfg, profile, passwords))
        except MpagentError as exc:
            if strict:
                raise type(exc)(f"profile {name}: {exc}", **exc.details) from exc
            log.error("profile %s cannot be used: %s", name, exc)
            sources[name] = Source(profile, error=exc)
    return sources


class Agent:
    def __init__(self, cfg: Config, config_path: str | None) -> None:
        self.cfg, self.config_path = cfg, config_path
        self.socket_path = Path(paths.socket_path())
        self.env_path = cfg.agent.env_file or Path(paths.default_env_file())
        self.started = time.time()
        self.reload_error: MpagentError | None = None
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
            sources = await loop.run_in_executor(
                self.io, lambda: load_sources(self.cfg, strict=False, interactive=os.isatty(0))
            )
            self.refresher.set_sources(sources, self.cfg.default_profile)
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
        if verb == "stop":
            self.stopping.set()
            return protocol.encode(["ok"], [])
        raise ProtocolError(
            f"unknown request {' '.join(words)!r}; this agent knows get, status, reload, stop"
        )

    def _get(self, fields: protocol.Fields) -> bytes | Any:
        scopes = protocol.every(fields, "scope")
        if not scopes:
            raise ProtocolError("get needs at least one scope")
        profile = protocol.first(fields, "profile")
        min_ttl = _float(protocol.first(fields, "min_ttl"), "min_ttl")
        token = self.refresher.cached(profile, scopes, min_ttl)
        if token is not None:
            return _token_reply(token)
        return self._get_slow(profile, scopes, min_ttl)

    async def _get_slow(
        self, profile: str | None, scopes: list[str], min_ttl: float | None
    ) -> bytes:
        return _token_reply(await self.refresher.get(profile, scopes, min_ttl))

    async def _reload_reply(self) -> bytes:
        await self.reload("requested")
        return protocol.encode(["ok"], [])

    def status(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": time.time() - self.started,
            "socket": str(self.socket_path),
            "env_file": str(self.env_path),
            "config": str(self.cfg.path),
            "reload_error": self.reload_error.message if self.reload_error else None,
            "profiles": {
                name: (s.error.message if s.error else None)
                for name, s in self.refresher.sources.items()
            },
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
        """Validate the new configuration completely; on error keep the old one running."""
        loop = asyncio.get_running_loop()
        log.info("reloading (%s)", reason)
        try:
            cfg = await loop.run_in_executor(self.io, config.load, self.config_path)
            sources = await loop.run_in_executor(self.io, lambda: load_sources(cfg, strict=True))
        except MpagentError as exc:
            self.reload_error = exc
            log.error("reload refused, the previous configuration keeps running: %s", exc)
            raise
        self.cfg, self.reload_error = cfg, None
        self.refresher.idle_timeout = cfg.agent.idle_timeout
        self.refresher.set_sources(sources, cfg.default_profile)
        self._watch()
        log.info("reloaded")

    def _watch(self) -> None:
        from mpagent import watch

        files = [self.cfg.path] + [
            f for p in self.cfg.profiles.values() for f in (p.keystore, p.certificate) if f
        ]
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
        out = []
        for entry in self.refresher.entries.values():
            token = entry.token
            if entry.pinned and token is not None and token.expires_at > now:
                names = entry.source.profile.env_names
                out.append(
                    (
                        envfile.variable_name(entry.key.scope, names),
                        token.access_token,
                        token.expires_at,
                    )
                )
        return out


def _token_reply(token: Any) -> bytes:
    return protocol.encode(
        ["ok"],
        [
            ("token", token.access_token),
            ("expires_at", f"{token.expires_at:.3f}"),
            ("scope", token.scope),
            ("token_type", token.token_type),
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
