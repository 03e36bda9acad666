"""The agent's socket: a private directory, a private bind, the peer's uid checked on every
connection, and hard limits on what a client may send.

The listener accepts by itself rather than through `loop.create_unix_server`:
- a client whose whole request is there when it is accepted (most, once the agent is busy)
  is answered there and then, without a transport or a task; that keeps tens of thousands of
  connections a second cheap, a connect/close flood included;
- the others become asyncio Protocols (not streams: a cached `get` is still answered inside
  `data_received`); anything that must wait (a refresh) becomes a task;
- it holds at most `connection_cap()` connections, a new one closing the oldest idle one;
- when accept fails for want of descriptors it pauses, where asyncio would try again up to
  the backlog (1,024 times) per turn of the loop, logging a traceback each time.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import struct
import sys
import typing
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from mpagent import protocol
from mpagent.errors import AlreadyRunning, ConfigError, MpagentError, ProtocolError
from mpagent.private import ensure_private_dir

if typing.TYPE_CHECKING:
    from mpagent.tokens import Token

log = logging.getLogger(__name__)

READ_TIMEOUT = 5.0
BACKLOG = 1024  # bursts of short-lived clients queue here rather than being refused
# Descriptors kept for everything but clients: token requests (8 threads, their pools), the
# env file's writes, the log, file watches, the bridge's 64 clients, the keyring's D-Bus.
FD_RESERVE = 256
# Connections held at once, at most, whatever the limit: a `get` lasts well under a
# millisecond, so only idle or abusive clients pile up; each costs a few KiB.
MAX_CONNECTIONS = 4096
ACCEPT_BATCH = 64  # accepts per turn of the loop, so that replies and timers get theirs
ACCEPT_PAUSE = (0.05, 1.0)  # the first and the longest pause after running out of descriptors
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# macOS refuses a soft RLIMIT_NOFILE over OPEN_MAX when the hard limit is unlimited.
_OPEN_MAX = 10240
# sockaddr_un.sun_path: 108 bytes on Linux, 104 on macOS and the BSDs, including the NUL.
MAX_SOCKET_PATH = 103 if sys.platform != "linux" else 107

# What a request gets: its reply line at once, or an awaitable of it (a refresh to wait for).
Reply = bytes | Awaitable[bytes]
Handler = Callable[[list[str], protocol.Fields], Reply]


def bind_private(path: Path) -> socket.socket:
    """Bind a listening socket at `path` readable and writable by its owner only. A socket
    file left by a dead agent is replaced; a live agent makes this fail."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"socket path {path} is {len(os.fsencode(path))} bytes, over the system's limit of "
            f"{MAX_SOCKET_PATH}; set MPAGENT_SOCKET or XDG_RUNTIME_DIR to a shorter directory"
        )
    ensure_private_dir(path.parent)
    if path.exists() or path.is_symlink():
        if _answers(path):
            raise AlreadyRunning(
                f"an agent is already running on {path}; stop it with `mpagent stop`"
            )
        log.info("replacing stale socket %s", path)
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(os.fspath(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    sock.listen(BACKLOG)
    return sock


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit, and return the soft limit now. A login
    session's soft limit is 1,024 files, which 1,100 idle clients can take from the agent."""
    try:
        import resource
    except ImportError:  # Windows: no such limit on handles
        return _open_files_limit()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _OPEN_MAX if hard == resource.RLIM_INFINITY else hard
    if sys.platform == "darwin":
        wanted = min(wanted, _OPEN_MAX)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, wanted, exc)
    return _open_files_limit()


def _open_files_limit() -> int:
    try:
        import resource
    except ImportError:  # Windows
        return MAX_CONNECTIONS + FD_RESERVE
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return MAX_CONNECTIONS + FD_RESERVE if soft == resource.RLIM_INFINITY else soft


def connection_cap(open_files: int) -> int:
    """Client connections held at once, at most, under an open-files limit of `open_files`."""
    return max(16, min(MAX_CONNECTIONS, open_files - FD_RESERVE))


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
        return True
    except OSError as exc:
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK)
    finally:
        probe.close()


