"""The agent's socket: a private directory, a private bind, the peer's uid checked on every
connection, and hard limits on what a client may send.

Connections are asyncio Protocols rather than streams: a cached `get` is answered inside
`data_received` without creating a task, which is what keeps thousands of new connections a
second cheap. Anything that must wait (a refresh) becomes a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
import sys
import typing
from collections.abc import Awaitable, Callable
from pathlib import Path

from mpagent import protocol
from mpagent.errors import AlreadyRunning, ConfigError, MpagentError, ProtocolError
from mpagent.private import ensure_private_dir

log = logging.getLogger(__name__)

READ_TIMEOUT = 5.0
BACKLOG = 1024  # bursts of short-lived clients queue here rather than being refused
# sockaddr_un.sun_path: 108 bytes on Linux, 104 on macOS and the BSDs, including the NUL.
MAX_SOCKET_PATH = 103 if sys.platform != "linux" else 107

# A handler returns reply bytes at once, or an awaitable for them.
Handler = Callable[[list[str], protocol.Fields], "bytes | Awaitable[bytes]"]


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


def answer(handler: Handler, line: bytes) -> bytes | Awaitable[bytes]:
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


def error_reply(exc: MpagentError) -> bytes:
    return protocol.encode(
        ["error"], [(k, str(v)) for k, v in exc.to_wire().items() if v is not None]
    )


class Listener(typing.Protocol):
    """Where the agent accepts clients: a Unix socket, or a named pipe on Windows."""

    address: str

    async def start(self, handler: Handler) -> None: ...

    def close(self) -> None: ...

    def busy(self) -> bool:
        """Whether a request is still being answered."""
        ...


class UnixListener:
    """A listening Unix socket, bound privately here or passed in by the service manager."""

    def __init__(self, sock: socket.socket, *, owned: bool) -> None:
        self.sock, self.owned = sock, owned
        self.address = sock.getsockname()
        # Remove only our own socket file: after a quick restart another agent (or systemd)
        # may already have bound a new one at the same path.
        self._inode = os.stat(self.address).st_ino
        self.live: set[Connection] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self, handler: Handler) -> None:
        uid = os.getuid()
        self._server = await asyncio.get_running_loop().create_unix_server(
            lambda: Connection(handler, uid, self.live), sock=self.sock, backlog=BACKLOG
        )

    def close(self) -> None:
        if self._server is not None:
            self._server.close()  # closes the listening socket too
        else:
            self.sock.close()
        if self.owned:
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.address).st_ino == self._inode:
                    os.unlink(self.address)

    def busy(self) -> bool:
        return bool(self.live)


class Connection(asyncio.Protocol):
    """One client: one request line in, one reply line out, then close."""

    def __init__(self, handler: Handler, uid: int, live: set[Connection]) -> None:
        self.handler, self.uid, self.live = handler, uid, live
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.live.add(self)
        uid = peer_uid(transport.get_extra_info("socket"))
        if uid != self.uid:
            log.warning("refused a connection from uid %s", uid)
            transport.abort()
            return
        self.timer = asyncio.get_running_loop().call_later(READ_TIMEOUT, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self.task is not None or self.timer is None:
            return  # one request per connection; ignore anything after it
        self.buffer += data
        end = self.buffer.find(b"\n")
        if end < 0:
            if len(self.buffer) > protocol.MAX_REQUEST:
                self._error(ProtocolError(f"request larger than {protocol.MAX_REQUEST} bytes"))
            return
        if end > protocol.MAX_REQUEST:
            self._error(ProtocolError(f"request larger than {protocol.MAX_REQUEST} bytes"))
            return
        self.timer.cancel()
        self._dispatch(bytes(self.buffer[: end + 1]))

    def eof_received(self) -> bool:
        if self.task is None and self.transport is not None and not self.transport.is_closing():
            self._error(ProtocolError("the request ended before its newline"))
        return True  # keep our write side open until the reply is sent

    def connection_lost(self, exc: Exception | None) -> None:
        self.live.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            self.task.cancel()  # a client that vanished no longer needs its answer

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