def peer_uid(sock: socket.socket) -> int | None:
    """The connecting process's uid, from the kernel; None where the platform cannot say."""
    if hasattr(socket, "SO_PEERCRED"):
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return int(struct.unpack("3i", creds)[1])
    if sys.platform == "darwin" or "bsd" in sys.platform:
        sol_local, local_peercred = 0, 0x001
        # struct xucred { u_int cr_version; uid_t cr_uid; short cr_ngroups; gid_t cr_groups[16]; }
        creds = sock.getsockopt(sol_local, local_peercred, struct.calcsize("IIh16I"))
        return int(struct.unpack_from("II", creds)[1])
    return None


def answer(handler: Handler, line: bytes) -> Reply:
    """One request line to its reply line, or to an awaitable of it when the answer has to
    wait (a refresh). Shared by every transport; never raises."""
    try:
        words, fields = protocol.decode(line)
        if words[:1] != [protocol.VERSION]:
            raise ProtocolError(
                f"unsupported protocol {words[:1]}; this agent speaks {protocol.VERSION}"
            )
        reply = handler(words[1:], fields)
    except protocol.MessageError as exc:
        return error_reply(ProtocolError(f"malformed request: {exc}"))
    except MpagentError as exc:
        return error_reply(exc)
    return reply if isinstance(reply, bytes) else _settle(reply)


async def _settle(reply: Awaitable[bytes]) -> bytes:
    try:
        return await reply
    except MpagentError as exc:
        return error_reply(exc)
    except Exception as exc:  # request boundary: one bad request must not hurt others
        log.exception("internal error while answering a request")
        return error_reply(
            MpagentError(f"internal error in the agent: {type(exc).__name__}; see its log")
        )


# -- the wire encoding of replies: the agent's handler builds its answers with these ---------


def ok_reply(fields: protocol.Fields | None = None) -> bytes:
    return protocol.encode(["ok"], fields or [])


def json_reply(document: object) -> bytes:
    """`ok json=DOCUMENT`: the replies of status, reload and refresh."""
    return ok_reply([("json", json.dumps(document))])


def token_reply(token: Token, warnings: Iterable[str] = ()) -> bytes:
    """The reply to `get`: the token, its expiry (epoch seconds), scope, type and warnings."""
    return ok_reply(
        [
            ("token", token.access_token),
            ("expires_at", f"{token.expires_at:.3f}"),
            ("scope", token.scope),
            ("token_type", token.token_type),
            *(("warning", w) for w in warnings),
        ]
    )


def error_reply(exc: MpagentError) -> bytes:
    """`error kind=... message=...` and the error's details (typed, see protocol.details)."""
    return protocol.encode(["error"], protocol.details(exc.to_wire()))


class Listener(typing.Protocol):
    """Where the agent accepts clients: a Unix socket, or a named pipe on Windows."""

    address: str

    async def start(self, handler: Handler) -> None: ...

    def close(self) -> None: ...

    def busy(self) -> bool:
        """Whether a request is still being answered."""
        ...


class UnixListener:
    """A listening Unix socket, bound privately here or passed in by the service manager.
    `max_connections`: how many clients it holds at once (default: from the open-files limit)."""

    def __init__(
        self, sock: socket.socket, *, owned: bool, max_connections: int | None = None
    ) -> None:
        self.sock, self.owned = sock, owned
        self.address = sock.getsockname()
        # Remove only our own socket file: after a quick restart another agent (or systemd)
        # may already have bound a new one at the same path.
        self._inode = os.stat(self.address).st_ino
        self.max_connections = max_connections or 0  # 0: set by start()
        self.live: dict[Connection, None] = {}  # oldest first
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handler: Handler | None = None
        self._uid = os.getuid()
        self._pause = ACCEPT_PAUSE[0]
        self._resume: asyncio.TimerHandle | None = None
        self._connecting: set[asyncio.Task[None]] = set()

    async def start(self, handler: Handler) -> None:
        if not self.max_connections:
            self.max_connections = connection_cap(_open_files_limit())
        self._handler = handler
        self._loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        self.sock.listen(BACKLOG)
        self._loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        if self._loop is not None and self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
        if self._resume is not None:
            self._resume.cancel()
        self.sock.close()
        if self.owned:
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.address).st_ino == self._inode:
                    os.unlink(self.address)

    def busy(self) -> bool:
        return bool(self.live)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return  # nobody else is waiting
            except OSError as exc:
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    self._out_of_descriptors(exc)
                else:
                    log.warning("cannot accept a client: %s", exc)
                return
            self._pause = ACCEPT_PAUSE[0]
            try:
                self._serve(conn)
            except Exception:  # connection boundary: one client's bug must not stop accepting
                log.exception("internal error while accepting a client")
                conn.close()

    def _serve(self, conn: socket.socket) -> None:
        """Check the peer, then answer at once when the whole request is already here (most
        requests, once the agent is busy: no transport, no task); else hand the connection
        to asyncio with what has been read and, if it is ready, the reply."""
        assert self._loop is not None and self._handler is not None
        conn.setblocking(False)
        try:
            uid = peer_uid(conn)
        except OSError:  # the client is gone already
            uid = None
        if uid != self._uid:
            log.warning("refused a connection from uid %s", uid)
            conn.close()
            return
        reader, reply = first_read(conn, self._handler)
        if isinstance(reply, bytes):
            try:
                reply = reply[conn.send(reply) :]
            except BlockingIOError:
                pass
            except OSError:  # the client left without its reply
                reply = b""
            if not reply:
                conn.close()
                return
        full = len(self.live) >= self.max_connections
        if full and not isinstance(reply, bytes) and not self._make_room():
            self._refuse(conn, reply)
            return
        peer = Connection(self._handler, self.live, reader=reader, reply=reply)
        self.live[peer] = None  # counted from now, not from its transport's making
        task = self._loop.create_task(self._connect(conn, peer))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _connect(self, conn: socket.socket, peer: Connection) -> None:
        assert self._loop is not None
        try:
            await self._loop.connect_accepted_socket(lambda: peer, conn)
        except OSError as exc:  # the client left before its transport was made
            log.debug("a client left at once: %s", exc)
            conn.close()
            peer.abandon()

    def _out_of_descriptors(self, exc: OSError) -> None:
        """No descriptor for the next client (the limit is lower than the cap assumed, or
        something else holds descriptors): close up to a batch of the oldest idle clients and
        stop accepting for a moment (the kernel keeps the others queued in the backlog),
        instead of trying again at once."""
        assert self._loop is not None
        self._loop.remove_reader(self.sock.fileno())
        closed = 0
        while closed < ACCEPT_BATCH and self._make_room():
            closed += 1
        log.warning(
            "cannot accept a client: %s; %d clients connected, the %d oldest idle ones closed; "
            "accepting again in %.2f s",
            exc.strerror or exc,
            len(self.live),
            closed,
            self._pause,
        )
        self._resume = self._loop.call_later(self._pause, self._accept_again)
        self._pause = min(ACCEPT_PAUSE[1], self._pause * 2)

    def _accept_again(self) -> None:
        self._resume = None
        if self._loop is not None and self.sock.fileno() >= 0:
            self._loop.add_reader(self.sock.fileno(), self._accept)

    def _make_room(self) -> bool:
        """Close the oldest connection that has not sent its request yet (False: none has)."""
        for conn in self.live:
            if conn.idle():
                conn.evict(
                    f"closed: the agent holds {len(self.live)} connections, its most, and this "
                    "one had sent no request; connect when there is a request to send"
                )
                return True
        return False

    def _refuse(self, conn: socket.socket, reply: Reply | None) -> None:
        """Every connection is waiting for an answer: this one gets an error at once."""
        _drop(reply)
        busy = MpagentError(
            f"the agent is answering {len(self.live)} requests, its most; try again in a moment"
        )
        with conn, contextlib.suppress(OSError):
            conn.send(error_reply(busy))


_dropped: set[asyncio.Future[bytes]] = set()


def _drop(reply: Reply | None) -> None:
    """An answer nobody is left to read: let it finish (the refresh it waits for is shared
    with other clients) and forget it."""
    if reply is not None and not isinstance(reply, bytes):
        task = asyncio.ensure_future(reply)
        _dropped.add(task)
        task.add_done_callback(_dropped.discard)


UNFINISHED = "the request ended before its newline"


def request_line(reader: protocol.LineReader, data: bytes) -> bytes | ProtocolError | None:
    """Feed what a client sent next: its request line once complete, an error once it is
    over the limit, or None while its newline is still to come."""
    try:
        return reader.feed(data)
    except protocol.MessageError:
        return ProtocolError(f"request larger than {reader.limit} bytes")


def read_request(recv: Callable[[int], bytes]) -> bytes | ProtocolError:
    """For a blocking transport (the Windows pipe): the request line read with `recv`, or
    the error to answer it with."""
    try:
        line = protocol.read_line(recv, protocol.MAX_REQUEST)
    except protocol.MessageError:
        return ProtocolError(f"request larger than {protocol.MAX_REQUEST} bytes")
    return line if line.endswith(b"\n") else ProtocolError(UNFINISHED)


def first_read(
    conn: socket.socket, handler: Handler
) -> tuple[protocol.LineReader | None, Reply | None]:
    """Read what a newly accepted client has sent: (its reader, None) while its request is
    incomplete, else (None, the reply). Never blocks; a reset client gets an empty reply."""
    try:
        received = conn.recv(protocol.MAX_REQUEST + 1)
    except BlockingIOError:
        return None, None
    except OSError:
        return None, b""
    if not received:
        return None, error_reply(ProtocolError(UNFINISHED))
    reader = protocol.LineReader(protocol.MAX_REQUEST)
    line = request_line(reader, received)
    if line is None:
        return reader, None
    return None, error_reply(line) if isinstance(line, ProtocolError) else answer(handler, line)


class Connection(asyncio.Protocol):
    """One client: one request line in, one reply line out, then close. `reader`: what the
    listener already read of an unfinished request; `reply`: what it already has to send (or
    to await)."""

    def __init__(
        self,
        handler: Handler,
        live: dict[Connection, None],
        *,
        reader: protocol.LineReader | None = None,
        reply: Reply | None = None,
    ) -> None:
        self.handler, self.live = handler, live
        self.reader = reader or protocol.LineReader(protocol.MAX_REQUEST)
        self.reply = reply
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.live.setdefault(self)
        reply, self.reply = self.reply, None
        if isinstance(reply, bytes):
            self._send(reply)
        elif reply is not None:
            self.task = asyncio.ensure_future(self._send_later(reply))
        else:
            self.timer = asyncio.get_running_loop().call_later(READ_TIMEOUT, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self.task is not None or self.timer is None:
            return  # one request per connection; ignore anything after it
        line = request_line(self.reader, data)
        if isinstance(line, ProtocolError):
            self._error(line)
        elif line is not None:
            self.timer.cancel()
            self._dispatch(line)

    def eof_received(self) -> bool:
        if self.task is None and self.transport is not None and not self.transport.is_closing():
            self._error(ProtocolError(UNFINISHED))
        return True  # keep our write side open until the reply is sent

    def connection_lost(self, exc: Exception | None) -> None:
        self.live.pop(self, None)
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            self.task.cancel()  # a client that vanished no longer needs its answer

    def abandon(self) -> None:
        """Its transport could not be made: forget it, and the answer it was waiting for."""
        self.live.pop(self, None)
        _drop(self.reply)

    def idle(self) -> bool:
        """Connected, and waiting for its request: what the listener closes first."""
        return (
            self.task is None
            and self.timer is not None
            and not self.timer.cancelled()
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def evict(self, why: str) -> None:
        self.live.pop(self, None)  # out of the count now; its descriptor goes next turn
        self._error(MpagentError(why))

    def _timed_out(self) -> None:
        self._error(ProtocolError(f"no complete request within {READ_TIMEOUT:g} s"))

    def _dispatch(self, line: bytes) -> None:
        reply = answer(self.handler, line)
        if isinstance(reply, bytes):
            self._send(reply)
        else:
            self.task = asyncio.ensure_future(self._send_later(reply))

    async def _send_later(self, reply: Awaitable[bytes]) -> None:
        self._send(await reply)

    def _error(self, exc: MpagentError) -> None:
        self._send(error_reply(exc))

    def _send(self, reply: bytes) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(reply)
            self.transport.close()
